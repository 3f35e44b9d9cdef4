"""Instruction data: LLaVA conversations with images, from shards or from LLaVA's own JSON.

A training sample is an image (or none: LLaVA's mixture has text-only conversations) and a
conversation in LLaVA's format, read from the sample's JSON under ``conversations`` (the synthetic
world writes ``conversations`` and, for stage 1, ``pretrain_conversations``). The decoder writes it
in the chosen template (:mod:`lit_vlm.datamodules.templates`) and tokenises it; a conversation that
cannot be encoded is skipped and counted by reason (``conversation_bad_roles``,
``conversation_empty_turn``, ``conversation_image_count``, ``conversation_truncated_targets``).
Evaluation batches are the image-text ones (captions, VQA questions), so the captioning, VQA and
POPE callbacks run unchanged.

LLaVA's JSON (a list of ``{"id", "image", "conversations"}``, ``image`` relative to an image folder)
is read as it is: :func:`convert_llava` (``lit-vlm data llava``) writes it into shards, with the
images packed or left in place; :class:`ConversationDataModule` given ``llava_json`` and
``image_folder`` does that once, images left in place, into its ``root``, and streams from there.
Records that cannot be used (not an object, no conversation list, turns that do not alternate,
``<image>`` without an image or an image without ``<image>``, an image path outside the folder, a
missing or unreadable image) are left out and listed in the conversion report.

Batch (training): ``image [B, 3, H, W]`` (zeros for text-only rows), ``has_image [B]`` bool,
``chat_ids [B, L]`` (``IMAGE_TOKEN_INDEX`` at each ``<image>``, ``pad_id`` after the end),
``chat_labels [B, L]`` (``IGNORE_INDEX`` except on the answers), ``chat_mask [B, L]``,
``sample_id``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lit_vlm.datamodules import convert
from lit_vlm.datamodules.image_text import (
    IMAGE_TEXT_SKIP_REASONS,
    ImageTextCollator,
    ImageTextCorpus,
    ImageTextDataModule,
    ImageTextDecoder,
)
from lit_vlm.datamodules.templates import IMAGE, REASONS, ConversationError, check_turns, encode_conversation, get_template
from lit_vlm.datamodules.transforms import BadSample, Compose, decode_image
from lit_vlm.errors import UserError
from lit_vlm.modules.language_model import IGNORE_INDEX

CONVERSATION_SKIP_REASONS = tuple(f"conversation_{r}" for r in REASONS)


class PadToSquare:
    """LLaVA's ``pad`` aspect ratio: the image centred on a square of ``fill`` (the mean colour),
    so nothing is cropped away."""

    def __init__(self, fill: tuple[int, int, int]) -> None:
        self.fill = tuple(int(c) for c in fill)

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if w == h:
            return img
        side = max(w, h)
        out = Image.new(img.mode, (side, side), self.fill)
        out.paste(img, ((side - w) // 2, (side - h) // 2))
        return out


class ConversationDecoder(ImageTextDecoder):
    """A raw sample -> ``{"image", "has_image", "chat_ids", "chat_labels"}`` (see the module docstring)."""

    def __init__(self, transform: Compose, *, tokenizer: Any, template: str, key: str, max_length: int,
                 image_size: int, **kwargs: Any) -> None:
        super().__init__(transform, train=True, **kwargs)
        self.tokenizer, self.template, self.key = tokenizer, template, key
        self.max_length, self.image_size = max_length, image_size

    def __call__(self, raw: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        meta = self._metadata(raw)
        turns = meta.get(self.key)
        if not isinstance(turns, list):
            raise BadSample("bad_json", f"json {self.key!r} is {type(turns).__name__}, not a list of turns")
        has_image = any(k in raw for k in self.image_keys) or "image_path" in meta
        try:
            ids, labels = encode_conversation(turns, self.tokenizer, self.template, int(has_image), self.max_length)
        except ConversationError as exc:
            raise BadSample(f"conversation_{exc.reason}", str(exc)) from exc
        if has_image:
            source = self._image_source(raw, meta)
            data = self._read_image_file(source) if isinstance(source, Path) else source
            image = self.transform(decode_image(data, self.max_pixels, self.draft_size), generator)
        else:
            image = torch.zeros(3, self.image_size, self.image_size)
        return {"image": image, "has_image": has_image, "chat_ids": ids, "chat_labels": labels}


class ConversationCollator:
    """Pad conversations into the training batch (see the module docstring)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {"image": torch.stack([s["image"] for s in samples]),  # [B, 3, H, W]
                **pad_chats(samples, self.pad_id), "sample_id": [s["__key__"] for s in samples]}


