"""The synthetic world's text: the corpus the embedded language model is trained on.

A document is one scene's text: a caption, then its conversation (long-form questions and
answers, then the VQA questions with their short answers) in the Vicuna chat template (``USER: ...
ASSISTANT: ...</s>``), so the embedded LM is a small chat model, as Vicuna is to LLaVA. Scenes are drawn from the world's generator with a seed of their own
(``seed``), so the language model never reads the text of the image world's scenes; the val and
test documents are held out for perplexity.

:class:`WorldTextDataModule` writes the documents (``{train,val,test}.jsonl``) and a byte-level BPE
tokenizer trained on the train documents (``tokenizer/``, a Hugging Face tokenizer folder) under
``root`` once, then serves padded token batches (``text_ids``, ``text_mask``, ``sample_id``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lit_vlm.datamodules import synth
from lit_vlm.datamodules.instructions import conversation
from lit_vlm.datamodules.templates import render_text
from lit_vlm.errors import UserError
from lit_vlm.io import write_json_atomic

SPLITS = ("train", "val", "test")
#: Special tokens of the trained tokenizer (LLaMA's names; ``<pad>`` added).
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
_SPLIT_OFFSET = {"train": 0, "val": 10_000_000, "test": 20_000_000}


def document(seed: int, index: int, config: synth.SynthConfig | None = None) -> str:
    """One scene's text (see the module docstring); ``index`` selects the scene."""
    config = config or synth.SynthConfig()
    scene_rng, _, caption_rng, question_rng, _, chat_rng = synth._streams(seed, "train", index)
    scene = synth.make_scene(scene_rng, config, allow_holdout=True)
    caption = synth.captions(scene, caption_rng, 1)[0]
    turns = conversation(scene, chat_rng, synth.questions(scene, question_rng, config.min_questions, config.max_questions))
    return f"{caption[0].upper()}{caption[1:]}\n{render_text(turns, 'chat', SPECIALS['eos_token'])}"


