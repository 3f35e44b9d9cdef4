"""A new kind of data plugs in without touching ``datamodules/``: a text-only corpus defined in this
file alone streams through the generic ShardDataModule with two workers, counts its own skip
reason, trains through ``lit-vlm fit``, and a fit SIGKILLed mid-epoch resumes exactly (same
samples, same losses as the run that was never interrupted).

The subprocesses import this file as the module ``test_corpus_plugin`` (tests/ on PYTHONPATH)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lit_vlm.datamodules import Corpus, ShardDataModule, Split
from lit_vlm.datamodules.transforms import BadSample

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64
WORDS = "the a red blue green circle square star small big left right top bottom of and".split()


# ---- the plug-in: a corpus of plain-text documents and a model that reads them ----------------


class TextDocuments(Corpus):
    """``KEY.txt`` documents -> hashed word ids; documents under ``min_words`` are skipped as
    ``too_short`` (this corpus's own reason)."""

    skip_reasons = ("not_utf8", "too_short")

    def __init__(self, length: int = 12, min_words: int = 3) -> None:
        self.length = length
        self.min_words = min_words

    def decoder(self, split: Split) -> Any:
        return _Decode(self.min_words, split.train)

    def collator(self, split: Split) -> Any:
        return _Collate(self.length)


class _Decode:
    def __init__(self, min_words: int, train: bool) -> None:
        self.min_words, self.train = min_words, train

    def __call__(self, raw: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        try:
            words = raw["txt"].decode("utf-8").split()
        except (KeyError, UnicodeDecodeError) as exc:
            raise BadSample("not_utf8", str(exc)) from exc
        if len(words) < self.min_words:
            raise BadSample("too_short", f"{len(words)} words")
        if self.train:  # a random crop of the document: the worker's generator must be resumed too
            start = int(torch.randint(0, len(words) - self.min_words + 1, (1,), generator=generator))
            words = words[start:]
        return {"ids": [zlib.crc32(w.encode()) % (VOCAB - 1) + 1 for w in words]}


class _Collate:
    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        tokens = torch.zeros(len(examples), self.length, dtype=torch.long)  # [B, L], 0 pads
        for row, example in enumerate(examples):
            ids = example["ids"][: self.length]
            tokens[row, : len(ids)] = torch.tensor(ids)
        return {"tokens": tokens}


class BagOfWords(pl.LightningModule):
    """Predicts a document's last word from the mean embedding of the others."""

    def __init__(self, dim: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(VOCAB, dim, mode="mean", padding_idx=0)
        self.head = nn.Linear(dim, VOCAB)
        self.lr = lr

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        tokens = batch["tokens"]  # [B, L]
        last = (tokens > 0).sum(1) - 1  # [B]
        target = tokens.gather(1, last[:, None]).squeeze(1)  # [B]
        context = tokens.scatter(1, last[:, None], 0)  # [B, L]
        loss = nn.functional.cross_entropy(self.head(self.embed(context)), target)
        self.log("train/loss", loss, batch_size=len(batch["sample_id"]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


# ---- data -----------------------------------------------------------------------------------------


def write_shards(folder: Path, shards: int = 4, per_shard: int = 12) -> int:
    """Writes the shards; every sixth document is too short. Returns the number of short ones."""
    folder.mkdir(parents=True, exist_ok=True)
    short = 0
    for s in range(shards):
        with tarfile.open(folder / f"docs-{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                n = 2 if i % 6 == 1 else 5 + (7 * i + s) % 6
                short += n < 3
                text = " ".join(WORDS[(3 * i + 5 * s + k * k) % len(WORDS)] for k in range(n)).encode()
                info = tarfile.TarInfo(f"doc{s:02d}{i:03d}.txt")
                info.size = len(text)
                tar.addfile(info, io.BytesIO(text))
    return short


def test_the_generic_module_streams_a_new_corpus_and_counts_its_own_skip_reason(tmp_path):
    short = write_shards(tmp_path / "docs")
    spec = str(tmp_path / "docs/docs-{000000..000003}.tar")
    dm = ShardDataModule(TextDocuments(), val_shards=spec, eval_batch_size=5, num_workers=2)
    batches = [dm.on_after_batch_transfer(b, 0) for b in dm.val_dataloader()]
    ids = [i for b in batches for i in b["sample_id"]]
    assert len(ids) == len(set(ids)) == 4 * 12 - short  # every good document once, across 2 workers
    assert all(b["tokens"].shape[1] == 12 and len(b["sample_id"]) == b["tokens"].shape[0] for b in batches)
    assert dm.skip_counts("val") == {"tar_error": 0, "duplicate_key": 0, "not_utf8": 0, "too_short": short}


# ---- kill and resume through lit-vlm fit ------------------------------------------------------------


def fit(tmp_path: Path, name: str, out: Path, *extra: str, kill_at: int = -1) -> subprocess.CompletedProcess:
    args = [
        "fit",
        "--model", "test_corpus_plugin.BagOfWords",
        "--data", "lit_vlm.datamodules.ShardDataModule",
        "--data.corpus", "test_corpus_plugin.TextDocuments",
        "--data.train_shards", str(tmp_path / "docs/docs-{000000..000003}.tar"),
        "--data.train_epoch_samples", "40",
        "--data.batch_size", "4",
        "--data.num_workers", "2",
        "--data.shuffle_buffer", "8",
        "--trainer.max_epochs", "2",
        "--trainer.enable_progress_bar", "false",
        "--checkpoint.every_n_train_steps", "3",
        "--checkpoint.monitor", "null",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.logger.init_args.name", name,
        "--trainer.callbacks+=resume_probe.Probe",
        "--trainer.callbacks.out", str(out),
        "--trainer.callbacks.kill_at_step", str(kill_at),
        *extra,
    ]  # fmt: skip
    path = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "lit_vlm", *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)


@pytest.mark.slow
def test_a_new_corpus_trains_and_resumes_exactly_after_sigkill(tmp_path):
    write_shards(tmp_path / "docs")
    whole = fit(tmp_path, "whole", tmp_path / "whole.json")
    assert whole.returncode == 0, whole.stderr[-3000:]
    reference = json.loads((tmp_path / "whole.json").read_text())
    assert [s["step"] for s in reference] == list(range(1, 21))  # 2 epochs of 40 samples / (2 workers x 4 a batch)
    fit_json = json.loads(next((tmp_path / "runs/whole").rglob("fit.json")).read_text())
    assert fit_json["data"]["train"]["skipped_by_reason"]["too_short"] > 0, fit_json["data"]

    killed = fit(tmp_path, "killed", tmp_path / "killed.json", kill_at=7)  # mid epoch 0; last checkpoint: step 6
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = fit(tmp_path, "killed", tmp_path / "killed.json", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed epoch 0 after" in resumed.stderr
    after = json.loads((tmp_path / "killed.json").read_text())
    assert [s["step"] for s in after] == [s["step"] for s in reference]
    assert [s["samples"] for s in after] == [s["samples"] for s in reference]
    assert [s["loss"] for s in after] == [s["loss"] for s in reference]
