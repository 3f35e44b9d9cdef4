"""Converters of the common video and audio layouts into clip shards (video2dataset's member names).

* ``lit-vlm data videos``: a folder of videos with captions, MSR-VTT style: MSR-VTT's own
  ``MSRVTT_data.json`` (``videos`` with ``video_id`` and ``split``; ``sentences`` with
  ``video_id`` and ``caption``), or a CSV / JSON list of rows with a video column (``video_id``,
  ``video`` or ``filename``), a caption column (``caption`` or ``sentence``) and optionally
  ``split``. Every caption of a video goes in its JSON ``captions``.
* ``lit-vlm data audio``: a folder of audio clips with a label CSV, ESC-50 style (``filename``,
  ``fold``, ``target``, ``category``): one fold is the test split, the others train. Each clip's
  JSON has ``audio_label`` (the target) and the caption ``the sound of a <category>``; the
  manifest's ``classes`` gives the class names and templates for zero-shot classification.

The media bytes are copied unchanged; a row whose file is missing is left out and counted.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import tarfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from lit_vlm.errors import UserError
from lit_vlm.io import write_json_atomic

FORMAT = "lit-vlm-clips"
VERSION = 1
_VIDEO_COLUMNS = ("video_id", "video", "filename")
_CAPTION_COLUMNS = ("caption", "sentence")
_SPLIT_NAMES = {"train": "train", "validate": "val", "val": "val", "valid": "val", "test": "test"}

__all__ = ["convert_audio", "convert_videos", "main_audio", "main_videos"]


def _rows(path: Path) -> list[dict[str, Any]]:
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, csv.Error) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    if isinstance(data, dict) and "sentences" in data:  # MSR-VTT's MSRVTT_data.json
        splits = {v.get("video_id"): v.get("split") for v in data.get("videos", []) if isinstance(v, dict)}
        return [{"video_id": s.get("video_id"), "caption": s.get("caption"), "split": splits.get(s.get("video_id"))}
                for s in data["sentences"] if isinstance(s, dict)]
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return data
    raise UserError(f"{path}: expected MSR-VTT's JSON (videos and sentences), a JSON list of rows or a CSV")


def _column(row: dict[str, Any], names: tuple[str, ...], path: Path) -> str:
    for name in names:
        if row.get(name) not in (None, ""):
            return str(row[name])
    raise UserError(f"{path}: a row has none of the columns {list(names)}: {row}")


def _find(folder: Path, name: str, extensions: tuple[str, ...]) -> Path | None:
    path = folder / name
    if path.is_file():
        return path
    return next((folder / f"{name}.{e}" for e in extensions if (folder / f"{name}.{e}").is_file()), None)


def _write(out: Path, split: str, samples: list[tuple[str, dict[str, bytes]]], shard_size: int) -> list[str]:
    (out / split).mkdir(parents=True, exist_ok=True)
    names = []
    for s, lo in enumerate(range(0, len(samples), shard_size)):
        name = f"{split}/shard-{s:06d}.tar"
        with tarfile.open(out / name, "w") as tar:
            for key, members in samples[lo: lo + shard_size]:
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        names.append(name)
    return names


def _manifest(out: Path, shards: dict[str, list[str]], counts: dict[str, int], dataset: str, **extra: Any) -> dict[str, Any]:
    manifest = {"format": FORMAT, "version": VERSION,
                "splits": {s: {"shards": shards[s], "num_samples": counts[s], "dataset": dataset} for s in shards}, **extra}
    write_json_atomic(out / "manifest.json", manifest, indent=2)
    return manifest


def convert_videos(videos: str, captions: str, out: str, default_split: str = "test", shard_size: int = 500) -> dict[str, Any]:
    """Videos + captions (see the module docstring) -> clip shards in ``out``; returns the manifest
    with the rows left out under ``missing``."""
    folder, path, dest = Path(videos), Path(captions), Path(out)
    if not folder.is_dir():
        raise UserError(f"--videos {videos!r} is not a folder")
    by_video: dict[str, dict[str, Any]] = {}
    for row in _rows(path):
        video = _column(row, _VIDEO_COLUMNS, path)
        entry = by_video.setdefault(video, {"captions": [], "split": row.get("split") or default_split})
        entry["captions"].append(_column(row, _CAPTION_COLUMNS, path).strip())
    per_split: dict[str, list[tuple[str, dict[str, bytes]]]] = defaultdict(list)
    missing = 0
    for n, (video, entry) in enumerate(sorted(by_video.items())):
        split = _SPLIT_NAMES.get(str(entry["split"]).lower())
        if split is None:
            raise UserError(f"{path}: video {video!r} has split {entry['split']!r}; use train, validate/val or test")
        file = _find(folder, video, ("mp4", "webm", "mkv", "avi", "mov"))
        if file is None:
            missing += 1
            continue
        record = {"video_id": video, "clip_id": n, "captions": entry["captions"]}
        ext = file.suffix.lower().lstrip(".")
        per_split[split].append((f"{split}_{n:07d}", {ext: file.read_bytes(), "txt": entry["captions"][0].encode(),
                                                      "json": json.dumps(record).encode()}))
    if not per_split:
        raise UserError(f"no video of {path} was found in {videos!r}")
    shards = {s: _write(dest, s, items, shard_size) for s, items in per_split.items()}
    return _manifest(dest, shards, {s: len(v) for s, v in per_split.items()}, "msr-vtt-style", missing=missing)


def convert_audio(audio: str, labels: str, out: str, test_fold: int = 5, shard_size: int = 500) -> dict[str, Any]:
    """Audio clips + an ESC-50-style label CSV -> clip shards in ``out`` (fold ``test_fold`` is the
    test split); returns the manifest with the rows left out under ``missing``."""
    folder, path, dest = Path(audio), Path(labels), Path(out)
    if not folder.is_dir():
        raise UserError(f"--audio {audio!r} is not a folder")
    rows = _rows(path)
    names: dict[int, str] = {}
    per_split: dict[str, list[tuple[str, dict[str, bytes]]]] = defaultdict(list)
    missing = Counter()
    for n, row in enumerate(rows):
        try:
            name, fold, target, category = row["filename"], int(row.get("fold") or 0), int(row["target"]), str(row["category"])
        except (KeyError, ValueError) as exc:
            raise UserError(f"{path}: row {n + 1} needs filename, target (an integer), category (and fold): {row}") from exc
        names[target] = category.replace("_", " ")
        file = _find(folder, name, ("wav", "flac", "ogg", "mp3", "m4a"))
        if file is None:
            missing["missing_file"] += 1
            continue
        split = "test" if fold == test_fold else "train"
        caption = f"the sound of a {names[target]}."
        record = {"clip_id": n, "audio_label": target, "classname": names[target], "fold": fold,
                  "captions": [caption], "audio_captions": [caption]}
        per_split[split].append((f"{split}_{n:07d}", {file.suffix.lower().lstrip("."): file.read_bytes(),
                                                      "json": json.dumps(record).encode()}))
    if not per_split:
        raise UserError(f"no audio file of {path} was found in {audio!r}")
    if sorted(names) != list(range(len(names))):
        raise UserError(f"{path}: targets must be 0..{len(names) - 1} with a category each; got {sorted(names)}")
    shards = {s: _write(dest, s, items, shard_size) for s, items in per_split.items()}
    classes = {"audio_label": {"classnames": [names[t] for t in range(len(names))],
                               "templates": ["the sound of a {}.", "a {} can be heard.", "the sound a {} makes."]}}
    return _manifest(dest, shards, {s: len(v) for s, v in per_split.items()}, "esc-50-style", classes=classes,
                     missing=sum(missing.values()))


def main_videos(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lit-vlm data videos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", required=True, help="folder of the videos (video_id, or video_id.mp4 ...)")
    parser.add_argument("--captions", required=True, help="MSRVTT_data.json, or a CSV / JSON list of rows")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", default="test", help="split of rows without one (default test)")
    parser.add_argument("--shard-size", type=int, default=500)
    args = parser.parse_args(argv)
    manifest = convert_videos(args.videos, args.captions, args.out, args.split, args.shard_size)
    print(f"videos written to {args.out}: " + ", ".join(f"{s} {e['num_samples']}" for s, e in manifest["splits"].items())
          + f"; {manifest['missing']} without a video file")
    return 0


def main_audio(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lit-vlm data audio", description=__doc__.split("\n\n")[0])
    parser.add_argument("--audio", required=True, help="folder of the audio clips")
    parser.add_argument("--labels", required=True, help="label CSV (ESC-50's meta/esc50.csv layout)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--test-fold", type=int, default=5, help="the fold that is the test split (default 5)")
    parser.add_argument("--shard-size", type=int, default=500)
    args = parser.parse_args(argv)
    manifest = convert_audio(args.audio, args.labels, args.out, args.test_fold, args.shard_size)
    print(f"audio written to {args.out}: " + ", ".join(f"{s} {e['num_samples']}" for s, e in manifest["splits"].items())
          + f"; {manifest['missing']} without an audio file")
    return 0