def pad_chats(samples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Encoded conversations -> ``chat_ids``, ``chat_labels`` (-100 on padding), ``chat_mask``
    [B, L] (right-padded) and ``has_image`` [B]."""
    L = max(len(s["chat_ids"]) for s in samples)
    ids = torch.full((len(samples), L), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), L), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), L), dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s["chat_ids"])
        ids[i, :n] = torch.tensor(s["chat_ids"])
        labels[i, :n] = torch.tensor(s["chat_labels"])
        mask[i, :n] = True
    return {"has_image": torch.tensor([s["has_image"] for s in samples]),  # [B]
            "chat_ids": ids, "chat_labels": labels, "chat_mask": mask}  # [B, L]


class ConversationCorpus(ImageTextCorpus):
    """Conversations for training, image-text samples for evaluation (see the module docstring).

    Args:
        conversations: The JSON key holding the training conversation.
        template: Conversation template (``plain``, ``chat``, ``chatml``).
        pad_square: Pad images to a square of the mean colour before resizing (LLaVA's ``pad``).
        **kwargs: :class:`ImageTextCorpus`'s arguments.
    """

    def __init__(self, conversations: str = "conversations", template: str = "chat", pad_square: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        get_template(template)
        self.conversations, self.template, self.pad_square = conversations, template, pad_square
        self.skip_reasons = IMAGE_TEXT_SKIP_REASONS + CONVERSATION_SKIP_REASONS

    def _padded(self, decoder: ImageTextDecoder) -> ImageTextDecoder:
        if self.pad_square:
            fill = tuple(round(255 * m) for m in self.mean)
            decoder.transform = Compose([PadToSquare(fill), *decoder.transform.transforms])
        return decoder

    def decoder(self, split):
        base = super().decoder(split)
        if not split.train:
            return self._padded(base)
        return self._padded(ConversationDecoder(
            base.transform, tokenizer=self.tokenizer, template=self.template, key=self.conversations,
            max_length=self.context_length, image_size=self.image_size, image_keys=self.image_keys,
            max_pixels=self.max_image_pixels, draft_size=base.draft_size, image_root=base.image_root,
        ))  # fmt: skip

    def collator(self, split):
        if not split.train:
            return ImageTextCollator(self.tokenizer, self.context_length, train=False)
        return ConversationCollator(self.tokenizer.pad_id)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "conversations": self.conversations, "template": self.template,
                "pad_square": self.pad_square}


class ConversationDataModule(ImageTextDataModule):
    """Instruction tuning data (LLaVA): :class:`ConversationCorpus` on the shard DataModule.

    Args:
        conversations: JSON key of each sample's conversation: ``conversations`` (the synthetic
            world's multi-turn instructions, LLaVA's JSON) or ``pretrain_conversations`` (the world's
            stage-1 caption pairs).
        template: Conversation template: ``plain`` (stage 1), ``chat`` (Vicuna v1) or ``chatml``.
        pad_square: Pad images to a square of the mean colour before resizing (LLaVA's ``pad``).
        llava_json: A LLaVA-format JSON file to train on, read as it is: converted once into
            ``root`` (images left in place; default root ``data/llava/<file name>``).
        image_folder: The folder LLaVA's ``image`` paths are relative to (with ``llava_json``).
        **kwargs: :class:`ImageTextDataModule`'s arguments (``root``, ``image_size``, ``batch_size``, ...).
    """

    def __init__(self, conversations: str = "conversations", template: str = "chat", pad_square: bool = False,
                 llava_json: str | None = None, image_folder: str | None = None, **kwargs: Any) -> None:
        if llava_json is not None:
            if image_folder is None:
                raise UserError("data llava_json needs image_folder: the folder its 'image' paths are relative to")
            if not Path(llava_json).is_file():
                raise UserError(f"data llava_json={llava_json!r} does not exist")
            kwargs.setdefault("root", None)
            if kwargs["root"] is None:
                kwargs["root"] = str(Path("data/llava") / Path(llava_json).stem)
            kwargs["synthesize"] = True  # passes the construction check; prepare_data converts, never synthesises
        super().__init__(**kwargs)
        base = self.corpus
        self.corpus = ConversationCorpus(
            conversations, template, pad_square, image_size=base.image_size, mean=base.mean, std=base.std,
            train_crop_scale=base.train_crop_scale, tokenizer=base.tokenizer, context_length=base.context_length,
            image_keys=";".join(base.image_keys), max_image_pixels=base.max_image_pixels, image_root=base.image_root,
            synthesize=base.synthesize and llava_json is None, synth_config=base.synth_config,
        )  # fmt: skip
        self.llava_json, self.image_folder = llava_json, image_folder
        self.hparams.update(conversations=conversations, template=template, pad_square=pad_square,
                            llava_json=llava_json, image_folder=image_folder)

    @property
    def template(self) -> str:
        """The conversation template (linked to the model's ``template``)."""
        return self.corpus.template

    def prepare_data(self) -> None:
        if self.llava_json is not None:
            source = _source_id(self.llava_json, self.image_folder)
            manifest = Path(self.root) / convert.MANIFEST
            current = json.loads(manifest.read_text()).get("llava_source") if manifest.is_file() else None
            if current != source:
                convert_llava(self.llava_json, self.image_folder, self.root, pack=False, overwrite=True)
        super().prepare_data()


# ---- LLaVA JSON -> shards -----------------------------------------------------------------------


def _source_id(json_path: str | os.PathLike, images: str | os.PathLike) -> dict[str, Any]:
    stat = Path(json_path).stat()
    return {"json": str(Path(json_path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "images": str(Path(images).resolve())}


def _llava_items(data: Any, json_path: Path, images: Path, problems: Any) -> list[convert._Item]:
    if not isinstance(data, list):
        raise convert.ConversionError(f"{json_path}: a LLaVA file is a JSON list of records, got {type(data).__name__}")
    items = []
    for index, record in enumerate(data):
        where = f"[{index}]"
        if not isinstance(record, dict):
            problems.malformed(f"{where}: a {type(record).__name__}, not an object")
            continue
        where = f"[{index}] (id {record.get('id')!r})"
        turns, rel = record.get("conversations"), record.get("image")
        if rel is not None and (not isinstance(rel, str) or not rel.strip()):
            problems.malformed(f"{where}: 'image' is {rel!r}, not a path")
            continue
        if not isinstance(turns, list):
            problems.malformed(f"{where}: 'conversations' is missing or not a list")
            continue
        try:
            check_turns(turns, int(rel is not None))
        except ConversationError as exc:
            problems.malformed(f"{where}: {exc}")
            continue
        if rel is not None and not convert._inside(rel):
            problems.outside(rel)
            continue
        key = f"{index:09d}"
        text = next((t["value"].replace(IMAGE, "").strip() for t in turns[1::2]), None)
        record_out = {"key": key, "id": record.get("id", index), "conversations": turns}
        items.append(convert._Item(key=key, image=None if rel is None else images / rel, rel=rel or "",
                                   record=record_out, text=text))
    return items


def convert_llava(json_path: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike, *,
                  split: str = "train", pack: bool = True, strict: bool = False, shard_size: int = 1000,
                  verify: bool = False, overwrite: bool = False, progress: bool = True) -> convert.ConversionReport:
    """Convert a LLaVA-format JSON file and its image folder into shards of ``split`` (each sample:
    the image, ``KEY.txt`` = the first answer, ``KEY.json`` with ``id`` and ``conversations``).
    Unusable records are left out and reported (see the module docstring); ``strict`` fails on the
    first. Returns the report (also ``out/reports/llava.json``)."""
    json_path, images, out = Path(json_path), Path(images), Path(out)
    convert._check_common(images, shard_size)
    report = convert.ConversionReport(kind="llava", dataset=json_path.stem, out=str(out), packed=pack)
    problems = convert._Problems(report, strict, progress)
    convert._log(progress, f"reading {json_path}")
    items = _llava_items(convert._read_json(json_path, "LLaVA conversation file"), json_path, images, problems)
    output = convert._Output(out, [split], overwrite, progress)
    try:
        written, shards = convert._write_split(output, split, items, pack=pack, verify=verify, shard_size=shard_size,
                                               problems=problems, progress=progress)
        report.samples[split] = len(written)
        text_only = sum(1 for i in items if i.image is None)
        if text_only:
            report.notes.append(f"{text_only} text-only records (no image) kept")
        entry = convert._split_entry(shards, written, {"source": "llava", "llava_file": str(json_path.resolve())},
                                     pack, images)
        output.commit({split: entry}, {}, "llava", report,
                      {"created_by": "lit-vlm data llava", "llava_source": _source_id(json_path, images)})
    except BaseException:
        output.abort()
        raise
    return report


def llava_main(argv: list[str] | None = None) -> int:
    """``lit-vlm data llava``: convert a LLaVA JSON file; return an exit code."""
    parser = argparse.ArgumentParser(
        prog="lit-vlm data llava",
        description="Convert LLaVA-format instruction data (a JSON list of {id, image, conversations}) and its "
                    "images into webdataset shards and a manifest; unusable records are left out and reported.")
    parser.add_argument("--json", required=True, help="LLaVA JSON file, e.g. llava_v1_5_mix665k.json")
    parser.add_argument("--images", required=True, help="the folder the records' 'image' paths are relative to")
    parser.add_argument("--split", default="train", choices=convert.SPLITS, help="split to write (default: train)")
    convert._common_flags(parser)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        report = convert_llava(args.json, args.images, args.out, split=args.split, pack=args.pack, strict=args.strict,
                               shard_size=args.shard_size, verify=args.verify, overwrite=args.overwrite,
                               progress=not args.quiet)
    except convert.ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    print(f"done in {time.perf_counter() - start:.1f}s; manifest: {Path(report.out) / convert.MANIFEST}")
    return 0


__all__ = ["CONVERSATION_SKIP_REASONS", "ConversationCorpus", "ConversationDataModule", "PadToSquare", "convert_llava", "pad_chats",
           "llava_main"]