def train_tokenizer(texts: list[str], vocab_size: int, folder: str | os.PathLike) -> None:
    """A byte-level BPE tokenizer (GPT-2's pre-tokenisation, LLaMA's special-token names) trained
    on ``texts``, saved as a Hugging Face tokenizer folder that ``AutoTokenizer`` loads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=SPECIALS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = list(SPECIALS.values())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    bos = SPECIALS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, backend.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIALS)
    fast.save_pretrained(str(folder))


class WorldTextDataModule(pl.LightningDataModule):
    """The synthetic world's text as language-model batches (see the module docstring).

    Args:
        root: Folder for the documents and the tokenizer (written on first use).
        num_train: Training documents.
        num_val: Held-out documents for validation perplexity.
        num_test: Held-out documents for test perplexity.
        seed: Seed of the documents' scenes (another than the image world's, whose seed is 0).
        tokenizer: A Hugging Face tokenizer folder to use instead of training one (then
            ``vocab_size`` is the folder's).
        vocab_size: Size of the trained BPE vocabulary.
        context_length: Longest sequence, in tokens (longer documents are cut).
        batch_size: Training documents per batch.
        eval_batch_size: Documents per val/test batch.
        num_workers: DataLoader workers (tokenised documents are held in memory: 0 is fine).
    """

    def __init__(
        self,
        root: str = "data/world-text",
        num_train: int = 40000,
        num_val: int = 1000,
        num_test: int = 1000,
        seed: int = 1,
        tokenizer: str | None = None,
        vocab_size: int = 1024,
        context_length: int | None = 256,
        batch_size: int = 64,
        eval_batch_size: int = 128,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for name in ("num_train", "num_val", "num_test", "batch_size", "eval_batch_size"):
            if getattr(self.hparams, name) < 1:
                raise UserError(f"data {name} must be >= 1, got {getattr(self.hparams, name)}")
        self.root = Path(root)
        self.context_length = context_length or 256
        own = self.root / "tokenizer"  # where the trained tokenizer goes (the CLI may write it back as given)
        self.trains_tokenizer = not tokenizer or Path(tokenizer).resolve() == own.resolve()
        self.tokenizer = str(own) if self.trains_tokenizer else str(tokenizer)
        self._vocab_size = vocab_size
        self._data: dict[str, list[list[int]]] = {}

    # ---- values linked to the model ------------------------------------------------------------
    def _hf_tokenizer(self):
        from transformers import PreTrainedTokenizerFast

        try:
            return PreTrainedTokenizerFast.from_pretrained(self.tokenizer, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"data tokenizer={self.tokenizer!r}: cannot load a Hugging Face tokenizer folder there ({exc})") from exc

    @property
    def vocab_size(self) -> int | None:
        """Rows of the model's embedding table: the trained tokenizer's maximum size (BPE may stop
        short of it; language models often keep spare rows), or a given tokenizer's size."""
        if self.trains_tokenizer:
            return self._vocab_size
        return len(self._hf_tokenizer()) if (Path(self.tokenizer) / "tokenizer.json").is_file() else None

    @property
    def pad_id(self) -> int | None:
        if self.trains_tokenizer:
            return list(SPECIALS).index("pad_token")  # the trained tokenizer's specials come first, in order
        return self._hf_tokenizer().pad_token_id if (Path(self.tokenizer) / "tokenizer.json").is_file() else None

    # ---- files ---------------------------------------------------------------------------------
    def _wanted(self) -> dict[str, Any]:
        keys = ("num_train", "num_val", "num_test", "seed")
        return {"format": "lit-vlm-world-text", "version": 2, **{k: self.hparams[k] for k in keys},
                "trained_tokenizer_size": self._vocab_size if self.trains_tokenizer else None,
                "world_version": synth.VERSION}

    def prepare_data(self) -> None:
        manifest = self.root / "manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text()) == self._wanted():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        manifest.unlink(missing_ok=True)
        docs = {}
        for split in SPLITS:
            n = self.hparams[f"num_{split}"]
            docs[split] = [document(self.hparams.seed, _SPLIT_OFFSET[split] + i) for i in range(n)]
            tmp = self.root / f".{split}.jsonl.tmp"
            tmp.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(docs[split])))
            os.replace(tmp, self.root / f"{split}.jsonl")
        if self.trains_tokenizer:
            train_tokenizer(docs["train"], self.hparams.vocab_size, self.root / "tokenizer")
        write_json_atomic(manifest, self._wanted(), indent=2)

    def setup(self, stage: str | None = None) -> None:
        if self._data:
            return
        tok = self._hf_tokenizer()
        if tok.bos_token_id is None or tok.eos_token_id is None or tok.pad_token_id is None:
            raise UserError(f"data tokenizer={self.tokenizer!r}: a language model tokenizer needs start, end and pad tokens")
        for split in SPLITS:
            texts = [json.loads(line)["text"] for line in (self.root / f"{split}.jsonl").read_text().splitlines()]
            ids = tok(texts, add_special_tokens=False).input_ids
            L = self.context_length - 2
            self._data[split] = [[tok.bos_token_id, *row[:L], tok.eos_token_id] for row in ids]
        self._pad = tok.pad_token_id

    # ---- batches -------------------------------------------------------------------------------
    def _collate(self, items: list[tuple[int, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(row) for _, row in items)
        ids = torch.full((len(items), length), self._pad, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.bool)
        for i, (_, row) in enumerate(items):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = True
        return {"text_ids": ids, "text_mask": mask, "sample_id": torch.tensor([k for k, _ in items])}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        items = list(enumerate(self._data[split]))
        size = self.hparams.batch_size if split == "train" else self.hparams.eval_batch_size
        return DataLoader(items, batch_size=size, shuffle=shuffle, collate_fn=self._collate,
                          num_workers=self.hparams.num_workers, drop_last=split == "train")

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


__all__ = ["WorldTextDataModule", "document", "train_tokenizer"]
