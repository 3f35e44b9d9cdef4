"""Dataset converters: COCO / Flickr30k Karpathy splits and VQAv2 into webdataset shards.

Both converters write the layout of the synthetic world (:mod:`lit_vlm.datamodules.synth`), so
``ImageTextDataModule(root=OUT)`` reads a converted dataset exactly like a generated one::

    OUT/
      manifest.json                          written last, atomically ("format": "lit-vlm-converted")
      train/shard-000000.tar ...             img2dataset layout: KEY.jpg (or .png/.webp), KEY.txt, KEY.json
      val/shard-000000.tar ...
      test/shard-000000.tar ...
      annotations/captions_{val,test}.json   (karpathy) COCO caption format, what pycocoevalcap reads
      annotations/vqa_{split}_questions.json (vqav2) the official files, restricted to what was converted
      annotations/vqa_{split}_annotations.json
      reports/karpathy.json, reports/vqav2_{split}.json   what was skipped, by name

Images are packed into the shards by default.  With ``pack=False`` (``--no-pack``) the image
folders stay where they are: a sample has no image member and its JSON holds ``image_path``,
relative to the image folder, whose absolute path the manifest records per split as
``image_root`` (the DataModule resolves against it; its ``image_root`` argument overrides).

**Karpathy** (``dataset_coco.json`` / ``dataset_flickr30k.json``): one sample per image, key
``%012d`` of its ``image_id`` (``cocoid`` for COCO, ``imgid`` otherwise), ``KEY.txt`` the first
caption and ``KEY.json`` with ``key``, ``image_id``, ``split``, ``karpathy_split``, ``filename``,
``width``, ``height``, ``caption`` and ``captions`` (the ``raw`` sentences, whitespace collapsed).
``restval`` goes to train unless ``restval_to_train=False`` (then it is left out and counted).
An image is looked up at ``IMAGES/filepath/filename``, then ``IMAGES/filename``.

**VQAv2** (official questions JSON, optional annotations JSON): one sample per *image* (each image
once), key ``%012d`` of its ``image_id``, no ``.txt``, and ``KEY.json`` with ``key``, ``image_id``,
``split``, ``filename``, ``width``, ``height`` and ``questions``: per question ``question_id``,
``question`` and, with annotations, ``answers`` (the annotators' answer strings, 10 in VQAv2),
``answer_confidences``, ``answer_type``, ``question_type`` and ``multiple_choice_answer`` -- the
layout of the synthetic world's evaluation shards.  Image files are named by a pattern
(default from the questions file's ``data_subtype``: ``COCO_val2014_%012d.jpg`` for val2014).

Bad input.  Missing image files, unreadable images and malformed entries are reported by name
(warnings while converting, a summary at the end, the full lists in the report JSON) and left
out; with ``strict=True`` (``--strict``) the first such problem aborts the conversion with an
error naming it, and ``OUT`` is left as it was.

Atomicity.  Shards and annotation files are written under temporary names in a staging folder
inside ``OUT``; only when everything is written are they renamed into place, and the manifest is
written last.  While files are being moved the manifest is absent and a marker file
(:data:`MARKER`) is present, so a killed conversion never leaves a folder that looks complete.
Converting into an existing converted folder adds or (with ``overwrite=True``) replaces splits
and keeps the others; two conversions must not write into the same folder at the same time.

Usage::

    lit-vlm data karpathy --json dataset_coco.json --images /data/coco --out data/coco-karpathy
    lit-vlm data vqav2 --questions v2_OpenEnded_mscoco_val2014_questions.json \\
        --annotations v2_mscoco_val2014_annotations.json --images /data/coco/val2014 --split val --out data/vqav2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import posixpath
import shutil
import sys
import tarfile
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from PIL import Image

from lit_vlm.errors import MissingFileError, UserError
from lit_vlm.io import atomic_output, manifest_format, write_json_atomic

__all__ = [
    "FORMAT",
    "VERSION",
    "MANIFEST",
    "MARKER",
    "ConversionError",
    "ConversionReport",
    "convert_karpathy",
    "convert_vqav2",
    "default_image_pattern",
    "is_converted",
    "load_manifest",
    "karpathy_main",
    "vqav2_main",
    "main",
]

FORMAT = "lit-vlm-converted"
"""``manifest.json`` ``"format"`` of a converted dataset."""
VERSION = 1
MANIFEST = "manifest.json"
MARKER = ".lit-vlm-convert-incomplete"
"""Present (and the manifest absent) while a conversion moves its files into place."""

SPLITS: tuple[str, ...] = ("train", "val", "test")
KARPATHY_SPLITS: tuple[str, ...] = ("train", "restval", "val", "test")

_STAGING_PREFIX = ".convert-staging-"
_NATIVE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_MAX_WARNINGS = 20
_SHOWN_IN_SUMMARY = 10


class ConversionError(UserError):
    """Unusable input, an output folder that cannot be written, or a problem under ``strict``."""


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


@dataclass
class ConversionReport:
    """What a conversion wrote and what it left out (also saved as ``OUT/reports/*.json``).

    Attributes:
        kind: ``"karpathy"`` or ``"vqav2"``.
        dataset: ``"coco"``, ``"flickr30k"``, ... (Karpathy) or the VQA ``data_subtype``.
        out: Output folder.
        packed: Images stored in the shards (True) or referenced by ``image_path`` (False).
        samples: Samples written per split.
        questions: VQA questions written per split (empty for Karpathy).
        missing_images: Image files that do not exist (paths relative to the image folder).
        outside_images: Entries whose image path leaves the image folder (``../``, an absolute
            path): never read, never packed.
        unreadable_images: ``"path: reason"`` for image files that could not be read or decoded.
        malformed: ``"where: what"`` for entries that were left out (e.g. ``"images[12]: ..."``).
        skipped: Other entries left out on purpose, by reason (e.g. ``{"restval": 30504}``).
        notes: Anything else worth knowing (nothing was dropped for these).
    """

    kind: str
    dataset: str
    out: str
    packed: bool
    samples: dict[str, int] = field(default_factory=dict)
    questions: dict[str, int] = field(default_factory=dict)
    missing_images: list[str] = field(default_factory=list)
    outside_images: list[str] = field(default_factory=list)
    unreadable_images: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        """Number of missing, outside-the-folder and unreadable images and malformed entries."""
        return len(self.missing_images) + len(self.outside_images) + len(self.unreadable_images) + len(self.malformed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return asdict(self)

    def summary(self) -> str:
        """Human-readable summary: counts per split, then every problem kind with a few names."""
        layout = "packed" if self.packed else "image_path, not packed"
        lines = [f"{self.kind} ({self.dataset}) -> {self.out} ({layout})"]
        for split, n in self.samples.items():
            extra = f", {self.questions[split]} questions" if split in self.questions else ""
            lines.append(f"  {split:5s}: {n} samples{extra}")
        for title, items in (
            ("missing image files", self.missing_images),
            ("image paths outside the image folder", self.outside_images),
            ("unreadable images", self.unreadable_images),
            ("malformed entries", self.malformed),
        ):
            if items:
                lines.append(f"  {len(items)} {title} (left out):")
                lines += [f"    {item}" for item in items[:_SHOWN_IN_SUMMARY]]
                if len(items) > _SHOWN_IN_SUMMARY:
                    lines.append(f"    ... and {len(items) - _SHOWN_IN_SUMMARY} more (see the report JSON)")
        for reason, n in self.skipped.items():
            lines.append(f"  {n} entries left out: {reason}")
        lines += [f"  note: {note}" for note in self.notes]
        if not self.problems:
            lines.append("  no missing, outside, unreadable or malformed input")
        return "\n".join(lines)


class _Problems:
    """Collects problems into a report; raises at once under ``strict``; warns for the first few."""

    def __init__(self, report: ConversionReport, strict: bool, progress: bool) -> None:
        self.report = report
        self.strict = strict
        self.progress = progress
        self.warned = 0

    def _add(self, items: list[str], text: str, what: str) -> None:
        if self.strict:
            raise ConversionError(f"strict mode: {what}: {text}")
        items.append(text)
        if self.progress:
            if self.warned < _MAX_WARNINGS:
                print(f"[convert] warning: {what}: {text}", file=sys.stderr, flush=True)
            elif self.warned == _MAX_WARNINGS:
                print("[convert] further warnings are only counted (see the summary)", file=sys.stderr, flush=True)
        self.warned += 1

    def missing(self, name: str) -> None:
        self._add(self.report.missing_images, name, "image file missing")

    def outside(self, name: str) -> None:
        self._add(self.report.outside_images, name, "image path outside the image folder")

    def unreadable(self, name: str, reason: str) -> None:
        self._add(self.report.unreadable_images, f"{name}: {reason}", "image unreadable")

    def malformed(self, text: str) -> None:
        self._add(self.report.malformed, text, "malformed entry")


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _inside(rel: str | Path) -> bool:
    """Whether an entry's image path stays inside the image folder: relative (no root, no drive)
    and no ``..`` that climbs out. Judged on the path as written: links inside the folder are the
    user's own choice."""
    text = str(rel).replace("\\", "/")
    if PurePosixPath(text).is_absolute() or PureWindowsPath(str(rel)).drive:
        return False
    parts = PurePosixPath(posixpath.normpath(text)).parts
    return bool(parts) and parts[0] != ".."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _key(image_id: int) -> str:
    return f"{image_id:012d}"


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ConversionError(f"{what} {str(path)!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read {what} {str(path)!r}: {exc}") from exc


def _write_json_atomic(path: Path, obj: Any, indent: int | None = None) -> None:
    """Atomic JSON write (compact unless ``indent``): see :func:`lit_vlm.io.write_json_atomic`."""
    write_json_atomic(path, obj, indent=indent)


def _copy_atomic(src: Path, dst: Path) -> None:
    with open(src, "rb") as source, atomic_output(dst, "wb") as target:
        shutil.copyfileobj(source, target)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[convert] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _inspect_image(source: bytes | Path, verify: bool) -> tuple[str, int, int, bytes | None]:
    """``(extension, width, height, bytes)`` of an encoded image (bytes, or a file left in place).

    JPEG, PNG and WebP bytes are kept as they are; other formats Pillow reads are re-encoded as
    PNG (the DataModule looks for ``jpg``/``jpeg``/``png``/``webp`` members).  A file left in
    place is only checked (the DataModule decodes any format from a path; bytes ``None``).  Only
    the header is read unless ``verify`` (or a re-encode) needs the pixels.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the data is not a readable image.
    """
    data = source if isinstance(source, bytes) else None
    if data is not None and not data:
        raise UserError("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data) if data is not None else source) as img:
                width, height = img.size
                ext = _NATIVE_FORMATS.get(img.format or "")
                if ext is not None or data is None:
                    if verify:
                        img.load()
                    return ext or (img.format or "").lower(), width, height, data
                img.load()
                has_alpha = "A" in img.getbands() or "transparency" in img.info
                converted = img.convert("RGBA" if has_alpha else "RGB")
                buf = io.BytesIO()
                converted.save(buf, format="PNG")
                return "png", width, height, buf.getvalue()
    except FileNotFoundError:
        raise
    except Exception as exc:  # Pillow raises many exception types for bad files
        raise UserError(f"{type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Output folder: staging, commit, manifest
# --------------------------------------------------------------------------------------------


def is_converted(root: str | os.PathLike) -> bool:
    """True if ``root/manifest.json`` exists and describes a converted dataset."""
    return manifest_format(Path(root) / MANIFEST) == FORMAT


def load_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``root/manifest.json`` of a converted dataset.

    Raises:
        FileNotFoundError: no manifest (never converted, or a conversion was cut off).
        ValueError: unreadable manifest, another format or version, or a malformed ``splits``.
    """
    path = Path(root) / MANIFEST
    if not path.is_file():
        hint = " (a conversion was interrupted: run it again)" if (Path(root) / MARKER).exists() else ""
        raise MissingFileError(f"no converted-dataset manifest at {path}{hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise UserError(f"{path} has version {manifest.get('version')!r}; this code reads version {VERSION}")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("shards"), list) for e in splits.values()
    ):
        raise UserError(f"{path}: 'splits' must map split names to {{'shards': [...], ...}}")
    return manifest


def _annotation_split(name: str) -> str | None:
    """The split an annotation entry describes: ``captions_val`` / ``vqa_val_questions`` -> ``val``."""
    parts = name.split("_")
    if len(parts) == 2 and parts[0] == "captions":
        return parts[1]
    if len(parts) == 3 and parts[0] == "vqa":
        return parts[1]
    return None


class _Output:
    """An output folder being written: checks, staging folder, commit (see the module docstring)."""

    def __init__(self, out: Path, splits: Sequence[str], overwrite: bool, progress: bool) -> None:
        self.out = out
        self.splits = list(splits)
        self.progress = progress
        self.previous: dict[str, Any] = {}
        self.created_marker = False
        if out.exists() and not out.is_dir():
            raise ConversionError(f"output {str(out)!r} exists and is not a folder")
        manifest_path, marker = out / MANIFEST, out / MARKER
        if manifest_path.is_file():
            try:
                data = json.loads(manifest_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = None
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                kind = data.get("format") if isinstance(data, dict) else "unreadable"
                raise ConversionError(
                    f"output {str(out)!r} holds another dataset (manifest format {kind!r}); use an empty folder"
                )
            self.previous = load_manifest(out)
            taken = [s for s in self.splits if s in self.previous["splits"]]
            if taken and not overwrite:
                raise ConversionError(
                    f"output {str(out)!r} already holds split(s) {taken}; pass --overwrite (overwrite=True) "
                    "to replace them (other splits are kept)"
                )
        elif marker.exists():  # an interrupted conversion: recover the splits it had not touched
            try:
                recovered = json.loads(marker.read_text(encoding="utf-8") or "{}")
            except ValueError:
                recovered = {}
            self.previous = recovered if isinstance(recovered, dict) and recovered.get("splits") else {}
        elif out.is_dir() and any(out.iterdir()):
            raise ConversionError(
                f"output {str(out)!r} is not empty and is not a converted dataset; refusing to write into it"
            )
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(f"{_STAGING_PREFIX}*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        if not manifest_path.is_file() and not marker.exists():
            marker.write_text("{}\n", encoding="utf-8")  # the folder is ours from now on
            self.created_marker = True
        self.staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=out))

    def abort(self) -> None:
        """Remove the staging folder (and the folder itself if this run created it empty)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        if self.created_marker:
            (self.out / MARKER).unlink(missing_ok=True)
            try:
                self.out.rmdir()
            except OSError:
                pass

    def commit(
        self,
        split_entries: dict[str, dict[str, Any]],
        annotations: dict[str, Path],
        report_name: str,
        report: ConversionReport,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        """Move staged shards/annotations into place and write the manifest; return it."""
        out = self.out
        replaced = set(split_entries)
        carried_splits = {s: e for s, e in self.previous.get("splits", {}).items() if s not in replaced}
        carried_ann = {
            name: rel
            for name, rel in self.previous.get("annotations", {}).items()
            if _annotation_split(name) not in replaced and name not in annotations
        }
        carried = {**self.previous, "splits": carried_splits, "annotations": carried_ann} if carried_splits else {}
        _write_json_atomic(out / MARKER, carried)
        (out / MANIFEST).unlink(missing_ok=True)
        # From here on the folder has no manifest: a kill leaves it recognisably incomplete.
        for split, entry in split_entries.items():
            target = out / split
            target.mkdir(exist_ok=True)
            names = [Path(p).name for p in entry["shards"]]
            for name in names:
                os.replace(self.staging / split / name, target / name)
            for path in target.iterdir():
                if path.is_file() and path.name.startswith("shard-") and path.name not in names:
                    path.unlink()
        stale = [
            rel for name, rel in self.previous.get("annotations", {}).items()
            if name not in carried_ann and name not in annotations
        ]
        for rel in stale:
            path = (out / rel).resolve()
            if path.is_relative_to(out.resolve()) and path.is_file():
                path.unlink()
        ann_rel: dict[str, str] = {}
        for name, staged in annotations.items():
            rel = f"annotations/{name}.json"
            (out / "annotations").mkdir(exist_ok=True)
            os.replace(staged, out / rel)
            ann_rel[name] = rel
        report_rel = f"reports/{report_name}.json"
        _write_json_atomic(out / report_rel, report.to_dict(), indent=2)
        for entry in split_entries.values():
            entry["report"] = report_rel
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            **{k: v for k, v in self.previous.items() if k not in ("format", "version", "splits", "annotations")},
            **extra,
            "splits": {**carried_splits, **split_entries},
            "annotations": {**carried_ann, **ann_rel},
        }
        manifest["splits"] = {s: manifest["splits"][s] for s in sorted(manifest["splits"], key=_split_order)}
        _write_json_atomic(out / MANIFEST, manifest, indent=2)
        (out / MARKER).unlink(missing_ok=True)
        shutil.rmtree(self.staging, ignore_errors=True)
        return manifest


def _split_order(split: str) -> tuple[int, str]:
    return (SPLITS.index(split) if split in SPLITS else len(SPLITS), split)


@dataclass
class _Item:
    """One sample to write: its key, source image and JSON record (without image fields)."""

    key: str
    image: Path | None  # None: a text-only sample
    rel: str
    record: dict[str, Any]
    text: str | None = None


def _write_split(
    output: _Output,
    split: str,
    items: Sequence[_Item],
    *,
    pack: bool,
    verify: bool,
    shard_size: int,
    problems: _Problems,
    progress: bool,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Write ``items`` into staged shards of ``split``; return the records written and the shards."""
    directory = output.staging / split
    directory.mkdir(parents=True, exist_ok=True)
    written: list[dict[str, Any]] = []
    shards: list[str] = []
    tar: tarfile.TarFile | None = None
    handle: Any = None
    in_shard = 0
    start = time.perf_counter()

    def close_shard() -> None:
        nonlocal tar, handle
        if tar is not None:
            tar.close()
            handle.close()
            os.chmod(directory / shards[-1], 0o644)
        tar = handle = None

    try:
        for index, item in enumerate(items):
            if item.image is None:  # a text-only sample (LLaVA's mixture has them)
                ext, data, record = None, None, dict(item.record)
            else:
                try:
                    ext, width, height, data = _inspect_image(item.image.read_bytes() if pack else item.image, verify)
                except FileNotFoundError:
                    problems.missing(item.rel)
                    continue
                except (OSError, ValueError) as exc:
                    problems.unreadable(item.rel, str(exc))
                    continue
                record = {**item.record, "width": width, "height": height}
                if not pack:
                    record["image_path"] = item.rel
            if tar is None or in_shard >= shard_size:
                close_shard()
                shards.append(f"shard-{len(shards):06d}.tar")
                handle = open(directory / shards[-1], "wb")
                tar = tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT)
                in_shard = 0
            if data is not None:
                _add_member(tar, f"{item.key}.{ext}", data)
            if item.text is not None:
                _add_member(tar, f"{item.key}.txt", item.text.encode("utf-8"))
            _add_member(tar, f"{item.key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8"))
            in_shard += 1
            written.append(record)
            if progress and (index + 1) % 5000 == 0:
                _log(progress, f"{split}: {index + 1}/{len(items)} images ({time.perf_counter() - start:.0f}s)")
        close_shard()
    finally:
        if tar is not None:
            tar.close()
            handle.close()
    return written, [f"{split}/{name}" for name in shards]


def _split_entry(
    shards: list[str], written: list[dict[str, Any]], info: dict[str, Any], pack: bool, images: Path
) -> dict[str, Any]:
    entry: dict[str, Any] = {"shards": shards, "num_samples": len(written), **info, "packed": pack}
    if not pack:
        entry["image_root"] = str(images.resolve())
    return entry


def _check_common(images: Path, shard_size: int) -> None:
    if not images.is_dir():
        raise ConversionError(f"image folder {str(images)!r} does not exist or is not a folder")
    if not _is_int(shard_size) or shard_size < 1:
        raise ConversionError(f"shard_size must be an integer >= 1, got {shard_size!r}")


# --------------------------------------------------------------------------------------------
# Karpathy splits (COCO, Flickr30k, Flickr8k)
# --------------------------------------------------------------------------------------------


def _karpathy_items(
    data: Any,
    json_path: Path,
    images: Path,
    dataset: str | None,
    restval_to_train: bool,
    problems: _Problems,
    report: ConversionReport,
) -> tuple[str, dict[str, list[_Item]]]:
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ConversionError(
            f"{str(json_path)!r} is not a Karpathy split file: expected an object with an 'images' list"
        )
    if dataset is None:
        dataset = data.get("dataset")
        if not isinstance(dataset, str) or not dataset:
            first = next((e for e in data["images"] if isinstance(e, dict)), {})
            dataset = "coco" if "cocoid" in first else "flickr30k"
            report.notes.append(f"no 'dataset' field in {json_path.name}: assumed {dataset!r}")
    id_field = "cocoid" if dataset == "coco" else "imgid"
    report.dataset = dataset
    items: dict[str, list[_Item]] = {s: [] for s in SPLITS}
    seen: dict[int, int] = {}
    restval = empty_captions = 0
    for i, entry in enumerate(data["images"]):
        where = f"{json_path.name}: images[{i}]"
        if not isinstance(entry, dict):
            problems.malformed(f"{where}: a {type(entry).__name__}, not an object")
            continue
        filename = entry.get("filename")
        if not isinstance(filename, str) or not filename.strip():
            problems.malformed(f"{where}: no 'filename' string")
            continue
        where = f"{where} ({filename})"
        split = entry.get("split")
        if split not in KARPATHY_SPLITS:
            problems.malformed(f"{where}: 'split' is {split!r}, not one of {list(KARPATHY_SPLITS)}")
            continue
        image_id = entry.get(id_field)
        if not _is_int(image_id) or image_id < 0:
            problems.malformed(f"{where}: '{id_field}' is {image_id!r}, not a non-negative integer")
            continue
        if image_id in seen:
            problems.malformed(f"{where}: duplicate {id_field} {image_id} (first at images[{seen[image_id]}])")
            continue
        sentences = entry.get("sentences")
        if not isinstance(sentences, list) or not all(
            isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences
        ):
            problems.malformed(f"{where}: 'sentences' must be a list of objects with a 'raw' string")
            continue
        captions = [" ".join(s["raw"].split()) for s in sentences]
        captions = [c for c in captions if c]
        if not captions:
            problems.malformed(f"{where}: no non-empty caption")
            continue
        empty_captions += len(sentences) - len(captions)
        seen[image_id] = i
        if split == "restval":
            if not restval_to_train:
                restval += 1
                continue
            target = "train"
        else:
            target = split
        filepath = entry.get("filepath")
        candidates = []
        if isinstance(filepath, str) and filepath:
            candidates.append(Path(filepath) / filename)
        candidates.append(Path(filename))
        if not all(_inside(c) for c in candidates):
            problems.outside(next(c for c in candidates if not _inside(c)).as_posix())
            continue
        rel = next((c for c in candidates if (images / c).is_file()), None)
        if rel is None:
            problems.missing(candidates[0].as_posix())
            continue
        key = _key(image_id)
        record = {
            "key": key,
            "image_id": image_id,
            "split": target,
            "karpathy_split": split,
            "filename": filename,
            "caption": captions[0],
            "captions": captions,
        }
        items[target].append(_Item(key, images / rel, rel.as_posix(), record, text=captions[0]))
    if restval:
        report.skipped["restval (restval_to_train=False)"] = restval
    if empty_captions:
        report.notes.append(f"{empty_captions} empty captions dropped (their images kept their other captions)")
    return dataset, items


def _coco_captions(dataset: str, split: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """COCO caption ground truth (``images``: id/file_name/width/height; ``annotations``: id/image_id/caption)."""
    images = [
        {"id": r["image_id"], "file_name": r["filename"], "width": r["width"], "height": r["height"]} for r in records
    ]
    annotations = []
    for r in records:
        for caption in r["captions"]:
            annotations.append({"id": len(annotations) + 1, "image_id": r["image_id"], "caption": caption})
    info = {"description": f"{dataset} Karpathy {split} split, converted by lit-vlm", "version": "1.0"}
    return {"info": info, "licenses": [], "type": "captions", "images": images, "annotations": annotations}


def convert_karpathy(
    json_path: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dataset: str | None = None,
    pack: bool = True,
    strict: bool = False,
    shard_size: int = 1000,
    restval_to_train: bool = True,
    verify: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionReport:
    """Convert a Karpathy split file and its image folder into shards + COCO caption annotations.

    Args:
        json_path: ``dataset_coco.json`` / ``dataset_flickr30k.json`` / ``dataset_flickr8k.json``.
        images: Image folder; an entry's image is ``images/filepath/filename`` (COCO:
            ``images/val2014/COCO_val2014_...jpg``), else ``images/filename``.
        out: Output folder: missing, empty, or an earlier conversion (splits are replaced only
            with ``overwrite``).
        dataset: ``"coco"`` (image id = ``cocoid``) or another name (image id = ``imgid``);
            default: the file's ``"dataset"`` field.
        pack: Store the images in the shards (True) or only their ``image_path`` (False).
        strict: Fail on the first missing image, unreadable image or malformed entry.
        shard_size: Samples per shard.
        restval_to_train: Put ``restval`` images into train (the usual 113k-image COCO train
            split); False leaves them out.
        verify: Decode every image fully (slow) rather than its header only, so truncated
            files are caught here rather than skipped while training.
        overwrite: Replace the train/val/test splits of an earlier conversion in ``out``.
        progress: Print progress and warnings to stderr.

    Returns:
        The report (also written to ``out/reports/karpathy.json``).

    Raises:
        ConversionError: unusable input or output folder, or any problem under ``strict``.
    """
    json_path, images, out = Path(json_path), Path(images), Path(out)
    _check_common(images, shard_size)
    report = ConversionReport(kind="karpathy", dataset=dataset or "", out=str(out), packed=pack)
    problems = _Problems(report, strict, progress)
    _log(progress, f"reading {json_path}")
    data = _read_json(json_path, "Karpathy split file")
    dataset, items = _karpathy_items(data, json_path, images, dataset, restval_to_train, problems, report)
    output = _Output(out, SPLITS, overwrite, progress)
    try:
        entries: dict[str, dict[str, Any]] = {}
        annotations: dict[str, Path] = {}
        for split in SPLITS:
            _log(progress, f"{split}: writing {len(items[split])} images")
            written, shards = _write_split(
                output, split, items[split], pack=pack, verify=verify, shard_size=shard_size,
                problems=problems, progress=progress,
            )
            report.samples[split] = len(written)
            info = {"source": "karpathy", "dataset": dataset, "karpathy_file": str(json_path.resolve())}
            entries[split] = _split_entry(shards, written, info, pack, images)
            if split != "train":
                staged = output.staging / "annotations" / f"captions_{split}.json"
                _write_json_atomic(staged, _coco_captions(dataset, split, written))
                annotations[f"captions_{split}"] = staged
        output.commit(entries, annotations, "karpathy", report, {"created_by": "lit-vlm data karpathy"})
    except BaseException:
        output.abort()
        raise
    return report


# --------------------------------------------------------------------------------------------
# VQAv2
# --------------------------------------------------------------------------------------------


def default_image_pattern(data_subtype: str | None) -> str:
    """COCO file naming for a VQAv2 ``data_subtype``: ``val2014`` -> ``COCO_val2014_%012d.jpg``.

    ``test-dev2015`` and ``test2015`` use the ``test2015`` images; anything else (or ``None``)
    gives the val2014 naming.
    """
    folder = {"train2014": "train2014", "val2014": "val2014", "test2015": "test2015", "test-dev2015": "test2015"}
    return f"COCO_{folder.get(data_subtype or '', 'val2014')}_%012d.jpg"


def _image_name(pattern: str, image_id: int) -> str:
    """``pattern % image_id`` (``%012d`` style) or ``pattern.format(image_id=...)`` (``{image_id:012d}``)."""
    if "{" in pattern:
        return pattern.format(image_id=image_id)
    return pattern % image_id


def _check_pattern(pattern: str) -> None:
    try:
        a, b = _image_name(pattern, 1), _image_name(pattern, 2)
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise ConversionError(
            f"image_pattern {pattern!r} must take the image id as '%012d' or '{{image_id:012d}}': {exc}"
        ) from exc
    if a == b:
        raise ConversionError(f"image_pattern {pattern!r} does not use the image id")


def _vqa_questions(data: Any, path: Path, problems: _Problems) -> dict[int, dict[str, Any]]:
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise ConversionError(
            f"{str(path)!r} is not a VQAv2 questions file: expected an object with a 'questions' list"
        )
    kept: dict[int, dict[str, Any]] = {}
    for i, q in enumerate(data["questions"]):
        where = f"{path.name}: questions[{i}]"
        if not isinstance(q, dict):
            problems.malformed(f"{where}: a {type(q).__name__}, not an object")
            continue
        qid, image_id, text = q.get("question_id"), q.get("image_id"), q.get("question")
        if not _is_int(qid):
            problems.malformed(f"{where}: 'question_id' is {qid!r}, not an integer")
            continue
        where = f"{where} (question_id {qid})"
        if not _is_int(image_id) or image_id < 0:
            problems.malformed(f"{where}: 'image_id' is {image_id!r}, not a non-negative integer")
            continue
        if not isinstance(text, str) or not text.strip():
            problems.malformed(f"{where}: 'question' is {text!r}, not a non-empty string")
            continue
        if qid in kept:
            problems.malformed(f"{where}: duplicate question_id")
            continue
        kept[qid] = {"index": i, "image_id": image_id, "question": text}
    return kept


def _vqa_annotations(
    data: Any, path: Path, questions: dict[int, dict[str, Any]], problems: _Problems, report: ConversionReport
) -> tuple[dict[int, dict[str, Any]], set[int]]:
    """Usable annotations by question id, and the ids whose annotation was reported malformed."""
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ConversionError(
            f"{str(path)!r} is not a VQAv2 annotations file: expected an object with an 'annotations' list"
        )
    found: dict[int, dict[str, Any]] = {}
    rejected: set[int] = set()
    orphans = 0
    counts_off = 0
    for i, a in enumerate(data["annotations"]):
        where = f"{path.name}: annotations[{i}]"
        if not isinstance(a, dict):
            problems.malformed(f"{where}: a {type(a).__name__}, not an object")
            continue
        qid = a.get("question_id")
        if not _is_int(qid):
            problems.malformed(f"{where}: 'question_id' is {qid!r}, not an integer")
            continue
        where = f"{where} (question_id {qid})"
        if qid not in questions:
            orphans += 1
            continue
        if qid in found:
            problems.malformed(f"{where}: duplicate annotation")
            continue
        rejected.add(qid)  # until it passes every check
        if a.get("image_id") != questions[qid]["image_id"]:
            problems.malformed(
                f"{where}: image_id {a.get('image_id')!r} differs from the question's {questions[qid]['image_id']}"
            )
            continue
        answers = a.get("answers")
        if not isinstance(answers, list) or not answers or not all(
            isinstance(x, dict) and isinstance(x.get("answer"), str) for x in answers
        ):
            problems.malformed(f"{where}: 'answers' must be a non-empty list of objects with an 'answer' string")
            continue
        record: dict[str, Any] = {"index": i, "answers": [x["answer"] for x in answers]}
        confidences = [x.get("answer_confidence") for x in answers]
        if all(isinstance(c, str) for c in confidences):
            record["answer_confidences"] = confidences
        bad_field = next(
            (name for name in ("answer_type", "question_type", "multiple_choice_answer")
             if name in a and not isinstance(a[name], str)),
            None,
        )
        if bad_field is not None:
            problems.malformed(f"{where}: '{bad_field}' is {a[bad_field]!r}, not a string")
            continue
        for name in ("answer_type", "question_type", "multiple_choice_answer"):
            if name in a:
                record[name] = a[name]
        counts_off += len(answers) != 10
        found[qid] = record
        rejected.discard(qid)
    if orphans:
        report.skipped["annotations whose question_id is not among the questions"] = orphans
    if counts_off:
        report.notes.append(f"{counts_off} questions do not have exactly 10 answers (VQAv2 has 10)")
    return found, rejected


def _stage_copy(src: Path, data: dict[str, Any], list_key: str, indices: list[int], dst: Path) -> bool:
    """Copy ``src`` byte for byte if ``indices`` cover ``data[list_key]``, else write that subset.

    Returns True when a subset was written.  Every other top-level field is kept as it is.
    """
    if len(set(indices)) == len(data[list_key]):
        _copy_atomic(src, dst)
        return False
    _write_json_atomic(dst, {**data, list_key: [data[list_key][i] for i in sorted(set(indices))]})
    return True


def convert_vqav2(
    questions: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    split: str,
    *,
    annotations: str | os.PathLike | None = None,
    image_pattern: str | None = None,
    pack: bool = True,
    strict: bool = False,
    shard_size: int = 1000,
    verify: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionReport:
    """Convert official VQAv2 files and their images into per-image shards + annotation copies.

    Args:
        questions: Official questions JSON (``v2_OpenEnded_mscoco_val2014_questions.json``).
        images: Folder of the images (e.g. COCO ``val2014/``).
        out: Output folder: missing, empty, or an earlier conversion (``split`` is replaced
            only with ``overwrite``; other splits, e.g. a Karpathy conversion's, are kept).
        split: The DataModule split to write: ``"train"``, ``"val"`` or ``"test"``.
        annotations: Official annotations JSON (``v2_mscoco_val2014_annotations.json``);
            ``None`` for splits without answers (test-dev, test).  With annotations, a question
            without one is malformed and left out.
        image_pattern: File name of an image under ``images``, from its id: ``%012d`` style or
            ``{image_id:012d}`` style.  Default from the questions' ``data_subtype``
            (:func:`default_image_pattern`), e.g. ``COCO_val2014_%012d.jpg``.
        pack: Store the images in the shards (True) or only their ``image_path`` (False).
        strict: Fail on the first missing image, unreadable image or malformed entry.
        shard_size: Images (samples) per shard.
        verify: Decode every image fully (slow) rather than its header only.
        overwrite: Replace ``split`` of an earlier conversion in ``out``.
        progress: Print progress and warnings to stderr.

    Returns:
        The report (also written to ``out/reports/vqav2_{split}.json``).

    Raises:
        ConversionError: unusable input or output folder, or any problem under ``strict``.
    """
    questions_path, images, out = Path(questions), Path(images), Path(out)
    annotations_path = Path(annotations) if annotations is not None else None
    if split not in SPLITS:
        raise ConversionError(f"split must be one of {list(SPLITS)}, got {split!r}")
    _check_common(images, shard_size)
    report = ConversionReport(kind="vqav2", dataset="", out=str(out), packed=pack)
    problems = _Problems(report, strict, progress)
    _log(progress, f"reading {questions_path}")
    q_data = _read_json(questions_path, "VQAv2 questions file")
    subtype = q_data.get("data_subtype") if isinstance(q_data, dict) else None
    report.dataset = f"vqav2 {subtype}" if isinstance(subtype, str) else "vqav2"
    pattern = image_pattern or default_image_pattern(subtype if isinstance(subtype, str) else None)
    _check_pattern(pattern)
    qs = _vqa_questions(q_data, questions_path, problems)
    a_data: Any = None
    anns: dict[int, dict[str, Any]] | None = None
    if annotations_path is not None:
        _log(progress, f"reading {annotations_path}")
        a_data = _read_json(annotations_path, "VQAv2 annotations file")
        anns, rejected = _vqa_annotations(a_data, annotations_path, qs, problems, report)
        for qid in sorted(set(qs) - set(anns)):
            if qid not in rejected:  # a rejected annotation was reported already
                problems.malformed(f"{questions_path.name}: question_id {qid} has no annotation")
            del qs[qid]

    by_image: dict[int, list[int]] = {}
    for qid, q in qs.items():
        by_image.setdefault(q["image_id"], []).append(qid)
    items: list[_Item] = []
    for image_id in sorted(by_image):
        rel = _image_name(pattern, image_id)
        if not _inside(rel):
            problems.outside(rel)
            continue
        path = images / rel
        if not path.is_file():
            problems.missing(rel)
            continue
        entries = []
        for qid in sorted(by_image[image_id]):
            entry: dict[str, Any] = {"question_id": qid, "question": qs[qid]["question"]}
            if anns is not None:
                entry.update({k: v for k, v in anns[qid].items() if k != "index"})
            entries.append(entry)
        key = _key(image_id)
        record = {"key": key, "image_id": image_id, "split": split, "filename": Path(rel).name, "questions": entries}
        items.append(_Item(key, path, Path(rel).as_posix(), record))

    output = _Output(out, [split], overwrite, progress)
    try:
        _log(progress, f"{split}: writing {len(items)} images")
        written, shards = _write_split(
            output, split, items, pack=pack, verify=verify, shard_size=shard_size, problems=problems,
            progress=progress,
        )
        kept = {q["question_id"] for r in written for q in r["questions"]}
        report.samples[split] = len(written)
        report.questions[split] = len(kept)
        info = {"source": "vqav2", "dataset": report.dataset, "questions_file": str(questions_path.resolve())}
        entry = _split_entry(shards, written, info, pack, images)
        staged: dict[str, Path] = {}
        name = f"vqa_{split}_questions"
        staged[name] = output.staging / "annotations" / f"{name}.json"
        subset = _stage_copy(questions_path, q_data, "questions", [qs[qid]["index"] for qid in kept], staged[name])
        if annotations_path is not None and anns is not None:
            name = f"vqa_{split}_annotations"
            staged[name] = output.staging / "annotations" / f"{name}.json"
            indices = [anns[qid]["index"] for qid in kept]
            subset |= _stage_copy(annotations_path, a_data, "annotations", indices, staged[name])
        if subset:
            report.notes.append("the annotation file copies hold only the questions that were converted")
        output.commit({split: entry}, staged, f"vqav2_{split}", report, {})
    except BaseException:
        output.abort()
        raise
    return report


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (missing, empty, or an earlier conversion)")
    parser.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                        help="store the images in the shards; --no-pack keeps them in place and writes "
                             "their image_path (relative to --images) into each sample's JSON (default: pack)")
    parser.add_argument("--strict", action="store_true",
                        help="fail on the first missing image, unreadable image or malformed entry "
                             "(default: leave them out and report them)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    parser.add_argument("--verify", action="store_true",
                        help="decode every image fully (slow) instead of reading only its header")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace splits that an earlier conversion in --out already holds")
    parser.add_argument("--quiet", action="store_true", help="no progress output or warnings (summary only)")


def _karpathy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-vlm data karpathy",
        description="Convert a Karpathy split file (dataset_coco.json, dataset_flickr30k.json) and its images "
                    "into webdataset shards, COCO-format caption annotations for val/test and a manifest.",
    )
    parser.add_argument("--json", required=True, help="Karpathy split file, e.g. dataset_coco.json")
    parser.add_argument("--images", required=True,
                        help="image folder: an image is looked up at IMAGES/filepath/filename, then IMAGES/filename")
    parser.add_argument("--dataset", default=None,
                        help="'coco' (image_id = cocoid) or another name (image_id = imgid); "
                             "default: the file's 'dataset' field")
    parser.add_argument("--restval-to-train", action=argparse.BooleanOptionalAction, default=True,
                        help="put the 'restval' images into train (default: yes)")
    _common_flags(parser)
    return parser


def _vqav2_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-vlm data vqav2",
        description="Convert official VQAv2 questions (+ annotations) and their images into per-image webdataset "
                    "shards, copies of the official files restricted to the converted questions, and a manifest.",
    )
    parser.add_argument("--questions", required=True, help="official questions JSON")
    parser.add_argument("--annotations", default=None,
                        help="official annotations JSON (leave out for test-dev / test)")
    parser.add_argument("--images", required=True, help="image folder, e.g. COCO val2014/")
    parser.add_argument("--split", required=True, choices=SPLITS, help="DataModule split to write")
    parser.add_argument("--image-pattern", default=None,
                        help="image file name from its id, e.g. 'COCO_val2014_%%012d.jpg' or "
                             "'{image_id:012d}.jpg' (default: from the questions' data_subtype)")
    _common_flags(parser)
    return parser


def _run(convert: Any, kwargs: dict[str, Any], quiet: bool) -> int:
    start = time.perf_counter()
    try:
        report = convert(**kwargs, progress=not quiet)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    print(f"done in {time.perf_counter() - start:.1f}s; manifest: {Path(report.out) / MANIFEST}")
    return 0


def karpathy_main(argv: list[str] | None = None) -> int:
    """``lit-vlm data karpathy``: convert a Karpathy split file; return an exit code."""
    args = _karpathy_parser().parse_args(argv)
    kwargs = dict(
        json_path=args.json, images=args.images, out=args.out, dataset=args.dataset, pack=args.pack,
        strict=args.strict, shard_size=args.shard_size, restval_to_train=args.restval_to_train,
        verify=args.verify, overwrite=args.overwrite,
    )
    return _run(convert_karpathy, kwargs, args.quiet)


def vqav2_main(argv: list[str] | None = None) -> int:
    """``lit-vlm data vqav2``: convert official VQAv2 files; return an exit code."""
    args = _vqav2_parser().parse_args(argv)
    kwargs = dict(
        questions=args.questions, images=args.images, out=args.out, split=args.split,
        annotations=args.annotations, image_pattern=args.image_pattern, pack=args.pack, strict=args.strict,
        shard_size=args.shard_size, verify=args.verify, overwrite=args.overwrite,
    )
    return _run(convert_vqav2, kwargs, args.quiet)


def main(argv: list[str] | None = None) -> int:
    """``python -m lit_vlm.datamodules.convert {karpathy,vqav2} ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"karpathy": karpathy_main, "vqav2": vqav2_main}
    if not argv or argv[0] not in commands:
        print("usage: convert {karpathy,vqav2} ... (--help after the command lists its options)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
