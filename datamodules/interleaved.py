"""Interleaved image-text documents (MMC4, OBELICS) read as webdataset samples, for Flamingo-style models.

A document sample holds one JSON member in either layout, read unchanged:

* **MMC4**, as OpenFlamingo's WebDataset conversion writes it: ``text_list`` (the sentences),
  ``image_info`` (per image: ``image_name``, ``matched_text_index``, ``matched_sim`` and the image
  as ``image_base64``) and ``similarity_matrix`` (images x sentences, CLIP cosine similarities on
  their real -1..1 scale).
* **OBELICS**: parallel ``texts`` and ``images`` lists, exactly one of the two non-null at each
  position; the images are already placed.

An image-text pair (``KEY.jpg`` with ``KEY.txt``, img2dataset's layout) reads as the one-chunk
document ``<image>caption<|endofchunk|>``, as OpenFlamingo trains on LAION beside MMC4.

An image may also be a tar member of the same sample: ``KEY.<i>.jpg`` (``i`` its index in
``image_info`` / ``images``), or a member named by the entry's ``image_name`` (MMC4) or by the
string in ``images`` (OBELICS).

Each MMC4 image is put before a sentence (``assign: hungarian``, one-to-one on the similarity
matrix, as OpenFlamingo does; or ``assign: matched``, its ``matched_text_index``) and kept when its
similarity reaches ``threshold``. The document then becomes one token row in OpenFlamingo's layout::

    [bos] text <image>text text<|endofchunk|><image>text<|endofchunk|>[eos]

every image opening a chunk, every chunk closed by ``<|endofchunk|>``. Images are taken in reading
order (the order of their ``<image>`` tokens, which OpenFlamingo's stacking by ``image_info`` order
does not always match), at most ``max_images`` of them, within ``max_tokens``. Images dropped
inside a document are counted by reason (:data:`IMAGE_DROP_REASONS`); a document left with too few
images is skipped by reason (:data:`INTERLEAVED_SKIP_REASONS`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lit_vlm.datamodules import world_docs
from lit_vlm.datamodules.corpus import Corpus, Split, is_empty
from lit_vlm.datamodules.shards import ShardDataModule
from lit_vlm.datamodules.stream import DROPPED
from lit_vlm.datamodules.tokenizer import Tokenizer
from lit_vlm.datamodules.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MAX_PIXELS,
    BadSample,
    Compose,
    decode_image,
    eval_transform,
    train_transform,
)
from lit_vlm.errors import UserError

logger = logging.getLogger("lit_vlm.data")

__all__ = [
    "ASSIGN",
    "END_OF_CHUNK",
    "IMAGE_DROP_REASONS",
    "IMAGE_TOKEN",
    "INTERLEAVED_SKIP_REASONS",
    "Document",
    "DocumentLayout",
    "InterleavedCollator",
    "InterleavedCorpus",
    "InterleavedDataModule",
    "InterleavedDecoder",
    "assign_images",
    "chunk_labels",
    "document_ids",
    "parse_document",
    "with_media_tokens",
]

IMAGE_TOKEN = "<image>"
END_OF_CHUNK = "<|endofchunk|>"
ASSIGN = ("hungarian", "matched")
IGNORE_INDEX = -100

INTERLEAVED_SKIP_REASONS: tuple[str, ...] = ("bad_json", "no_text", "too_few_images", "single_image")
"""Reasons a document is skipped (``single_image``: dropped by ``single_image_keep``)."""

IMAGE_DROP_REASONS: tuple[str, ...] = (
    "below_threshold",  # its similarity to its sentence is under the threshold
    "unassigned",  # the one-to-one assignment gave its sentence to another image
    "missing_image",  # no base64, no member
    "image_bytes",  # outside [min_image_bytes, max_image_bytes]
    "image_decode",  # undecodable, or over the pixel limit
    "over_max_images",  # after max_images
    "truncated",  # its <image> fell outside max_tokens, or nothing followed it
)
"""Reasons an image inside a kept or skipped document is dropped (counted apart from documents)."""


@dataclass
class Document:
    """A parsed document: sentences, and per image its source and the sentence it goes before.

    ``images[i]`` is ``{"index": i, "data": bytes | None, "sentence": j | None, "similarity": s}``;
    ``sentence`` is filled by :func:`assign_images` for MMC4 and given for OBELICS.
    """

    sentences: list[str]
    images: list[dict[str, Any]]
    similarity: list[list[float]] | None = None  # [images][sentences] (MMC4)
    matched: list[tuple[int, float] | None] = field(default_factory=list)  # MMC4 (index, sim) per image
    placed: bool = False  # OBELICS: sentence of each image given by its position
    pair: bool = False  # an image-text pair read as a one-chunk document


def _member(raw: dict[str, Any], index: int, name: Any) -> bytes | None:
    for ext in ("jpg", "jpeg", "png", "webp"):
        if f"{index}.{ext}" in raw:
            return raw[f"{index}.{ext}"]
    if isinstance(name, str) and name:
        key = name.rsplit("/", 1)[-1].lower()
        if key in raw:
            return raw[key]
    return None


def _base64(entry: dict[str, Any], index: int) -> bytes | None:
    data = entry.get("image_base64")
    if data is None:
        return None
    if not isinstance(data, str):
        raise BadSample("bad_json", f"image_info[{index}].image_base64 is a {type(data).__name__}, not a string")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return b""  # counted as undecodable when read


def parse_document(raw: dict[str, Any]) -> Document:
    """The document of a raw webdataset sample: its ``json`` member in MMC4 or OBELICS layout, or an
    image-text pair.
    Raises :class:`BadSample` (``bad_json``, ``no_text``)."""
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadSample("bad_json", f"json member does not parse: {exc}") from exc
    if not isinstance(meta, dict):
        raise BadSample("bad_json", f"json member is a {type(meta).__name__}, not an object")
    if "text_list" in meta:
        return _parse_mmc4(raw, meta)
    if "texts" in meta and "images" in meta:
        return _parse_obelics(raw, meta)
    image = next((raw[k] for k in ("jpg", "jpeg", "png", "webp") if k in raw), None)
    if image is not None:
        return _parse_pair(raw, meta, image)
    raise BadSample("bad_json", "json has neither MMC4's 'text_list' nor OBELICS's 'texts' and 'images', "
                                "and the sample is no image-text pair")


def _parse_pair(raw: dict[str, Any], meta: dict[str, Any], image: bytes) -> Document:
    """An image-text pair (img2dataset layout: ``KEY.jpg`` with ``KEY.txt`` or a JSON ``caption``)
    as the one-chunk document ``<image>caption<|endofchunk|>``, as OpenFlamingo reads LAION."""
    caption = meta.get("caption")
    if "txt" in raw:
        try:
            caption = raw["txt"].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadSample("bad_json", f"txt member is not UTF-8: {exc}") from exc
    if not isinstance(caption, str) or not caption.strip():
        raise BadSample("no_text", "an image-text pair without a caption (txt member or json 'caption')")
    return Document([caption], [{"index": 0, "data": image, "sentence": 0, "similarity": None}], placed=True, pair=True)


def _parse_mmc4(raw: dict[str, Any], meta: dict[str, Any]) -> Document:
    sentences, infos = meta["text_list"], meta.get("image_info", [])
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        raise BadSample("bad_json", "json 'text_list' is not a list of strings")
    if not isinstance(infos, list) or not all(isinstance(e, dict) for e in infos):
        raise BadSample("bad_json", "json 'image_info' is not a list of objects")
    if not any(s.strip() for s in sentences):
        raise BadSample("no_text", "every sentence of 'text_list' is empty")
    images, matched = [], []
    for i, entry in enumerate(infos):
        data = _base64(entry, i)
        if data is None:
            data = _member(raw, i, entry.get("image_name"))
        images.append({"index": i, "data": data, "sentence": None, "similarity": None})
        j, sim = entry.get("matched_text_index"), entry.get("matched_sim")
        ok = isinstance(j, int) and not isinstance(j, bool) and 0 <= j < len(sentences) and isinstance(sim, (int, float))
        matched.append((j, float(sim)) if ok else None)
    similarity = meta.get("similarity_matrix")
    if similarity is not None:
        rows_ok = isinstance(similarity, list) and len(similarity) == len(infos) and all(
            isinstance(r, list) and len(r) == len(sentences) and all(isinstance(x, (int, float)) for x in r)
            for r in similarity)
        if not rows_ok:
            raise BadSample("bad_json", f"json 'similarity_matrix' is not {len(infos)} x {len(sentences)} numbers "
                                        "(images x sentences)")
    return Document(sentences, images, similarity, matched)


def _parse_obelics(raw: dict[str, Any], meta: dict[str, Any]) -> Document:
    texts, names = meta["texts"], meta["images"]
    if not isinstance(texts, list) or not isinstance(names, list) or len(texts) != len(names):
        raise BadSample("bad_json", "json 'texts' and 'images' are not lists of one length")
    sentences: list[str] = []
    images: list[dict[str, Any]] = []
    for i, (text, name) in enumerate(zip(texts, names)):
        if (text is None) == (name is None):
            raise BadSample("bad_json", f"position {i} has {'both' if text is not None else 'neither'} a text and an image")
        if text is not None:
            if not isinstance(text, str):
                raise BadSample("bad_json", f"texts[{i}] is a {type(text).__name__}, not a string")
            sentences.append(text)
        else:
            images.append({"index": i, "data": _member(raw, i, name), "sentence": len(sentences), "similarity": None})
    if not any(s.strip() for s in sentences):
        raise BadSample("no_text", "every entry of 'texts' is empty")
    return Document(sentences, images, placed=True)


def assign_images(doc: Document, method: str, threshold: float, drops: Counter) -> list[dict[str, Any]]:
    """The images that keep a place, in reading order (by sentence, then index). MMC4: each image
    goes before a sentence by ``method`` and stays if its similarity is at least ``threshold``;
    the others are counted in ``drops``. OBELICS images keep their places."""
    if not doc.placed:
        if method == "hungarian" and doc.similarity is not None and doc.images:
            from scipy.optimize import linear_sum_assignment

            rows, cols = linear_sum_assignment(torch.tensor(doc.similarity).neg().numpy())
            given = dict(zip(rows.tolist(), cols.tolist()))
            for image in doc.images:
                j = given.get(image["index"])
                if j is None:
                    drops["unassigned"] += 1
                    continue
                image["sentence"], image["similarity"] = j, float(doc.similarity[image["index"]][j])
        else:
            for image, match in zip(doc.images, doc.matched):
                if match is None:
                    drops["unassigned"] += 1
                    continue
                image["sentence"], image["similarity"] = match
        kept = []
        for image in doc.images:
            if image["sentence"] is None:
                continue
            if image["similarity"] < threshold:
                drops["below_threshold"] += 1
                continue
            kept.append(image)
    else:
        kept = list(doc.images)
    return sorted(kept, key=lambda im: (im["sentence"], im["index"]))


def document_ids(sentences: Sequence[str], placed: Sequence[int], encode: Any, image_id: int, end_id: int,
                 bos_id: int | None, eos_id: int | None) -> list[int]:
    """Token ids of a document in OpenFlamingo's layout: ``placed[k]`` is the sentence the k-th
    image (in reading order) goes before; ``encode(text) -> ids`` tokenises a run of text.
    Sentences are joined by one space; no space next to ``<image>`` or before ``<|endofchunk|>``."""
    ids: list[int] = [] if bos_id is None else [bos_id]
    before: dict[int, int] = Counter(placed)
    run: list[str] = []
    seen_image = text_in_chunk = False

    def flush() -> None:
        nonlocal text_in_chunk
        text = " ".join(s.strip() for s in run if s.strip())
        run.clear()
        if text:
            ids.extend(encode(text))
            text_in_chunk = True

    for j, sentence in enumerate(sentences):
        for _ in range(before.get(j, 0)):
            flush()
            if seen_image and text_in_chunk:
                ids.append(end_id)  # close the chunk the previous image opened
            ids.append(image_id)
            seen_image, text_in_chunk = True, False
        run.append(sentence)
    flush()
    ids.append(end_id)
    if eos_id is not None:
        ids.append(eos_id)
    return ids


def chunk_labels(ids: Sequence[int], image_id: int, end_id: int) -> list[int]:
    """Next-token targets of a document row (OpenFlamingo's MMC4 masking): ``-100`` on ``<image>``
    tokens, on everything before the first image, and on what follows an ``<|endofchunk|>`` up to
    the next image (the end token after the last chunk included); padding is the collator's."""
    labels, inside = [], False
    for t in ids:
        if t == image_id:
            inside = True
            labels.append(IGNORE_INDEX)
        elif not inside:
            labels.append(IGNORE_INDEX)
        else:
            labels.append(t)
            if t == end_id:
                inside = False
    return labels


@dataclass
class DocumentLayout:
    """How documents become token rows and image stacks (the options of :class:`InterleavedDecoder`)."""

    assign: str = "hungarian"
    threshold: float = 0.24
    max_images: int = 6
    max_tokens: int = 256
    min_images: int = 1
    single_image_keep: float = 0.5
    min_image_bytes: int = 0
    max_image_bytes: int = 20_000_000
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def check(self) -> None:
        if self.assign not in ASSIGN:
            raise UserError(f"assign must be one of {ASSIGN}, got {self.assign!r}")
        if not -1.0 <= self.threshold <= 1.0:
            raise UserError(
                f"threshold={self.threshold} is off the scale of MMC4's similarities (CLIP cosines, -1 to 1; "
                "OpenFlamingo's recipe uses 0.24). A value like 30 would drop every image."
            )
        if not 1 <= self.min_images <= self.max_images:
            raise UserError(f"need 1 <= min_images <= max_images, got min_images={self.min_images}, max_images={self.max_images}")
        if self.max_tokens < 4:
            raise UserError(f"max_tokens must be at least 4, got {self.max_tokens}")
        if not 0.0 <= self.single_image_keep <= 1.0:
            raise UserError(f"single_image_keep is a probability, got {self.single_image_keep}")


class InterleavedDecoder:
    """Raw document sample -> ``{"images": [N, 3, H, W], "input_ids", "labels"}`` (and the images
    dropped, per reason, under :data:`~lit_vlm.datamodules.stream.DROPPED`).

    Cheap work first: parsing and assignment, then each placed image's bytes and decoding in
    reading order until ``max_images`` are kept, then the token row (truncated to ``max_tokens``;
    images whose ``<image>`` falls outside, or ends the row, are dropped), then the document rules
    (``min_images``; a single-image document kept with probability ``single_image_keep``).
    A skipped document carries its dropped images on the :class:`BadSample` (``dropped``).
    """

    def __init__(self, transform: Compose, tokenizer: Any, layout: DocumentLayout, train: bool) -> None:
        layout.check()
        self.transform = transform
        self.tokenizer = tokenizer
        self.layout = layout
        self.train = train

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.backend.encode(text, add_special_tokens=False).ids

    def __call__(self, raw: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        drops: Counter = Counter()
        try:
            return self._decode(raw, generator, drops)
        except BadSample as bad:
            bad.dropped = dict(drops)
            raise

    def _decode(self, raw: dict[str, Any], generator: torch.Generator, drops: Counter) -> dict[str, Any]:
        lay, tok = self.layout, self.tokenizer
        doc = parse_document(raw)
        images, pixels = [], []
        for image in assign_images(doc, lay.assign, lay.threshold, drops):
            if len(images) == lay.max_images:
                drops["over_max_images"] += 1
                continue
            data = image["data"]
            if data is None:
                drops["missing_image"] += 1
                continue
            if not lay.min_image_bytes <= len(data) <= lay.max_image_bytes:
                drops["image_bytes"] += 1
                continue
            try:
                pixels.append(self.transform(decode_image(data, lay.max_pixels), generator))
            except BadSample:
                drops["image_decode"] += 1
                continue
            images.append(image)
        image_id, end_id = tok.token_to_id(IMAGE_TOKEN), tok.token_to_id(END_OF_CHUNK)
        ids = document_ids(doc.sentences, [im["sentence"] for im in images], self._encode, image_id, end_id,
                           tok.bos_id, tok.eos_id)[: lay.max_tokens]
        while ids and ids[-1] == image_id:  # an image with no text after it teaches nothing
            ids.pop()
            if ids and ids[-1] == end_id:
                ids.pop()
        kept = ids.count(image_id)
        if kept < len(images):
            drops["truncated"] += len(images) - kept
            images, pixels = images[:kept], pixels[:kept]
        if kept < lay.min_images:
            raise BadSample("too_few_images", f"{kept} image(s) left, min_images {lay.min_images}")
        if kept == 1 and self.train and not doc.pair and float(torch.rand((), generator=generator)) >= lay.single_image_keep:
            raise BadSample("single_image", f"one image, kept with probability {lay.single_image_keep}")
        return {
            "images": torch.stack(pixels),  # [N, 3, H, W]
            "input_ids": torch.tensor(ids),  # [T]
            "labels": torch.tensor(chunk_labels(ids, image_id, end_id)),  # [T]
            DROPPED: dict(drops),
        }


def with_media_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """``tokenizer`` with ``<image>`` and ``<|endofchunk|>`` (added as special tokens after its
    vocabulary when missing, as OpenFlamingo adds them; a model resizes its embedding to match)."""
    missing = [t for t in (IMAGE_TOKEN, END_OF_CHUNK) if tokenizer.token_to_id(t) is None]
    if missing:
        tokenizer.backend.add_special_tokens(missing)
    return tokenizer


class InterleavedCollator:
    """Documents -> an :class:`~lit_vlm.datamodules.batch.InterleavedBatch`: ``images`` [B, N, 3, H, W]
    (zeros past each document's images, ``media_mask`` [B, N] marking the real ones), ``input_ids``,
    ``attention_mask`` and ``labels`` [B, T] (right-padded; labels -100 on padding) and
    ``media_locations`` [B, T] (where ``<image>`` tokens are)."""

    def __init__(self, pad_id: int, image_id: int) -> None:
        self.pad_id = pad_id
        self.image_id = image_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        b = len(samples)
        n = max(s["images"].shape[0] for s in samples)
        t = max(s["input_ids"].shape[0] for s in samples)
        images = samples[0]["images"].new_zeros((b, n, *samples[0]["images"].shape[1:]))  # [B, N, 3, H, W]
        media_mask = torch.zeros(b, n, dtype=torch.bool)  # [B, N]
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)  # [B, T]
        labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)  # [B, T]
        mask = torch.zeros(b, t, dtype=torch.long)  # [B, T]
        for i, s in enumerate(samples):
            k, length = s["images"].shape[0], s["input_ids"].shape[0]
            images[i, :k] = s["images"]
            media_mask[i, :k] = True
            ids[i, :length], labels[i, :length], mask[i, :length] = s["input_ids"], s["labels"], 1
        return {"images": images, "media_mask": media_mask, "input_ids": ids, "attention_mask": mask,
                "labels": labels, "media_locations": ids == self.image_id}


