"""Resuming: a fit killed with SIGKILL mid-epoch and resumed with ``--ckpt_path last`` trains on
exactly the samples, and reaches exactly the losses, of the run that was never interrupted; two
runs with the same seed give identical loss curves; checkpoints are written atomically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# FLIP tiny (patch dropout draws from the model's random stream), 6 shards of 16 samples, a
# shuffle buffer, one loader worker (a separate process), batches of 8: 12 steps per epoch, 2 epochs,
# validated at each epoch's end.
COMMON = [
    "--config", str(ROOT / "configs/flip/tiny.yaml"),
    "--data.init_args.synth_config", "{num_train: 96, num_val: 8, num_test: 8, shard_size: 16, image_size: 32}",
    "--data.init_args.batch_size", "8",
    "--data.init_args.num_workers", "1",
    "--data.init_args.shuffle_buffer", "20",
    "--trainer.max_epochs", "2",
    "--trainer.enable_progress_bar", "false",
    "--checkpoint.every_n_train_steps", "3",
]  # the shipped monitor (val/retrieval/mean_R@1, validated at each epoch's end) stays on


def fit(tmp_path: Path, name: str, out: Path, *extra: str, kill_at: int = -1, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [
        *COMMON,
        "--data.init_args.root", str(tmp_path / "world"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.logger.init_args.name", name,
        "--trainer.callbacks+=resume_probe.Probe",
        "--trainer.callbacks.out", str(out),
        "--trainer.callbacks.kill_at_step", str(kill_at),
        *extra,
    ]
    env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "lit_vlm", "fit", *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)


def counts(steps: list[dict]) -> Counter:
    return Counter(s for step in steps for s in step["samples"])


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_the_uninterrupted_run(tmp_path):
    whole = fit(tmp_path, "whole", tmp_path / "whole.json")
    assert whole.returncode == 0, whole.stderr[-3000:]
    reference = json.loads((tmp_path / "whole.json").read_text())
    assert [s["step"] for s in reference] == list(range(1, 25))

    # killed at step 8 (epoch 0, mid-epoch): the last checkpoint is step 6's
    killed = fit(tmp_path, "killed", tmp_path / "killed.json", kill_at=8)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "killed.json").exists()
    ckpts = sorted(p.name for p in (tmp_path / "runs/killed/version_0/checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts
    last = torch.load(tmp_path / "runs/killed/version_0/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 6 and last["epoch"] == 0
    [loader_state] = last["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state["workers"][0]["batches"] == 6  # the stream's position is in the checkpoint
    index = json.loads((tmp_path / "runs/killed/version_0/checkpoints/index.json").read_text())
    assert index["best"] is None and index["last"].endswith("last.ckpt")  # nothing validated yet: no best

    # kill it again in epoch 1 (step 17; last checkpoint: step 15), then run it to the end
    again = fit(tmp_path, "killed", tmp_path / "killed.json", "--ckpt_path", "last", kill_at=17)
    assert again.returncode == -signal.SIGKILL, again.stderr[-3000:]
    assert "Resuming in" in again.stderr and "resumed epoch 0 after 6 batches" in again.stderr
    resumed = fit(tmp_path, "killed", tmp_path / "killed.json", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed epoch 1 after 3 batches" in resumed.stderr
    assert not (tmp_path / "runs/killed/version_1").exists()  # resumed in its own run directory
    record = json.loads((tmp_path / "killed.json").read_text())

    # the trained model saw every sample as often as the uninterrupted one, in the same steps
    assert [s["step"] for s in record] == list(range(1, 25))
    assert counts(record) == counts(reference)
    assert [s["samples"] for s in record] == [s["samples"] for s in reference]
    assert [s["loss"] for s in record] == [s["loss"] for s in reference]  # bitwise on CPU
    index = json.loads((tmp_path / "runs/killed/version_0/checkpoints/index.json").read_text())
    best = torch.load(index["best"], weights_only=True)
    assert best["global_step"] in (12, 24) and "val/retrieval/mean_R@1" in str(best["callbacks"])  # validated weights


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_resume_matches_the_uninterrupted_run(tmp_path):
    """2 CPU processes (gloo): both ranks die at step 8 (checkpoint at 6) and the run resumes; every
    rank's samples and losses equal those of the uninterrupted 2-process run."""
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_epochs", "1",
           "--data.init_args.batch_size", "4"]  # 96 samples / (2 ranks x 4): 12 steps
    env = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    whole = fit(tmp_path, "whole", tmp_path / "whole.json", *ddp, env=env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = fit(tmp_path, "killed", tmp_path / "killed.json", *ddp, kill_at=8, env=env)
    assert killed.returncode != 0 and not (tmp_path / "killed.json").exists()
    last = torch.load(tmp_path / "runs/killed/version_0/checkpoints/last.ckpt", weights_only=True)
    [loader_state] = last["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert sorted(loader_state["workers"]) == [0, 1]  # both ranks' positions, gathered
    assert len(last["callbacks"]["RandomState"]["ranks"]) == 2
    resumed = fit(tmp_path, "killed", tmp_path / "killed.json", "--ckpt_path", "last", *ddp, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for suffix in ("", ".rank1"):
        reference = json.loads((tmp_path / f"whole.json{suffix}").read_text())
        record = json.loads((tmp_path / f"killed.json{suffix}").read_text())
        assert [s["step"] for s in reference] == list(range(1, 13))
        assert [s["samples"] for s in record] == [s["samples"] for s in reference]
        assert [s["loss"] for s in record] == [s["loss"] for s in reference]


@pytest.mark.slow
def test_last_holds_the_final_step_when_n_does_not_divide_it(tmp_path):
    """every_n_train_steps 5, stopped by max_steps at 11 (mid-epoch, before any validation): last
    holds step 11, and there is no best (nothing was validated)."""
    proc = fit(tmp_path, "odd", tmp_path / "odd.json", "--checkpoint.every_n_train_steps", "5", "--trainer.max_steps", "11")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = tmp_path / "runs/odd/version_0/checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 11
    index = json.loads((ckpts / "index.json").read_text())
    assert index["best"] is None and sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt"]


@pytest.mark.slow
def test_same_seed_same_losses_other_seed_other_losses(tmp_path):
    runs = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        proc = fit(tmp_path, name, tmp_path / f"{name}.json", "--trainer.max_epochs", "1", "--seed_everything", seed)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append([s["loss"] for s in json.loads((tmp_path / f"{name}.json").read_text())])
    assert len(runs[0]) == 12 and runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_checkpoint_io_is_atomic(tmp_path, monkeypatch):
    from lit_vlm.callbacks.results import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1

    class Crash(Exception):
        pass

    def dies_halfway(obj, fh, *args, **kwargs):
        fh.write(b"half a checkpoint")
        raise Crash  # the process dies while writing

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(Crash):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1  # the old checkpoint, whole
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_trainer_gets_atomic_checkpoint_io():
    import lightning.pytorch as pl

    from lit_vlm.callbacks import Checkpoint
    from lit_vlm.callbacks.results import AtomicCheckpointIO, use_atomic_checkpoint_io

    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[Checkpoint()])
    use_atomic_checkpoint_io(trainer.strategy)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


@pytest.mark.parametrize("mode", ["shards", "samples", "resampled", "mixed"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_loader_resumes_every_split_mode(tmp_path, mode, num_workers):
    """The loader alone: stop after k batches, restore its state into a fresh loader (a new
    process would build), and the rest of the epoch equals the uninterrupted one, image for image
    (the augmentation generator is restored too). Each split mode and the weighted mix of sources."""
    from test_image_text_data import WORDS, Tokenizer, make_dataset, write_shards

    from lit_vlm.datamodules.stream import StreamLoader, make_sources

    tok = Tokenizer.from_words(WORDS + [str(i) for i in range(10)])
    paths, _ = write_shards(tmp_path / "a", [5, 6, 4, 7, 5])
    other, _ = write_shards(tmp_path / "b", [6, 6], prefix="b")
    join = "::".join
    specs = {"shards": [join(paths)], "samples": [paths[0]], "resampled": [join(paths)], "mixed": [join(paths), join(other)]}[mode]
    sources = make_sources(specs, weights=[1.0, 2.0] if mode == "mixed" else None)

    def loader() -> StreamLoader:
        dataset = make_dataset(sources, tok, train=True, num_workers=num_workers, batch_size=3, shuffle_buffer=5,
                               resampled=mode == "resampled", epoch_samples=60, seed=7)
        return StreamLoader(dataset, num_workers=num_workers, epoch_fn=lambda: 1)

    whole = list(loader())
    assert len(whole) >= 8
    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = first.state_dict()
    del it
    resumed = loader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(head) + len(rest) == len(whole)
    for got, want in zip(head + rest, whole):
        assert got["sample_id"] == want["sample_id"]
        assert torch.equal(got["image"], want["image"])  # same crops: the generator was restored
    saved = {g: {k: v for k, v in p.items() if k != "generator"} for g, p in resumed.state_dict()["workers"].items()}
    assert saved == loader_positions(whole)


def loader_positions(batches) -> dict:
    positions = {}
    for b in batches:
        s = b["data_stats"]
        positions[s["worker"]] = {"raw": s["raw"], "batches": s["batches"], "samples": s["samples"], "skipped": s["skipped"]}
    return positions
