"""Dataset folders and their ``manifest.json``, read in one place.

A dataset folder (a DataModule's ``root``) holds shards plus a ``manifest.json`` that lists them per
split.  Every writer (the synthetic world, the dataset converters, ``lit-vlm data capfilt``) uses
one layout::

    {"format": "<kind>", "version": N,
     "splits": {"train": {"shards": ["train/000000.tar", ...], "num_samples": 5000,
                          "image_root": "images"?, "dataset": "coco-karpathy"?}, ...},
     "annotations": {"captions_val": "annotations/captions_val.json", ...}?,
     ...format-specific fields (the synthetic world's "config", "zeroshot", ...)}

Formats with a reader of their own (:data:`READERS`: the synthetic world, converted datasets) are
checked by it; any other format is read when it has that layout, so a new corpus kind needs no
change here.  Paths in a manifest are relative to the folder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lit_vlm.datamodules import convert, synth
from lit_vlm.errors import MissingFileError, UserError
from lit_vlm.io import manifest_format

__all__ = [
    "MANIFEST",
    "READERS",
    "annotation_files",
    "dataset_identity",
    "file_split",
    "format_of",
    "interrupted_conversion",
    "read_manifest",
    "split_entry",
]

MANIFEST = "manifest.json"


#: Format name -> reader that checks a manifest of that format (formats written by lit-vlm itself).
READERS: dict[str, Callable[[Path], dict[str, Any]]] = {
    synth.FORMAT: synth.load_manifest,
    convert.FORMAT: convert.load_manifest,
}


def format_of(root: str | Path) -> str | None:
    """The ``format`` field of ``root``'s manifest (``None`` when missing or unreadable)."""
    return manifest_format(Path(root) / MANIFEST)


def interrupted_conversion(root: str | Path) -> bool:
    """True when ``root`` holds a conversion that was cut off (its marker and no manifest)."""
    return (Path(root) / convert.MARKER).exists() and not (Path(root) / MANIFEST).is_file()


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Read and check ``root/manifest.json``.

    Raises:
        MissingFileError: There is no manifest.
        UserError: It is unreadable, or malformed for its format.
    """
    path = Path(root) / MANIFEST
    if not path.is_file():
        hint = " (a dataset conversion was interrupted there: run it again)" if interrupted_conversion(root) else ""
        raise MissingFileError(f"root={str(root)!r} has no {MANIFEST}{hint}")
    reader = READERS.get(format_of(root) or "")
    if reader is not None:
        return reader(Path(root))
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format"), str):
        raise UserError(f"{path} must be a JSON object with a 'format' name")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(e, dict) and isinstance(e.get("shards"), list) for e in splits.values()):
        raise UserError(f"{path}: 'splits' must map split names to {{'shards': [...], ...}}")
    return manifest


def file_split(split: str) -> str:
    """The manifest split a DataModule split reads: ``predict`` reads ``test``."""
    return "test" if split == "predict" else split


def split_entry(manifest: dict[str, Any], split: str) -> dict[str, Any]:
    """The manifest's entry for a split (``{}`` when it has none)."""
    entry = (manifest.get("splits") or {}).get(file_split(split))
    return dict(entry) if isinstance(entry, dict) else {}


def annotation_files(root: str | Path, manifest: dict[str, Any], split: str, kinds: dict[str, str]) -> dict[str, str]:
    """Existing evaluation annotation files of a split: ``kind -> path``.

    ``kinds`` maps a kind to its manifest entry name with a ``{split}`` placeholder (for example
    ``"captions": "captions_{split}"``).  The manifest's ``annotations`` table names the files;
    without one, ``annotations/<name>.json`` is looked for (the synthetic world's layout).
    """
    listed = manifest.get("annotations")
    found: dict[str, str] = {}
    for kind, pattern in kinds.items():
        name = pattern.format(split=file_split(split))
        rel = listed.get(name) if isinstance(listed, dict) else f"annotations/{name}.json"
        if isinstance(rel, str) and (Path(root) / rel).is_file():
            found[kind] = str(Path(root) / rel)
    return found


def dataset_identity(root: str | Path, split: str) -> dict[str, Any]:
    """What a result was measured on: the dataset's name (the converted dataset, or the synthetic
    world with the SHA-256 of its generation config) from ``root``'s manifest."""
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"name": None}
    if not isinstance(manifest, dict):
        return {"name": None}
    if manifest.get("format") == synth.FORMAT:
        config = json.dumps(manifest.get("config"), sort_keys=True).encode()
        return {"name": "lit-vlm synthetic world", "config_sha256": hashlib.sha256(config).hexdigest()}
    return {"name": split_entry(manifest, split).get("dataset") or manifest.get("format")}