class InterleavedCorpus(Corpus):
    """Interleaved documents (MMC4, OBELICS) from webdataset shards; the arguments are
    :class:`InterleavedDataModule`'s of the same names."""

    skip_reasons = INTERLEAVED_SKIP_REASONS

    def __init__(self, tokenizer: str | Tokenizer, image_size: int = 64, mean: tuple[float, float, float] = CLIP_MEAN,
                 std: tuple[float, float, float] = CLIP_STD, train_crop_scale: tuple[float, float] = (0.9, 1.0),
                 layout: DocumentLayout | None = None, docs_config: dict[str, Any] | None = None) -> None:
        self.image_size = int(image_size)
        self.docs_config = dict(docs_config or {})
        unknown = sorted(set(self.docs_config) - {f.name for f in dataclasses.fields(world_docs.DocsConfig)})
        if unknown:
            raise UserError(f"docs_config: unknown key(s) {unknown}; the keys are DocsConfig's "
                            f"({', '.join(f.name for f in dataclasses.fields(world_docs.DocsConfig))})")
        self.mean, self.std = tuple(mean), tuple(std)
        self.train_crop_scale = tuple(train_crop_scale)
        self.layout = layout or DocumentLayout()
        self.layout.check()
        if not isinstance(tokenizer, Tokenizer):
            try:
                tokenizer = Tokenizer.load(tokenizer)
            except (OSError, ValueError) as exc:
                raise UserError(f"tokenizer={tokenizer!r}: {exc}") from exc
        self.tokenizer = with_media_tokens(tokenizer)

    def prepare(self, root: str) -> None:
        """Write the synthetic world's documents (``docs_config``) in ``root`` when it is missing or empty."""
        if is_empty(root):
            logger.info("writing the synthetic world's interleaved documents in %s", root)
            world_docs.generate(root, world_docs.DocsConfig(**self.docs_config), progress=False)
        super().prepare(root)

    def decoder(self, split: Split) -> InterleavedDecoder:
        transform = (train_transform(self.image_size, self.mean, self.std, self.train_crop_scale) if split.train
                     else eval_transform(self.image_size, self.mean, self.std))
        return InterleavedDecoder(transform, self.tokenizer, self.layout, train=split.train)

    def collator(self, split: Split) -> InterleavedCollator:
        return InterleavedCollator(self.tokenizer.pad_id, self.tokenizer.token_to_id(IMAGE_TOKEN))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **dataclasses.asdict(self.layout)}


