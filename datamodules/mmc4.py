"""``lit-vlm data mmc4``: MMC4's own JSON lines plus its image folder -> webdataset shards.

MMC4 ships documents as JSON lines (``docs_shard_*.jsonl``, often zipped or gzipped) with
``text_list``, ``image_info`` (``image_name``, ``raw_url``, ``matched_text_index``,
``matched_sim``) and ``similarity_matrix``, and the images as separate files named by
``image_name``. The conversion writes each document as OpenFlamingo's WebDataset conversion does:
one ``KEY.json`` with every image's bytes added to its ``image_info`` entry as ``image_base64``,
so :class:`~lit_vlm.datamodules.interleaved.InterleavedDataModule` reads the result unchanged.
An image that is missing, unreadable or named outside the image folder keeps its entry (the
similarity matrix's rows index ``image_info``) without bytes, is listed in the conversion report
and is counted as ``missing_image`` when the documents are read. Malformed lines are left out
and reported.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import io
import json
import os
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from lit_vlm.datamodules.convert import ConversionReport, _inside, _Problems
from lit_vlm.errors import UserError
from lit_vlm.io import write_json_atomic

FORMAT = "mmc4"


def _lines(path: Path) -> Iterator[str]:
    """Text lines of a ``.jsonl``, ``.jsonl.gz`` or a zip holding JSON-lines files."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            for name in sorted(archive.namelist()):
                if not name.endswith("/"):
                    with archive.open(name) as fh:
                        yield from io.TextIOWrapper(fh, encoding="utf-8")
    elif path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            yield from fh
    else:
        with open(path, encoding="utf-8") as fh:
            yield from fh


def convert_mmc4(docs: list[str | os.PathLike], images: str | os.PathLike, out: str | os.PathLike, split: str = "train",
                 shard_size: int = 1000, strict: bool = False, progress: bool = True) -> ConversionReport:
    """Convert MMC4 JSON-lines files ``docs`` with images under ``images`` into shards of
    ``shard_size`` documents in ``out/<split>/`` plus ``out/manifest.json``; return the report
    (also written to ``out/reports/mmc4.json``)."""
    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise UserError(f"--images {str(images)!r} is not a folder (MMC4's images, named by image_info's image_name)")
    for path in map(Path, docs):
        if not path.is_file():
            raise UserError(f"MMC4 documents file {str(path)!r} does not exist")
    report = ConversionReport(kind="mmc4", dataset="mmc4", out=str(out), packed=True)
    problems = _Problems(report, strict, progress)
    (out / split).mkdir(parents=True, exist_ok=True)
    shards: list[str] = []
    tar: tarfile.TarFile | None = None
    written = 0

    def add(doc: dict) -> None:
        nonlocal tar
        if written % shard_size == 0:
            if tar is not None:
                tar.close()
            shards.append(f"{split}/shard-{len(shards):06d}.tar")
            tar = tarfile.open(out / shards[-1], "w", format=tarfile.USTAR_FORMAT)
        data = json.dumps(doc).encode("utf-8")
        member = tarfile.TarInfo(f"{written:09d}.json")
        member.size, member.mode = len(data), 0o644
        tar.addfile(member, io.BytesIO(data))

    for path in map(Path, docs):
        for number, line in enumerate(_lines(path), 1):
            if not line.strip():
                continue
            where = f"{path.name}:{number}"
            try:
                doc = json.loads(line)
            except ValueError as exc:
                problems.malformed(f"{where}: not JSON ({exc})")
                continue
            if not isinstance(doc, dict) or not isinstance(doc.get("text_list"), list) or not isinstance(doc.get("image_info"), list):
                problems.malformed(f"{where}: no 'text_list' and 'image_info' lists")
                continue
            for entry in doc["image_info"]:
                name = entry.get("image_name") if isinstance(entry, dict) else None
                if not isinstance(name, str) or not name:
                    problems.malformed(f"{where}: an image_info entry without an image_name")
                elif not _inside(name):
                    problems.outside(name)
                elif not (images / name).is_file():
                    problems.missing(name)
                else:
                    try:
                        entry["image_base64"] = base64.b64encode((images / name).read_bytes()).decode("ascii")
                    except OSError as exc:
                        problems.unreadable(name, str(exc))
            add(doc)
            written += 1
    if tar is not None:
        tar.close()
    report.samples = {split: written}
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"format": FORMAT, "version": 1, "splits": {}}
    manifest["splits"][split] = {"shards": shards, "num_samples": written, "dataset": "mmc4"}
    write_json_atomic(out / "reports" / "mmc4.json", report.to_dict())
    write_json_atomic(manifest_path, manifest)
    return report


def main(argv: list[str] | None = None) -> int:
    """``lit-vlm data mmc4 DOCS.jsonl[.gz|.zip] ... --images DIR --out DIR [--split train]``."""
    parser = argparse.ArgumentParser(prog="lit-vlm data mmc4", description=__doc__.split("\n\n")[0])
    parser.add_argument("docs", nargs="+", help="MMC4 JSON-lines files (.jsonl, .jsonl.gz or .zip of them)")
    parser.add_argument("--images", required=True, help="the folder of MMC4's images (files named by image_name)")
    parser.add_argument("--out", required=True, help="output folder (shards + manifest.json)")
    parser.add_argument("--split", default="train", help="the split the documents go to (default train)")
    parser.add_argument("--shard-size", type=int, default=1000, help="documents per shard (default 1000)")
    parser.add_argument("--strict", action="store_true", help="stop at the first missing image or malformed line")
    args = parser.parse_args(argv)
    report = convert_mmc4(args.docs, args.images, args.out, args.split, args.shard_size, args.strict)
    print(report.summary(), file=sys.stdout)
    return 0


__all__ = ["FORMAT", "convert_mmc4", "main"]
