"""Image-text pairs streamed from webdataset shards (synthetic world, converted corpora, img2dataset).

:class:`ImageTextDataModule` reads shards in the img2dataset layout -- per sample ``KEY.jpg``
(or ``.jpeg``/``.png``/``.webp``), ``KEY.txt`` (one caption) and optionally ``KEY.json``
(``"captions"``: all captions, ``"label"``: class index, ``"image_id"``, ``"questions"``, ...)
-- either from a dataset directory (``root``: a synthetic world, generated on demand by
:mod:`lit_vlm.datamodules.synth`, or a corpus converted by :mod:`lit_vlm.datamodules.convert`)
or from explicit shard specs (local paths, brace patterns, ``pipe:`` commands, URLs).  The
streaming mechanics (rank/worker splitting, epochs, robust decoding) live in
:mod:`lit_vlm.datamodules.stream`.

Images stay where they are or are packed into the shards; the user chooses.  A sample without
an image member but with a JSON ``"image_path"`` is read from that file: an absolute path, or a
path relative to ``image_root`` (the DataModule argument, else the split's ``image_root`` in
``root``'s manifest, as ``lit-vlm data karpathy --no-pack`` writes it).  An image member, when
present, wins.

Batch contract
--------------
Model families and callbacks read batches **by key**.  ``B`` is the number of images in the
batch, ``L`` the context length, ``H = W = image_size``.

Training batches (``train_dataloader``):

* ``image``: float ``[B, 3, H, W]``, normalised with ``mean``/``std``;
* ``text_ids``: long ``[B, L]``, one caption per image (a random one of the sample's captions
  with ``caption_sampling="random"``, the first with ``"first"``): ``[bos] tokens [eos] pad...``;
* ``text_mask``: bool ``[B, L]``, True on real tokens (bos and eos included);
* ``sample_id``: ``list[str]`` of the webdataset keys (``__key__``);
* with ``train_vqa`` (k questions per image, ``true`` = 1): ``question`` and ``answer``
  (``list[str]``, up to k distinct questions drawn at random per image that has answered ones,
  with their ``multiple_choice_answer``), ``qa_ids``,
  ``qa_mask`` and ``qa_answer_mask`` (``[Q, L]``: ``[bos] question answer [eos]``, the answer
  and end token marked) and ``qa_owner`` (long ``[Q]``, each question's image row);
* ``data_stats``: loader statistics (see below); removed again by
  :meth:`ImageTextDataModule.on_after_batch_transfer`, so a ``training_step`` does not see it.

Evaluation batches (``val``/``test``/``predict``) have the same keys, plus:

* ``label``: long ``[B]``, the ``"label"`` of the sample's JSON, ``-1`` when absent;
* ``caption_ids``: long ``[N, L]`` and ``caption_mask``: bool ``[N, L]``, *all* captions of the
  batch's images (JSON ``"captions"``, else the ``.txt`` caption), image after image;
* ``caption_owner``: long ``[N]``, the row in this batch of each caption's image;
* ``captions``: ``list[list[str]]``, the raw caption strings of each image (what ``caption_ids``
  encodes, untokenised; for caption metrics);
* ``image_id``: ``list[int | str]``, the JSON ``"image_id"`` of each image (the id used by the
  COCO / VQAv2 annotation files), falling back to the shard key;
* ``question``: ``list[str]`` and ``question_id``: ``list[int]``, the VQA questions of the
  batch's images (JSON ``"questions"``: objects with ``question_id`` and ``question``), image
  after image; ``question_owner``: long ``[Q]``, the row of each question's image.  Empty lists
  and an empty tensor when the shards hold no questions;

and ``text_ids``/``text_mask`` hold the *first* caption of every image, so a validation loss can
be computed.  Images with questions need no caption in evaluation (VQA shards have none), and
prediction accepts images without any caption: such images own no ``caption_ids`` row, their
``captions`` entry is ``[]`` and their ``text_ids`` row is just ``[bos, eos]``.  A malformed
``"questions"`` (not a list, an entry without an integer ``question_id`` or a string
``question``) or ``"image_id"`` (neither an integer nor a string), a ``"captions"`` that is not a
list of strings, a ``"caption"`` that is not a string or a ``"label"`` that is not an integer
makes the sample bad (``bad_json``).

:meth:`ImageTextDataModule.eval_annotations` names the evaluation annotation files (COCO
captions, VQAv2 questions/annotations) that describe the val/test shards, when known.

``data_stats`` is ``{"split", "worker", "epoch", "samples", "skipped", "raw", "batches"}``: the
global worker index, how many samples that worker yielded so far in this epoch/pass, how many it
skipped per reason (see :data:`lit_vlm.datamodules.stream.SKIP_REASONS`), and its stream position
(raw samples drawn, batches yielded; training batches also carry the augmentation generator's
state, which the loader keeps for resuming and removes).  The DataModule keeps the
latest per (split, worker): :meth:`ImageTextDataModule.skip_counts` sums them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lit_vlm.datamodules.stream import (
    SKIP_REASONS,
    BadSample,
    Source,
    StreamDataset,
    StreamLoader,
    StreamState,
    expand_urls,
    make_sources,
)
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
from lit_vlm.errors import MissingFileError, UserError

__all__ = ["EVAL_ANNOTATION_KINDS", "ImageTextCollator", "ImageTextDataModule", "ImageTextDecoder"]

logger = logging.getLogger("lit_vlm.data")

# Our IterableDatasets split the work across workers themselves, so their length is exact.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")

_SPLITS = ("train", "val", "test", "predict")
_CAPTION_SAMPLING = ("random", "first")


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
    def _questions(meta: dict[str, Any]) -> list[tuple[int, str]]:
        """``(question_id, question)`` of each entry of the JSON ``questions`` list (``[]`` if absent)."""
        listed = meta.get("questions")
        if listed is None:
            return []
        if not isinstance(listed, list):
            raise BadSample("bad_json", f"json 'questions' is a {type(listed).__name__}, not a list")
        result: list[tuple[int, str]] = []
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
            result.append((qid, text.strip()))
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
            if self.caption_sampling == "random" and len(captions) > 1:
                caption = captions[int(torch.randint(len(captions), (1,), generator=generator))]
            else:
                caption = captions[0]
            sample = {"image": image, "caption": caption, "label": label}
            if self.train_vqa:
                sample["qa"] = self._train_questions(meta, generator, self.train_vqa)
            return sample
        return {"image": image, "captions": captions, "label": label, "image_id": image_id, "questions": questions}


class ImageTextCollator:
    """Stack decoded samples into a batch following the module's batch contract.

    Args:
        tokenizer: Text tokenizer.
        context_length: Token rows are padded/truncated to this length.
        train: Training layout (one caption per image) or evaluation layout (all captions).
    """

    def __init__(self, tokenizer: Tokenizer, context_length: int, train: bool) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.train = train

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "image": torch.stack([s["image"] for s in samples]),
            "sample_id": [s["__key__"] for s in samples],
        }
        if self.train:
            batch["text_ids"], batch["text_mask"] = self.tokenizer.encode(
                [s["caption"] for s in samples], self.context_length
            )
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
        questions = [(row, qid, text) for row, s in enumerate(samples) for qid, text in s.get("questions", ())]
        batch["question"] = [text for _, _, text in questions]
        batch["question_id"] = [qid for _, qid, _ in questions]
        batch["question_owner"] = torch.tensor([row for row, _, _ in questions], dtype=torch.long)  # [Q]
        return batch


# --------------------------------------------------------------------------------------------
# The DataModule
# --------------------------------------------------------------------------------------------


def _synth_module() -> Any:
    from lit_vlm.datamodules import synth

    return synth


def _convert_module() -> Any:
    from lit_vlm.datamodules import convert

    return convert


#: Keys of :meth:`ImageTextDataModule.eval_annotations` and the manifest entry name of each
#: (``{split}`` is ``val`` or ``test``), as the synthetic world and the converters write them.
EVAL_ANNOTATION_KINDS: dict[str, str] = {
    "captions": "captions_{split}",
    "vqa_questions": "vqa_{split}_questions",
    "vqa_annotations": "vqa_{split}_annotations",
}
_STAGE_SPLITS = {"fit": "val", "val": "val", "validate": "val", "test": "test", "predict": "predict"}


def _spec_sources(spec: str | list[str]) -> int:
    return 1 if isinstance(spec, str) else len(spec)


class ImageTextDataModule(pl.LightningDataModule):
    """Streaming image-text data (contrastive, captioning, retrieval, zero-shot).

    Data comes from a dataset directory (``root``) or explicit shard specs; see the module
    docstring for the batch contract.  The tokenizer is loaded at construction, so
    ``vocab_size``, ``pad_id``, ``context_length`` and ``image_size`` are known before any data
    exists.

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
        tokenizer: ``"synth"`` for the built-in word-level tokenizer of the synthetic world, or
            the path of a Hugging Face ``tokenizer.json``.
        context_length: Length of every token row (start and end tokens included; longer texts
            are truncated, keeping the end token).
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
        tokenizer: str = "synth",
        context_length: int = 32,
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = None if root is None else str(root)
        self.synthesize = synthesize
        self.synth_config = dict(synth_config or {})
        self.shard_specs: dict[str, str | list[str] | None] = {
            "train": train_shards,
            "val": val_shards,
            "test": test_shards,
            "predict": predict_shards,
        }
        self.train_weights = None if train_weights is None else [float(w) for w in train_weights]
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.train_crop_scale = (float(train_crop_scale[0]), float(train_crop_scale[1]))
        self.context_length = int(context_length)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else self.batch_size
        self.num_workers = int(num_workers)
        self.shuffle_buffer = int(shuffle_buffer)
        self.resampled = resampled
        self.train_epoch_samples = train_epoch_samples
        self.caption_sampling = caption_sampling
        self.image_keys = [k.strip().lower().lstrip(".") for k in image_keys.split(";") if k.strip()]
        self.zeroshot_file = zeroshot_file
        self.max_image_pixels = max_image_pixels
        self.seed = int(seed)
        self.pin_memory = pin_memory
        self.image_root = None if image_root is None else str(image_root)
        self.annotation_files: dict[str, dict[str, str]] = {
            "val": {k: str(v) for k, v in (val_annotations or {}).items()},
            "test": {k: str(v) for k, v in (test_annotations or {}).items()},
        }
        if isinstance(train_vqa, bool) or train_vqa is None:
            train_vqa = int(bool(train_vqa))
        if not isinstance(train_vqa, int) or train_vqa < 0:
            raise UserError(f"data train_vqa must be true/false or a number of questions per image >= 0, got {train_vqa!r}")
        self.train_vqa = train_vqa
        self._validate()
        try:
            self.tokenizer: Tokenizer = Tokenizer.load(tokenizer)
        except (OSError, ValueError) as exc:
            raise UserError(f"tokenizer={tokenizer!r}: {exc}") from exc
        if self.context_length < 1 + (self.tokenizer.bos_id is not None) + (self.tokenizer.eos_id is not None):
            raise UserError(f"context_length={context_length} is too short for the start/end tokens")
        self._zeroshot: tuple[list[str] | None, list[str] | None] | None = None
        self._stream_state = StreamState()
        self._stats: dict[tuple[str, int], dict[str, Any]] = {}
        self._logged_skips: dict[str, int] = {}

    # ----------------------------------------------------------------------------- validation

    def _validate(self) -> None:
        if self.root is not None and Path(self.root).exists() and not Path(self.root).is_dir():
            raise UserError(
                f"data root={self.root!r} is a file, not a folder: root is the folder of a synthetic world or a converted "
                "dataset (a missing one is generated there); give a folder path, or set root null and name shards"
            )
        if self.caption_sampling not in _CAPTION_SAMPLING:
            raise UserError(f"caption_sampling must be one of {_CAPTION_SAMPLING}, got {self.caption_sampling!r}")
        for name, value, low in (
            ("image_size", self.image_size, 1),
            ("batch_size", self.batch_size, 1),
            ("eval_batch_size", self.eval_batch_size, 1),
            ("num_workers", self.num_workers, 0),
            ("shuffle_buffer", self.shuffle_buffer, 0),
            ("context_length", self.context_length, 1),
        ):
            if value < low:
                raise UserError(f"{name} must be >= {low}, got {value}")
        if self.train_epoch_samples is not None and self.train_epoch_samples < 1:
            raise UserError(f"train_epoch_samples must be >= 1, got {self.train_epoch_samples}")
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise UserError(f"max_image_pixels must be >= 1 or None, got {self.max_image_pixels}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UserError(f"mean and std need 3 values each (std > 0), got mean={self.mean}, std={self.std}")
        low, high = self.train_crop_scale
        if not 0 < low <= high <= 1:
            raise UserError(f"train_crop_scale must satisfy 0 < min <= max <= 1, got {self.train_crop_scale}")
        if not self.image_keys:
            raise UserError("image_keys must name at least one extension, e.g. 'jpg;png'")
        if self.train_weights is not None:
            train_spec = self.shard_specs["train"]
            n_sources = _spec_sources(train_spec) if train_spec is not None else 1
            if len(self.train_weights) != n_sources:
                raise UserError(
                    f"train_weights={self.train_weights} has {len(self.train_weights)} entries but there are "
                    f"{n_sources} training sources (train_shards={train_spec!r})"
                )
            if any(w < 0 or not math.isfinite(w) for w in self.train_weights) or sum(self.train_weights) <= 0:
                raise UserError(f"train_weights must be non-negative with a positive sum, got {self.train_weights}")
        for split, spec in self.shard_specs.items():
            if spec is None:
                continue
            if (isinstance(spec, str) and not spec.strip()) or (not isinstance(spec, str) and not spec):
                raise UserError(f"{split}_shards is empty: {spec!r}")
            try:
                expand_urls(spec)
            except (OSError, ValueError) as exc:
                raise UserError(f"{split}_shards={spec!r}: {exc}") from exc
        if self.synth_config and self.root is None:
            raise UserError("synth_config is set but root is not: the synthetic world needs a directory")
        if self.root is not None:
            if (Path(self.root) / _convert_module().MARKER).exists() and not self._manifest_path().is_file():
                raise UserError(
                    f"root={self.root!r} holds an interrupted dataset conversion (no manifest.json); "
                    "run the conversion again"
                )
            if not self._manifest_path().is_file() and not self.synthesize:
                raise UserError(
                    f"root={self.root!r} holds no dataset (no manifest.json) and synthesize=False; "
                    "set synthesize=True to generate a synthetic world or point root at an existing dataset"
                )
            if self.synth_config and self._is_converted():
                raise UserError(
                    f"root={self.root!r} is a converted dataset, not a synthetic world: synth_config does not apply"
                )
            self._check_synth_config_fields()
        for split, files in self.annotation_files.items():
            unknown = sorted(set(files) - set(EVAL_ANNOTATION_KINDS))
            if unknown:
                raise UserError(
                    f"{split}_annotations has unknown keys {unknown}; valid keys: {sorted(EVAL_ANNOTATION_KINDS)}"
                )
            for kind, path in files.items():
                if not Path(path).is_file():
                    raise UserError(f"{split}_annotations[{kind!r}]={path!r} does not exist")
        if self.image_root is not None and not Path(self.image_root).is_dir():
            raise UserError(f"image_root={self.image_root!r} is not a folder")
        if self.zeroshot_file is not None and not Path(self.zeroshot_file).is_file():
            raise UserError(f"zeroshot_file={self.zeroshot_file!r} does not exist")

    def _check_synth_config_fields(self) -> None:
        if not self.synth_config:
            return
        try:
            synth = _synth_module()
        except ImportError:
            return
        known = {f.name for f in dataclasses.fields(synth.SynthConfig)}
        unknown = sorted(set(self.synth_config) - known)
        if unknown:
            raise UserError(f"synth_config has unknown fields {unknown}; valid fields: {sorted(known)}")

    # ----------------------------------------------------------------------------- model-facing facts

    @property
    def vocab_size(self) -> int:
        """Number of token ids (rows of a text embedding table)."""
        return self.tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        """Id used to pad token rows."""
        return self.tokenizer.pad_id

    @property
    def classnames(self) -> list[str] | None:
        """Zero-shot class names (``zeroshot_file``, else ``root``'s), or ``None``."""
        return self._load_zeroshot()[0]

    @property
    def templates(self) -> list[str] | None:
        """Zero-shot prompt templates with a ``{}`` placeholder, or ``None``."""
        return self._load_zeroshot()[1]

    def _load_zeroshot(self) -> tuple[list[str] | None, list[str] | None]:
        if self._zeroshot is not None:
            return self._zeroshot
        if self.zeroshot_file is not None:
            data = self._read_json(Path(self.zeroshot_file), "zeroshot_file")
            self._zeroshot = (data.get("classnames"), data.get("templates"))
            return self._zeroshot
        if self.root is None:
            return None, None
        if not self._manifest_path().is_file():  # not generated yet: the generator's constants
            synth = _synth_module()
            return list(synth.CLASSNAMES), list(synth.TEMPLATES)
        manifest = self._manifest()
        classnames, templates = manifest.get("classnames"), manifest.get("templates")
        if manifest.get("zeroshot"):
            path = Path(self.root) / manifest["zeroshot"]
            if path.is_file():
                data = self._read_json(path, "root zeroshot file")
                classnames = data.get("classnames", classnames)
                templates = data.get("templates", templates)
        self._zeroshot = (classnames, templates)
        return self._zeroshot

    # ----------------------------------------------------------------------------- synthetic world

    def _manifest_path(self) -> Path:
        assert self.root is not None
        return Path(self.root) / "manifest.json"

    @staticmethod
    def _read_json(path: Path, what: str) -> dict[str, Any]:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {what} {str(path)!r}: {exc}") from exc
        if not isinstance(data, dict):
            raise UserError(f"{what} {str(path)!r} must hold a JSON object")
        return data

    def _manifest_format(self) -> str | None:
        """The ``format`` field of ``root``'s manifest (``None`` when missing or unreadable)."""
        try:
            with open(self._manifest_path(), encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return None
        return data.get("format") if isinstance(data, dict) else None

    def _is_converted(self) -> bool:
        return self._manifest_format() == _convert_module().FORMAT

    def _manifest(self) -> dict[str, Any]:
        if not self._manifest_path().is_file():
            raise MissingFileError(
                f"root={self.root!r} has no manifest.json yet: call prepare_data() (the Trainer does) "
                "or generate the world first"
            )
        convert = _convert_module()
        try:
            if self._is_converted():
                return convert.load_manifest(self.root)
            return _synth_module().load_manifest(self.root)
        except ValueError as exc:
            raise UserError(
                f"root={self.root!r}: {exc} (a root must hold a synthetic world or a converted dataset)"
            ) from exc

    def prepare_data(self) -> None:
        """Generate the synthetic world in ``root`` if it is missing (once per node).

        A converted dataset is used as it is; a folder left by an interrupted conversion is an
        error (it is never synthesized over).
        """
        if self.root is None:
            return
        if self._is_converted():
            self._manifest()  # checks it
            return
        if (Path(self.root) / _convert_module().MARKER).exists():
            raise UserError(
                f"root={self.root!r} holds an interrupted dataset conversion (no manifest.json); run it again"
            )
        synth = _synth_module()
        if synth.is_generated(self.root):
            self._check_existing_world()
            return
        if not self.synthesize:
            raise UserError(f"root={self.root!r} holds no synthetic world and synthesize=False")
        logger.info("generating the synthetic world in %s (%s)", self.root, self.synth_config or "defaults")
        synth.generate(self.root, synth.SynthConfig(**self.synth_config))

    def _check_existing_world(self) -> None:
        """Refuse to silently reuse a world generated with different ``synth_config`` values."""
        if not self.synth_config:
            return
        existing = self._manifest().get("config", {})
        normalise = lambda value: json.loads(json.dumps(value))  # noqa: E731 - tuples vs lists
        different = {
            key: (existing.get(key), value)
            for key, value in self.synth_config.items()
            if key in existing and normalise(existing[key]) != normalise(value)
        }
        if different:
            details = ", ".join(f"{k}: on disk {old!r}, requested {new!r}" for k, (old, new) in different.items())
            raise UserError(
                f"root={self.root!r} already holds a world with another synth_config ({details}); "
                "use another root or delete it"
            )

    # ----------------------------------------------------------------------------- loaders

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _sources(self, split: str) -> list[Source]:
        spec = self.shard_specs[split]
        option = f"{split}_shards"
        if spec is not None:
            try:
                return make_sources(spec, self.train_weights if split == "train" else None)
            except (OSError, ValueError) as exc:
                raise UserError(f"{option}={spec!r}: {exc}") from exc
        if self.root is None:
            return []
        manifest = self._manifest()
        split_key = "test" if split == "predict" else split
        entry = manifest.get("splits", {}).get(split_key)
        if not entry or not entry.get("shards"):
            return []
        urls = [str(Path(self.root) / shard) for shard in entry["shards"]]
        weight = self.train_weights[0] if split == "train" and self.train_weights else 1.0
        return [Source(urls=urls, weight=weight, num_samples=entry.get("num_samples"), name=f"{self.root}:{split_key}")]

    def _image_root(self, split: str) -> str | None:
        """``image_root``, else the manifest's ``image_root`` of the split when it comes from ``root``."""
        if self.image_root is not None:
            return self.image_root
        if self.shard_specs[split] is not None or self.root is None or not self._manifest_path().is_file():
            return None
        entry = self._manifest().get("splits", {}).get("test" if split == "predict" else split) or {}
        recorded = entry.get("image_root")
        if not isinstance(recorded, str) or not recorded:
            return None
        return str(Path(self.root) / recorded)  # an absolute recorded path stays as it is

    def eval_annotations(self, stage: str) -> dict[str, str]:
        """Evaluation annotation files of a stage's data, when known.

        Keys among ``"captions"`` (COCO caption format, as pycocoevalcap reads it),
        ``"vqa_questions"`` and ``"vqa_annotations"`` (official VQAv2 formats); values are file
        paths.  The files come from ``root`` (a synthetic world or a converted dataset: its
        manifest's ``captions_{split}``, ``vqa_{split}_questions`` and
        ``vqa_{split}_annotations``, or those names under ``annotations/`` when the manifest
        lists none) if the split's shards come from ``root`` and the files exist, overridden
        key by key by ``val_annotations`` / ``test_annotations``.

        Args:
            stage: ``"val"`` / ``"validate"`` / ``"fit"`` (the validation data), ``"test"`` or
                ``"predict"`` (``root``'s test files when ``predict_shards`` is not set).
        """
        split = _STAGE_SPLITS.get(stage)
        if split is None:
            raise UserError(f"stage must be one of {sorted(_STAGE_SPLITS)}, got {stage!r}")
        found: dict[str, str] = {}
        if self.shard_specs[split] is None and self.root is not None and self._manifest_path().is_file():
            file_split = "test" if split == "predict" else split
            listed = self._manifest().get("annotations")
            for kind, pattern in EVAL_ANNOTATION_KINDS.items():
                name = pattern.format(split=file_split)
                if isinstance(listed, dict):
                    rel = listed.get(name)
                else:
                    rel = f"annotations/{name}.json"
                if isinstance(rel, str) and (Path(self.root) / rel).is_file():
                    found[kind] = str(Path(self.root) / rel)
        found.update(self.annotation_files.get(split, {}))
        return found

    def _transform(self, train: bool) -> Compose:
        if train:
            return train_transform(self.image_size, self.mean, self.std, self.train_crop_scale)
        return eval_transform(self.image_size, self.mean, self.std)

    def _dataset(
        self, split: str, sources: list[Source], layout: str | None = None, num_workers: int | None = None
    ) -> StreamDataset:
        train = split == "train" and layout is None
        rank, world_size = self._rank_world() if layout is None else (0, 1)
        if train:
            draft = math.ceil(self.image_size / math.sqrt(self.train_crop_scale[0]))
        else:
            draft = self.image_size
        decoder = ImageTextDecoder(
            self._transform(train),
            train=train,
            image_keys=self.image_keys,
            caption_sampling=self.caption_sampling,
            max_pixels=self.max_image_pixels,
            draft_size=draft,
            require_caption=split != "predict",
            image_root=self._image_root(split),
            train_vqa=self.train_vqa if train else 0,
        )
        return StreamDataset(
            sources,
            decode=decoder,
            collate=ImageTextCollator(self.tokenizer, self.context_length, train=train),
            batch_size=self.batch_size if train else self.eval_batch_size,
            split=split,
            train=train,
            rank=rank,
            world_size=world_size,
            num_workers=self.num_workers if num_workers is None else num_workers,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            resampled=self.resampled and train,
            epoch_samples=self.train_epoch_samples if train else None,
        )

    def _loader(self, dataset: StreamDataset, epoch_fn: Any = None) -> StreamLoader:
        return StreamLoader(
            dataset, num_workers=self.num_workers, pin_memory=self.pin_memory, epoch_fn=epoch_fn, stats_fn=self.record_stats
        )

    def train_dataloader(self) -> StreamLoader:
        """Endless shuffled stream cut into equal epochs on every rank."""
        sources = self._sources("train")
        if not sources:
            raise UserError("no training data: set root (a synthetic world) or train_shards")
        dataset = self._dataset("train", sources)
        dataset.state = self._stream_state  # one state object, shared with state_dict()
        epoch_fn = None
        if self.trainer is not None:
            epoch_fn = self._current_epoch
        return self._loader(dataset, epoch_fn)

    def _current_epoch(self) -> int:
        return int(self.trainer.current_epoch) if self.trainer is not None else self._stream_state.epoch

    def _eval_dataloader(self, split: str) -> StreamLoader | list[Any]:
        sources = self._sources(split)
        if not sources:
            return []
        return self._loader(self._dataset(split, sources))

    def sample_loader(self, split: str, num_workers: int = 0) -> StreamLoader | list[Any]:
        """Evaluation-layout batches (every caption, ``image_id``, questions; evaluation
        transform, no shuffling) of any split, ``"train"`` included, read whole by this process
        alone whatever the number of ranks. For evaluations that need a reference set, such as the
        nearest-neighbour caption baseline of :class:`~lit_vlm.callbacks.CaptionEvaluation`; the
        caller stops reading when it has enough. ``[]`` when the split has no data."""
        if split not in self.shard_specs:
            raise UserError(f"sample_loader: split must be one of {sorted(self.shard_specs)}, got {split!r}")
        sources = self._sources(split)
        if not sources:
            return []
        dataset = self._dataset(split, sources, layout="eval", num_workers=num_workers)
        return StreamLoader(dataset, num_workers=num_workers, pin_memory=False)

    def val_dataloader(self) -> StreamLoader | list[Any]:
        """Every validation sample exactly once across ranks; ``[]`` when there is none."""
        return self._eval_dataloader("val")

    def test_dataloader(self) -> StreamLoader | list[Any]:
        """Every test sample exactly once across ranks; ``[]`` when there is none."""
        return self._eval_dataloader("test")

    def predict_dataloader(self) -> StreamLoader | list[Any]:
        """Every prediction sample exactly once across ranks; ``[]`` when there is none."""
        return self._eval_dataloader("predict")

    # ----------------------------------------------------------------------------- statistics

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Remove ``data_stats`` from the batch and record it (see :meth:`skip_counts`)."""
        if isinstance(batch, dict) and "data_stats" in batch:
            self.record_stats(batch.pop("data_stats"))
        return batch

    def record_stats(self, stats: dict[str, Any]) -> None:
        """Keep the latest ``data_stats`` of a (split, worker); log the counts per reason when the
        total of the epoch or pass first exceeds 0, then each time it doubles (1, 2, 4, ...), so
        a badly broken corpus does not flood the log."""
        split = str(stats.get("split", "?"))
        self._stats[(split, int(stats.get("worker", 0)))] = stats
        total = sum(self.skip_counts(split).values())
        last = self._logged_skips.get(split, 0)
        if total < last:  # a new epoch or pass: its counts start again
            last = self._logged_skips[split] = 0
        if total > 0 and total >= 2 * last:
            counts = {k: v for k, v in self.skip_counts(split).items() if v}
            logger.info("%s: %d bad samples skipped so far in this %s %s", split, total,
                        "epoch" if split == "train" else "pass", counts)
            self._logged_skips[split] = total

    def skip_counts(self, split: str | None = None) -> dict[str, int]:
        """Skipped samples per reason, summed over workers (and over splits when ``split=None``).

        Counts come from the latest batch of each worker, so they cover the current (or most
        recent) epoch or evaluation pass of this process.  Every reason of
        :data:`~lit_vlm.datamodules.stream.SKIP_REASONS` is present (zero when none).
        """
        counts = dict.fromkeys(SKIP_REASONS, 0)
        for (stats_split, _), stats in self._stats.items():
            if split is None or stats_split == split:
                for reason, n in stats.get("skipped", {}).items():
                    counts[reason] = counts.get(reason, 0) + int(n)
        return counts

    @property
    def stream_stats(self) -> dict[str, dict[str, Any]]:
        """Totals per split: ``{"samples": int, "skipped": int, "skipped_by_reason": {...}}``."""
        result: dict[str, dict[str, Any]] = {}
        for split in sorted({s for s, _ in self._stats}):
            by_reason = self.skip_counts(split)
            samples = sum(int(v.get("samples", 0)) for (s, _), v in self._stats.items() if s == split)
            result[split] = {"samples": samples, "skipped": sum(by_reason.values()), "skipped_by_reason": by_reason}
        return result

    @property
    def skipped_total(self) -> int:
        """Skipped samples over all splits, workers and reasons (see :meth:`skip_counts`)."""
        return sum(self.skip_counts().values())

    # ----------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The training stream's epoch. The position inside the epoch (every worker of every rank)
        is the training loader's own state (:meth:`StreamLoader.state_dict`), which Lightning
        saves beside this in each checkpoint."""
        return {"stream": dataclasses.asdict(self._stream_state)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        stream = state_dict.get("stream", {})
        self._stream_state.epoch = int(stream.get("epoch", self._stream_state.epoch))