class InterleavedDataModule(ShardDataModule):
    """Interleaved documents streamed from webdataset shards (see the module docstring).

    Args:
        tokenizer: The language model's folder (or a ``tokenizer.json``); ``<image>`` and
            ``<|endofchunk|>`` are added to it when missing. ``lit-vlm`` fills it from the model's
            ``language_model``.
        image_size: Square side images are resized and cropped to.
        assign: ``hungarian`` (one image per sentence, on MMC4's similarity matrix) or ``matched``
            (each image before its ``matched_text_index``).
        threshold: Least image-sentence similarity kept, on MMC4's cosine scale (OpenFlamingo: 0.24).
        max_images: Images per document at most (the first ones in reading order).
        max_tokens: Tokens per document at most.
        min_images: Documents with fewer images left are skipped (``too_few_images``).
        single_image_keep: Probability of keeping a one-image training document (OpenFlamingo: 0.5).
        min_image_bytes: Smaller images are dropped (OpenFlamingo drops MMC4 images of 10 kB or less).
        max_image_bytes: Larger images are dropped.
        max_image_pixels: Decompression-bomb limit (images over it are dropped as undecodable).
        docs_config: The synthetic world's documents written to a missing ``root``
            (:class:`~lit_vlm.datamodules.world_docs.DocsConfig` fields, e.g. ``{num_train: 64}``).
        **kwargs: :class:`~lit_vlm.datamodules.shards.ShardDataModule`'s (shards, batch size, ...).
    """

    def __init__(self, tokenizer: str | None = None, image_size: int = 64, assign: str = DocumentLayout.assign,
                 threshold: float = DocumentLayout.threshold, max_images: int = DocumentLayout.max_images,
                 max_tokens: int = DocumentLayout.max_tokens, min_images: int = DocumentLayout.min_images,
                 single_image_keep: float = DocumentLayout.single_image_keep,
                 min_image_bytes: int = DocumentLayout.min_image_bytes, max_image_bytes: int = DocumentLayout.max_image_bytes,
                 max_image_pixels: int | None = DocumentLayout.max_pixels, docs_config: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        if tokenizer is None:
            raise UserError("InterleavedDataModule needs tokenizer: the language model's folder (lit-vlm fills it "
                            "from the model's language_model when the data leaves it unset)")
        layout = DocumentLayout(assign, threshold, max_images, max_tokens, min_images, single_image_keep,
                                min_image_bytes, max_image_bytes, max_image_pixels)
        super().__init__(InterleavedCorpus(tokenizer, image_size, layout=layout, docs_config=docs_config), **kwargs)
        self.save_hyperparameters()

    @property
    def tokenizer(self) -> Tokenizer:
        return self.corpus.tokenizer
