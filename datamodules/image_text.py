"""Image-text pairs from webdataset shards: the synthetic world, converted corpora, img2dataset.

Shards use the img2dataset layout -- per sample ``KEY.jpg`` (or ``.jpeg``/``.png``/``.webp``),
``KEY.txt`` (one caption) and optionally ``KEY.json`` (``"captions"``: all captions, ``"label"``:
class index, ``"image_id"``, ``"questions"``, ...).  :class:`ImageTextCorpus` decodes and collates
them (:class:`ImageTextDecoder`, :class:`ImageTextCollator`); :class:`ImageTextDataModule` is that
corpus on the generic :class:`~lit_vlm.datamodules.shards.ShardDataModule`, with one flat set of
options for YAML.  Batches follow :mod:`lit_vlm.datamodules.batch`.

Images stay where they are or are packed into the shards; the user chooses.  A sample without
an image member but with a JSON ``"image_path"`` is read from that file: an absolute path, or a
path relative to ``image_root`` (the DataModule argument, else the split's ``image_root`` in
``root``'s manifest, as ``lit-vlm data karpathy --no-pack`` writes it).  An image member, when
present, wins.

A malformed ``"questions"`` (not a list, an entry without an integer ``question_id`` or a string
``question``) or ``"image_id"`` (neither an integer nor a string), a ``"captions"`` that is not a
list of strings, a ``"caption"`` that is not a string or a ``"label"`` that is not an integer
makes the sample bad (``bad_json``); :data:`IMAGE_TEXT_SKIP_REASONS` lists every reason.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lit_vlm.datamodules import convert, manifests, negatives, synth
from lit_vlm.datamodules.corpus import Corpus, Split
from lit_vlm.datamodules.shards import ShardDataModule, TextFacts
from lit_vlm.datamodules.stream import BadSample
from lit_vlm.datamodules.tokenizer import Tokenizer
from lit_vlm.datamodules.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MAX_PIXELS,
    Compose,
    decode_image,
    eval_transform,
    train_transform,
)
from lit_vlm.errors import UserError

__all__ = [
    "EVAL_ANNOTATION_KINDS",
    "IMAGE_TEXT_SKIP_REASONS",
    "ImageTextCollator",
    "ImageTextCorpus",
    "ImageTextDataModule",
    "ImageTextDecoder",
]

logger = logging.getLogger("lit_vlm.data")

_CAPTION_SAMPLING = ("random", "first")
DEFAULT_CONTEXT_LENGTH = 32

IMAGE_TEXT_SKIP_REASONS: tuple[str, ...] = (
    "image_decode",
    "image_too_large",
    "missing_image",
    "missing_caption",
    "empty_caption",
    "bad_text",
    "bad_json",
)
"""Reasons :class:`ImageTextDecoder` skips a sample for (the stream adds ``tar_error`` and ``duplicate_key``)."""


# --------------------------------------------------------------------------------------------
# Per-sample decoding and batch collation (run inside the DataLoader workers)
# --------------------------------------------------------------------------------------------


class ImageTextDecoder:
    """Turn a raw webdataset sample into ``{"image", "caption", "label"}`` (training) or
    ``{"image", "captions", "label", "image_id", "questions"}`` (evaluation).

    Cheap checks come first so that bad samples cost little: JSON parsing (``bad_json``), image
    member lookup or the JSON ``image_path`` file's existence (``missing_image``), in evaluation
    the ``image_id`` and ``questions`` fields (``bad_json``), captions (``missing_caption``,
    ``empty_caption``, and ``bad_text`` for a ``.txt`` that is not UTF-8), and finally the image
    itself (``image_decode`` -- also for an ``image_path`` file that cannot be read --,
    ``image_too_large``).  Each failure raises :class:`BadSample`.

    Args:
        transform: Image transform (PIL in, tensor out; receives the worker's generator).
        train: Pick one caption (training) or keep all of them (evaluation).
        image_keys: Member extensions tried in order for the image.
        caption_sampling: ``"random"`` or ``"first"`` caption of the JSON ``"captions"``.
        max_pixels: Decompression-bomb limit, see :func:`decode_image`.
        draft_size: JPEG draft size hint, see :func:`decode_image`.
        require_caption: Skip samples without a caption (False for prediction).  In evaluation
            a sample with questions needs no caption.
        image_root: Folder that a relative JSON ``image_path`` is resolved against (samples
            stored without image bytes); ``None``: only absolute paths can be read.
        train_vqa: In training, also draw this many of the sample's questions (distinct, at
            random; all of them when it has fewer) with their answers (``"qa"``: a list of
            ``(question, answer)``; see :meth:`_train_questions`); ``True`` is 1, ``False`` 0.
    """

    def __init__(
        self,
        transform: Compose,
        *,
        train: bool,
        image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        caption_sampling: str = "random",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        draft_size: int | None = None,
        require_caption: bool = True,
        image_root: str | None = None,
        train_vqa: bool | int = False,
        hard_negatives: int = 0,
        negative_kinds: Sequence[str] = negatives.NEGATIVE_KINDS,
    ) -> None:
        if caption_sampling not in _CAPTION_SAMPLING:
            raise UserError(f"caption_sampling must be one of {_CAPTION_SAMPLING}, got {caption_sampling!r}")
        self.transform = transform
        self.train = train
        self.image_keys = tuple(image_keys)
        self.caption_sampling = caption_sampling
        self.max_pixels = max_pixels
        self.draft_size = draft_size
        self.require_caption = require_caption
        self.image_root = None if image_root is None else Path(image_root)
        self.train_vqa = int(train_vqa)
        self.hard_negatives = int(hard_negatives)
        self.negative_kinds = list(negative_kinds)

    @staticmethod
    def _train_questions(meta: dict[str, Any], generator: torch.Generator, k: int) -> list[tuple[str, str]]:
        """Up to ``k`` distinct random ``(question, answer)`` pairs of the JSON ``questions``: the
        answer is the entry's ``multiple_choice_answer``, else the most common of its ``answers``
        (strings or VQAv2 ``{"answer": ...}`` objects). Empty when the sample has no answered
        question."""
        listed = meta.get("questions")
        if listed is None:
            return []
        if not isinstance(listed, list):
            raise BadSample("bad_json", f"json 'questions' is a {type(listed).__name__}, not a list")
        pairs = []
        for i, entry in enumerate(listed):
            if not isinstance(entry, dict) or not isinstance(entry.get("question"), str):
                raise BadSample("bad_json", f"json 'questions'[{i}] has no string 'question'")
            answer = entry.get("multiple_choice_answer")
            if answer is None and isinstance(entry.get("answers"), list) and entry["answers"]:
                given = [a.get("answer") if isinstance(a, dict) else a for a in entry["answers"]]
                given = [a for a in given if isinstance(a, str) and a.strip()]
                answer = Counter(given).most_common(1)[0][0] if given else None
            if answer is None:
                continue
            if not isinstance(answer, str):
                raise BadSample("bad_json", f"json 'questions'[{i}] answer is {answer!r}, not a string")
            if entry["question"].strip() and answer.strip():
                pairs.append((entry["question"].strip(), answer.strip()))
        order = torch.randperm(len(pairs), generator=generator)[:k].tolist()
        return [pairs[i] for i in order]

    @staticmethod
    def _metadata(raw: dict[str, Any]) -> dict[str, Any]:
        data = raw.get("json")
        if data is None:
            return {}
        try:
            meta = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadSample("bad_json", f"json member does not parse: {exc}") from exc
        if not isinstance(meta, dict):
            raise BadSample("bad_json", f"json member is a {type(meta).__name__}, not an object")
        return meta

    def _image_source(self, raw: dict[str, Any], meta: dict[str, Any]) -> bytes | Path:
        """The image member's bytes, else the existing file named by the JSON ``image_path``."""
        data = next((raw[key] for key in self.image_keys if key in raw), None)
        if data is not None:
            return data
        if "image_path" not in meta:
            raise BadSample(
                "missing_image", f"no member with extension {'/'.join(self.image_keys)} and no json 'image_path'"
            )
        name = meta["image_path"]
        if not isinstance(name, str) or not name.strip():
            raise BadSample("bad_json", f"json 'image_path' is {name!r}, not a non-empty string")
        path = Path(name)
        if not path.is_absolute():
            if self.image_root is None:
                raise BadSample("missing_image", f"json image_path {name!r} is relative and no image_root is set")
            path = self.image_root / path
        if not path.is_file():
            raise BadSample("missing_image", f"image file {str(path)!r} (json image_path) does not exist")
        return path

    @staticmethod
    def _read_image_file(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise BadSample("missing_image", f"image file {str(path)!r} disappeared: {exc}") from exc
        except OSError as exc:
            raise BadSample("image_decode", f"cannot read image file {str(path)!r}: {exc}") from exc

    @staticmethod
    def _image_id(meta: dict[str, Any]) -> int | str | None:
        """JSON ``image_id`` (an int or a non-empty string), ``None`` when absent."""
        image_id = meta.get("image_id")
        if image_id is None:
            return None
        if isinstance(image_id, bool) or not isinstance(image_id, (int, str)) or image_id == "":
            raise BadSample("bad_json", f"json 'image_id' is {image_id!r}, not an integer or a non-empty string")
        return image_id

    @staticmethod
    def _questions(meta: dict[str, Any]) -> list[tuple[int, str, str | None]]:
        """``(question_id, question, multiple_choice_answer or None)`` of each entry of the JSON
        ``questions`` list (``[]`` if absent)."""
        listed = meta.get("questions")
        if listed is None:
            return []
        if not isinstance(listed, list):
            raise BadSample("bad_json", f"json 'questions' is a {type(listed).__name__}, not a list")
        result: list[tuple[int, str, str | None]] = []
        seen: set[int] = set()
        for i, entry in enumerate(listed):
            if not isinstance(entry, dict):
                raise BadSample("bad_json", f"json 'questions'[{i}] is a {type(entry).__name__}, not an object")
            qid, text = entry.get("question_id"), entry.get("question")
            if not isinstance(qid, int) or isinstance(qid, bool):
                raise BadSample("bad_json", f"json 'questions'[{i}] 'question_id' is {qid!r}, not an integer")
            if not isinstance(text, str) or not text.strip():
                raise BadSample("bad_json", f"json 'questions'[{i}] 'question' is {text!r}, not a non-empty string")
            if qid in seen:
                raise BadSample("bad_json", f"json 'questions' repeats question_id {qid}")
            seen.add(qid)
            answer = entry.get("multiple_choice_answer")
            result.append((qid, text.strip(), answer.strip() if isinstance(answer, str) else None))
        return result

    def _captions(self, raw: dict[str, Any], meta: dict[str, Any], required: bool) -> list[str]:
        """All usable captions: JSON ``captions``, else the ``.txt`` member, else JSON ``caption``."""
        listed = meta.get("captions")
        if listed is not None and not isinstance(listed, list):
            raise BadSample("bad_json", f"json 'captions' is a {type(listed).__name__}, not a list of strings")
        if listed:
            wrong = next((c for c in listed if not isinstance(c, str)), None)
            if wrong is not None:
                raise BadSample("bad_json", f"json 'captions' holds a {type(wrong).__name__}, not only strings")
            captions = [c.strip() for c in listed if c.strip()]
            if not captions:
                raise BadSample("empty_caption", "every entry of json 'captions' is empty")
            return captions
        if "txt" in raw:
            try:
                text = raw["txt"].decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise BadSample("bad_text", f"txt member is not valid UTF-8: {exc}") from exc
            if not text:
                raise BadSample("empty_caption", "txt member is empty")
            return [text]
        single = meta.get("caption")
        if single is not None and not isinstance(single, str):
            raise BadSample("bad_json", f"json 'caption' is a {type(single).__name__}, not a string")
        if isinstance(single, str):
            if not single.strip():
                raise BadSample("empty_caption", "json 'caption' is empty")
            return [single.strip()]
        if required:
            raise BadSample("missing_caption", "no txt member and no captions in the json")
        return []

    @staticmethod
    def _stored_negatives(meta: dict[str, Any], captions: list[str], index: int) -> dict[str, str] | None:
        """The JSON ``negatives`` of caption ``index`` (the synthetic world's, exact), if the sample has them."""
        stored = meta.get("negatives")
        if not isinstance(stored, list) or len(stored) != len(captions) or not isinstance(stored[index], dict):
            return None
        return {k: v for k, v in stored[index].items() if isinstance(v, str)}

    def __call__(self, raw: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        meta = self._metadata(raw)
        source = self._image_source(raw, meta)
        if self.train:
            captions = self._captions(raw, meta, self.require_caption)
        else:
            image_id = self._image_id(meta)
            questions = self._questions(meta)
            captions = self._captions(raw, meta, self.require_caption and not questions)
        image_bytes = self._read_image_file(source) if isinstance(source, Path) else source
        image = self.transform(decode_image(image_bytes, self.max_pixels, self.draft_size), generator)
        label = meta.get("label")
        if label is None:
            label = -1
        elif isinstance(label, bool) or not isinstance(label, int):
            raise BadSample("bad_json", f"json 'label' is {label!r}, not an integer class index")
        if self.train:
            index = 0
            if self.caption_sampling == "random" and len(captions) > 1:
                index = int(torch.randint(len(captions), (1,), generator=generator))
            caption = captions[index]
            sample = {"image": image, "caption": caption, "label": label}
            if self.hard_negatives:
                sample["negatives"] = negatives.pick(caption, self._stored_negatives(meta, captions, index),
                                                     self.hard_negatives, self.negative_kinds, generator)
            if self.train_vqa:
                sample["qa"] = self._train_questions(meta, generator, self.train_vqa)
            return sample
        return {"image": image, "captions": captions, "label": label, "image_id": image_id, "questions": questions}


class ImageTextCollator:
    """Stack decoded samples into a batch (:class:`~lit_vlm.datamodules.batch.ImageTextBatch` or
    :class:`~lit_vlm.datamodules.batch.ImageTextEvalBatch`).

    Args:
        tokenizer: Text tokenizer.
        context_length: Token rows are padded/truncated to this length.
        train: Training layout (one caption per image) or evaluation layout (all captions).
    """

    def __init__(self, tokenizer: Tokenizer, context_length: int, train: bool, hard_negatives: int = 0) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.train = train
        self.hard_negatives = hard_negatives

    def media(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """The batch's media (a corpus of other media overrides this; the text is the same)."""
        return {"image": torch.stack([s["image"] for s in samples])}  # [B, 3, H, W]

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {**self.media(samples), "sample_id": [s["__key__"] for s in samples]}
        if self.train:
            batch["text_ids"], batch["text_mask"] = self.tokenizer.encode(
                [s["caption"] for s in samples], self.context_length
            )
            if self.hard_negatives:  # K rows per image, empty ones masked out (the same K on every rank)
                k = self.hard_negatives
                texts = [(s.get("negatives") or [])[:k] for s in samples]
                padded = [t for row in texts for t in row + [""] * (k - len(row))]
                ids, mask = self.tokenizer.encode(padded, self.context_length)  # [B*K, L]
                batch["negative_ids"] = ids.view(len(samples), k, -1)  # [B, K, L]
                batch["negative_mask"] = mask.view(len(samples), k, -1)  # [B, K, L]
                batch["negative_valid"] = torch.tensor([[j < len(row) for j in range(k)] for row in texts])  # [B, K]
            if any("qa" in s for s in samples):
                qa = [(row, pair) for row, s in enumerate(samples) for pair in s.get("qa") or []]
                batch["question"] = [q for _, (q, _) in qa]
                batch["answer"] = [a for _, (_, a) in qa]
                batch["qa_ids"], batch["qa_mask"], batch["qa_answer_mask"] = self.tokenizer.encode_pairs(
                    batch["question"], batch["answer"], self.context_length
                )  # [Q, L] each
                batch["qa_owner"] = torch.tensor([row for row, _ in qa], dtype=torch.long)  # [Q]
            return batch
        first = [s["captions"][0] if s["captions"] else "" for s in samples]
        batch["text_ids"], batch["text_mask"] = self.tokenizer.encode(first, self.context_length)
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
        every = [c for s in samples for c in s["captions"]]
        owner = [row for row, s in enumerate(samples) for _ in s["captions"]]
        batch["caption_ids"], batch["caption_mask"] = self.tokenizer.encode(every, self.context_length)  # [N, L]
        batch["caption_owner"] = torch.tensor(owner, dtype=torch.long)  # [N]
        batch["captions"] = [list(s["captions"]) for s in samples]
        batch["image_id"] = [s["__key__"] if s.get("image_id") is None else s["image_id"] for s in samples]
        questions = [(row, *q) for row, s in enumerate(samples) for q in s.get("questions", ())]
        batch["question"] = [text for _, _, text, _ in questions]
        batch["question_id"] = [qid for _, qid, _, _ in questions]
        batch["question_answer"] = [answer for _, _, _, answer in questions]
        batch["question_owner"] = torch.tensor([row for row, _, _, _ in questions], dtype=torch.long)  # [Q]
        return batch


# --------------------------------------------------------------------------------------------
# The corpus and its DataModule
# --------------------------------------------------------------------------------------------


#: Keys of :meth:`ImageTextDataModule.eval_annotations` and the manifest entry name of each
#: (``{split}`` is ``val`` or ``test``), as the synthetic world and the converters write them.
EVAL_ANNOTATION_KINDS: dict[str, str] = {
    "captions": "captions_{split}",
    "vqa_questions": "vqa_{split}_questions",
    "vqa_annotations": "vqa_{split}_annotations",
    "compositional": "compositional_{split}",
    "pope": "pope_{split}",
}


class ImageTextCorpus(Corpus):
    """Image-text pairs (with optional labels and VQA questions): the synthetic world, converted
    datasets and img2dataset shards. The arguments are :class:`ImageTextDataModule`'s of the same
    names; the tokenizer is loaded here, so ``vocab_size`` and ``pad_id`` are known before any data
    exists."""

    skip_reasons = IMAGE_TEXT_SKIP_REASONS
    manifest_formats = (synth.FORMAT, convert.FORMAT)
    annotation_kinds = EVAL_ANNOTATION_KINDS

    def __init__(
        self,
        image_size: int = 64,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        train_crop_scale: tuple[float, float] = (0.9, 1.0),
        tokenizer: str | Tokenizer | None = None,
        context_length: int | None = None,
        caption_sampling: str = "random",
        image_keys: str = "jpg;jpeg;png;webp",
        max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
        image_root: str | None = None,
        train_vqa: bool | int = False,
        hard_negatives: int = 0,
        negative_kinds: list[str] | None = None,
        synthesize: bool = True,
        synth_config: dict[str, Any] | None = None,
    ) -> None:
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.train_crop_scale = (float(train_crop_scale[0]), float(train_crop_scale[1]))
        self.context_length = DEFAULT_CONTEXT_LENGTH if context_length is None else int(context_length)
        self.caption_sampling = caption_sampling
        self.image_keys = [k.strip().lower().lstrip(".") for k in image_keys.split(";") if k.strip()]
        self.max_image_pixels = max_image_pixels
        self.image_root = None if image_root is None else str(image_root)
        if isinstance(train_vqa, bool) or train_vqa is None:
            train_vqa = int(bool(train_vqa))
        if not isinstance(train_vqa, int) or train_vqa < 0:
            raise UserError(f"data train_vqa must be true/false or a number of questions per image >= 0, got {train_vqa!r}")
        self.train_vqa = train_vqa
        if not isinstance(hard_negatives, int) or isinstance(hard_negatives, bool) or hard_negatives < 0:
            raise UserError(f"data hard_negatives must be a number of negatives per caption >= 0, got {hard_negatives!r}")
        self.hard_negatives = hard_negatives
        try:
            self.negative_kinds = negatives.check_kinds(list(negative_kinds or negatives.NEGATIVE_KINDS), "data negative_kinds")
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self.synthesize = synthesize
        self.synth_config = dict(synth_config or {})
        self._check_settings()
        if isinstance(tokenizer, Tokenizer):
            self.tokenizer = tokenizer
        else:
            try:
                self.tokenizer = Tokenizer.load(tokenizer)
            except (OSError, ValueError) as exc:
                raise UserError(f"tokenizer={tokenizer!r}: {exc}") from exc
        if self.context_length < 1 + (self.tokenizer.bos_id is not None) + (self.tokenizer.eos_id is not None):
            raise UserError(f"context_length={context_length} is too short for the start/end tokens")

    def _check_settings(self) -> None:
        if self.caption_sampling not in _CAPTION_SAMPLING:
            raise UserError(f"caption_sampling must be one of {_CAPTION_SAMPLING}, got {self.caption_sampling!r}")
        for name, value in (("image_size", self.image_size), ("context_length", self.context_length)):
            if value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise UserError(f"max_image_pixels must be >= 1 or None, got {self.max_image_pixels}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UserError(f"mean and std need 3 values each (std > 0), got mean={self.mean}, std={self.std}")
        low, high = self.train_crop_scale
        if not 0 < low <= high <= 1:
            raise UserError(f"train_crop_scale must satisfy 0 < min <= max <= 1, got {self.train_crop_scale}")
        if not self.image_keys:
            raise UserError("image_keys must name at least one extension, e.g. 'jpg;png'")
        if self.image_root is not None and not Path(self.image_root).is_dir():
            raise UserError(f"image_root={self.image_root!r} is not a folder")
        if self.synth_config:
            known = {f.name for f in dataclasses.fields(synth.SynthConfig)}
            unknown = sorted(set(self.synth_config) - known)
            if unknown:
                raise UserError(f"synth_config has unknown fields {unknown}; valid fields: {sorted(known)}")

    # ----------------------------------------------------------------------------- the dataset folder

    def check(self, root: str | None) -> None:
        """``synth_config`` needs a ``root`` that is (or will be) a synthetic world."""
        if self.synth_config and root is None:
            raise UserError("synth_config is set but root is not: the synthetic world needs a directory")
        if root is None:
            return
        kind = manifests.format_of(root)
        if kind is None and not self.synthesize:
            raise UserError(
                f"root={root!r} holds no dataset (no manifest.json) and synthesize=False; "
                "set synthesize=True to generate a synthetic world or point root at an existing dataset"
            )
        if self.synth_config and kind == convert.FORMAT:
            raise UserError(f"root={root!r} is a converted dataset, not a synthetic world: synth_config does not apply")

    def prepare(self, root: str) -> None:
        """Generate the synthetic world in ``root`` if it is missing. A converted dataset is used as
        it is; an existing world generated with other ``synth_config`` values is refused."""
        if manifests.interrupted_conversion(root):  # never synthesize over a half-written conversion
            raise UserError(f"root={root!r} holds an interrupted dataset conversion (no manifest.json); run it again")
        if manifests.format_of(root) == convert.FORMAT or not synth.is_generated(root):
            if manifests.format_of(root) is not None or not self.synthesize:
                super().prepare(root)  # checks it (or says that nothing is there)
                return
            logger.info("generating the synthetic world in %s (%s)", root, self.synth_config or "defaults")
            synth.generate(root, synth.SynthConfig(**self.synth_config))
            return
        recorded = json.loads((Path(root) / manifests.MANIFEST).read_text(encoding="utf-8"))  # any version
        if recorded.get("version") != synth.VERSION:
            logger.warning("root=%s holds a synthetic world written by an older lit-vlm (version %s; this one writes %s): "
                           "regenerating it in place", root, recorded.get("version"), synth.VERSION)
            synth.generate(root, synth.SynthConfig.from_dict(recorded["config"]))
        existing = synth.load_manifest(root).get("config", {})
        normalise = lambda value: json.loads(json.dumps(value))  # noqa: E731 - tuples vs lists
        different = {
            key: (existing.get(key), value)
            for key, value in self.synth_config.items()
            if key in existing and normalise(existing[key]) != normalise(value)
        }
        if different:
            details = ", ".join(f"{k}: on disk {old!r}, requested {new!r}" for k, (old, new) in different.items())
            raise UserError(
                f"root={root!r} already holds a world with another synth_config ({details}); use another root or delete it"
            )

    def zeroshot(self, root: str | None, manifest: dict[str, Any] | None) -> tuple[list[str] | None, list[str] | None]:
        """Zero-shot class names and templates of a dataset folder: its manifest's ``zeroshot``
        file, else its ``classnames`` / ``templates``; the generator's own before a world exists."""
        if root is None:
            return None, None
        if manifest is None:  # not generated yet: the generator's constants
            return list(synth.CLASSNAMES), list(synth.TEMPLATES)
        classnames, templates = manifest.get("classnames"), manifest.get("templates")
        if manifest.get("zeroshot"):
            path = Path(root) / manifest["zeroshot"]
            if path.is_file():
                data = read_json_object(path, "root zeroshot file")
                classnames = data.get("classnames", classnames)
                templates = data.get("templates", templates)
        return classnames, templates

    # ----------------------------------------------------------------------------- decoding

    def _image_root(self, split: Split) -> str | None:
        """``image_root``, else the split's ``image_root`` in the manifest (relative to ``root``)."""
        if self.image_root is not None:
            return self.image_root
        recorded = split.entry.get("image_root")
        if split.root is None or not isinstance(recorded, str) or not recorded:
            return None
        return str(Path(split.root) / recorded)  # an absolute recorded path stays as it is

    def decoder(self, split: Split) -> ImageTextDecoder:
        if split.train:
            transform = train_transform(self.image_size, self.mean, self.std, self.train_crop_scale)
            draft = math.ceil(self.image_size / math.sqrt(self.train_crop_scale[0]))
        else:
            transform = eval_transform(self.image_size, self.mean, self.std)
            draft = self.image_size
        return ImageTextDecoder(
            transform,
            train=split.train,
            image_keys=self.image_keys,
            caption_sampling=self.caption_sampling,
            max_pixels=self.max_image_pixels,
            draft_size=draft,
            require_caption=split.name != "predict",
            image_root=self._image_root(split),
            train_vqa=self.train_vqa if split.train else 0,
            hard_negatives=self.hard_negatives if split.train else 0,
            negative_kinds=self.negative_kinds,
        )

    def collator(self, split: Split) -> ImageTextCollator:
        return ImageTextCollator(self.tokenizer, self.context_length, train=split.train,
                                 hard_negatives=self.hard_negatives if split.train else 0)


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a file, or a :class:`UserError` naming ``what`` and the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {what} {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{what} {str(path)!r} must hold a JSON object")
    return data


class ImageTextDataModule(TextFacts, ShardDataModule):
    """Streaming image-text data (contrastive, captioning, retrieval, zero-shot, VQA): the
    :class:`ImageTextCorpus` on the generic :class:`~lit_vlm.datamodules.shards.ShardDataModule`.

    Data comes from a dataset directory (``root``) or explicit shard specs; batches follow
    :mod:`lit_vlm.datamodules.batch`. The tokenizer is loaded at construction, so ``vocab_size``,
    ``pad_id``, ``context_length`` and ``image_size`` are known before any data exists.

    Args:
        root: Directory of a synthetic world or of a converted dataset (``lit-vlm data karpathy``
            / ``vqav2``).  Its ``manifest.json`` lists the train/val/test shards and its
            evaluation annotation files; a synthetic world's ``zeroshot.json`` holds the
            zero-shot class names and templates.  If the manifest is missing and ``synthesize``
            is true, ``prepare_data`` generates a synthetic world there (never over a converted
            dataset, nor over a folder a conversion was writing when it was interrupted).
        synthesize: Generate the synthetic world in ``root`` when it does not exist yet.
        synth_config: Overrides of the synthetic world's settings (fields of
            ``synth.SynthConfig``, e.g. ``{"num_train": 5000, "image_size": 64}``).
        train_shards: Training shards, overriding ``root``'s: a spec (path, brace pattern
            ``shard-{000000..000099}.tar``, glob, directory, ``pipe:`` command or URL; several
            joined with ``::``) or a list of specs, each then a separate source mixed by
            ``train_weights``.
        train_weights: Sampling weight of each training source (one per entry of
            ``train_shards``).  Default: proportional to their sample counts when known, else
            equal.
        val_shards: Validation shards (same syntax), overriding ``root``'s.  No validation when
            neither is set.
        test_shards: Test shards (same syntax), overriding ``root``'s.
        predict_shards: Shards for ``predict`` (same syntax); default: ``root``'s test split.
            Captions are optional there.
        image_size: Side of the square images given to the model, in pixels.
        mean: Per-channel mean for normalisation (RGB in [0, 1]); default OpenAI CLIP's.
        std: Per-channel standard deviation for normalisation; default OpenAI CLIP's.
        train_crop_scale: Range of the random crop's area, as a fraction of the image, used for
            training augmentation (random resized crop; there is no horizontal flip, since
            captions mention left and right).
        tokenizer: ``"synth"`` for the built-in word-level tokenizer of the synthetic world, the
            path of a Hugging Face ``tokenizer.json``, or a local Hugging Face model folder. Unset:
            the language model's when the model names one (``language_model``), else ``"synth"``.
        context_length: Length of every token row (start and end tokens included; longer texts
            are truncated, keeping the end token). Unset: the language model's maximum length when
            the model names one, else 32.
        batch_size: Training batch size per process (per GPU).
        eval_batch_size: Batch size for validation, test and prediction; default ``batch_size``.
        num_workers: DataLoader worker processes per GPU process (0 loads in the main process).
        shuffle_buffer: Number of samples in each worker's training shuffle buffer (0 disables
            sample shuffling; shards are shuffled regardless).
        resampled: Draw training shards with replacement in every worker (open_clip's
            ``--dataset-resampled``) instead of splitting them between workers.
        train_epoch_samples: Training samples per epoch over all processes.  Default: the number
            of samples of the training sources (required when that is unknown, e.g. for remote
            shards without img2dataset ``*_stats.json`` files).
        caption_sampling: Which of a training image's captions to use: ``"random"`` (a new draw
            each epoch) or ``"first"``.
        image_keys: Extensions tried, in order, for a sample's image, separated by ``;``.
        zeroshot_file: JSON file ``{"classnames": [...], "templates": [...]}`` for zero-shot
            classification on other data; default: ``root``'s ``zeroshot.json``.
        max_image_pixels: Skip images with more pixels than this (decompression-bomb guard);
            ``None`` disables the check.
        seed: Seed of shard order, shuffling, augmentation and caption choice (combined with the
            epoch, rank and worker).
        pin_memory: Use pinned host memory for batches (faster host-to-GPU copies).
        image_root: Folder that relative JSON ``image_path`` entries are resolved against, for
            shards that hold no image bytes (``lit-vlm data karpathy --no-pack``).  Default: the
            split's ``image_root`` recorded in ``root``'s manifest, if any.
        val_annotations: Evaluation annotation files of the validation data, for shards that
            live outside a ``root`` (or to override its files): keys among ``captions`` (COCO
            caption JSON), ``vqa_questions`` and ``vqa_annotations`` (official VQAv2 JSON),
            values the file paths.  See :meth:`eval_annotations`.
        test_annotations: Evaluation annotation files of the test data (same keys).
        train_vqa: Also give every training image this many of its VQA questions (distinct, drawn
            at random; ``true`` = 1) with their answers (the JSON ``questions``, as the synthetic
            world and ``lit-vlm data vqav2`` write them), for families that learn to answer by
            generation (``vqa_weight`` of BLIP, CoCa, PrefixLM); see the batch contract. More
            questions per image add question-answering signal for the cost of short text
            sequences only: the image is encoded once.
        hard_negatives: Give every training caption up to this many compositional hard negatives
            (the caption with one thing changed; NegCLIP, Yuksekgonul et al. 2023), which the
            contrastive families score as extra texts: the synthetic world's exact ones from each
            scene, else rule-based from the text (:mod:`lit_vlm.datamodules.negatives`).
        negative_kinds: Which kinds to draw them from (default all: ``replace_object``,
            ``replace_attribute``, ``swap_attributes``, ``swap_objects``).
    """

    def __init__(
        self,
        root: str | None = None,
        synthesize: bool = True,
        synth_config: dict[str, Any] | None = None,
        train_shards: str | list[str] | None = None,
        train_weights: list[float] | None = None,
        val_shards: str | list[str] | None = None,
        test_shards: str | list[str] | None = None,
        predict_shards: str | list[str] | None = None,
        image_size: int = 64,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        train_crop_scale: tuple[float, float] = (0.9, 1.0),
        tokenizer: str | None = None,
        context_length: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 2000,
        resampled: bool = False,
        train_epoch_samples: int | None = None,
        caption_sampling: str = "random",
        image_keys: str = "jpg;jpeg;png;webp",
        zeroshot_file: str | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
        seed: int = 0,
        pin_memory: bool = False,
        image_root: str | None = None,
        val_annotations: dict[str, str] | None = None,
        test_annotations: dict[str, str] | None = None,
        train_vqa: bool | int = False,
        hard_negatives: int = 0,
        negative_kinds: list[str] | None = None,
    ) -> None:
        corpus = ImageTextCorpus(
            image_size=image_size, mean=mean, std=std, train_crop_scale=train_crop_scale, tokenizer=tokenizer,
            context_length=context_length, caption_sampling=caption_sampling, image_keys=image_keys,
            max_image_pixels=max_image_pixels, image_root=image_root, train_vqa=train_vqa,
            hard_negatives=hard_negatives, negative_kinds=negative_kinds, synthesize=synthesize, synth_config=synth_config,
        )  # fmt: skip
        super().__init__(
            corpus, root=root, train_shards=train_shards, train_weights=train_weights, val_shards=val_shards,
            test_shards=test_shards, predict_shards=predict_shards, batch_size=batch_size,
            eval_batch_size=eval_batch_size, num_workers=num_workers, shuffle_buffer=shuffle_buffer,
            resampled=resampled, train_epoch_samples=train_epoch_samples, seed=seed, pin_memory=pin_memory,
            val_annotations=val_annotations, test_annotations=test_annotations,
        )  # fmt: skip
        # record the values in effect (an unset tokenizer / context_length resolved), as the model's linked copies
        tokenizer, context_length = corpus.tokenizer.name, corpus.context_length
        self.save_hyperparameters()  # reads this frame's arguments
        if zeroshot_file is not None and not Path(zeroshot_file).is_file():
            raise UserError(f"zeroshot_file={zeroshot_file!r} does not exist")
        self.zeroshot_file = zeroshot_file
        self._zeroshot: tuple[list[str] | None, list[str] | None] | None = None

    # ----------------------------------------------------------------------------- model-facing facts

    @property
    def synth_config(self) -> dict[str, Any]:
        """Overrides of the synthetic world's settings."""
        return self.corpus.synth_config

    @property
    def classnames(self) -> list[str] | None:
        """Zero-shot class names (``zeroshot_file``, else ``root``'s), or ``None``."""
        return self._load_zeroshot()[0]

    @property
    def templates(self) -> list[str] | None:
        """Zero-shot prompt templates with a ``{}`` placeholder, or ``None``."""
        return self._load_zeroshot()[1]

    def _load_zeroshot(self) -> tuple[list[str] | None, list[str] | None]:
        if self._zeroshot is None:
            if self.zeroshot_file is not None:
                data = read_json_object(Path(self.zeroshot_file), "zeroshot_file")
                self._zeroshot = (data.get("classnames"), data.get("templates"))
            elif self.root is not None and not self.has_manifest():
                return self.corpus.zeroshot(self.root, None)  # not cached: the world may appear
            else:
                self._zeroshot = self.corpus.zeroshot(self.root, self.manifest() if self.root is not None else None)
        return self._zeroshot
