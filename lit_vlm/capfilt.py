"""CapFilt (BLIP, Li et al., 2022): bootstrap a noisy image-text corpus with a captioner and a filter.

``lit-vlm data capfilt --model RUN --root DATA --split train --out NEW`` reads the image-text
shards of ``DATA`` (or ``--shards SPEC``), and for every image

1. **captions** it with the model's ``generate`` (nucleus sampling, ``top_p`` 0.9, as BLIP's
   captioner; ``--num-beams`` for beam search instead), ``--num-captions`` times;
2. **filters** the original captions and the synthetic ones with the model's image-text matching
   head (``score_pairs``): a caption is kept when p(match) >= ``--threshold`` (0.5: the ITM head
   says "matched");
3. **writes** the image (its original bytes) with the captions kept into new webdataset shards in
   the img2dataset layout (``KEY.jpg``, ``KEY.txt`` = the first kept caption, ``KEY.json`` = the
   original JSON with ``captions`` replaced and a ``capfilt`` record: which were kept, their
   scores), as a lit-vlm dataset folder (``manifest.json``), so that
   ``ImageTextDataModule(root=NEW)`` trains on it. An image with no caption kept is dropped.

The model is any lit-vlm checkpoint (a ``.ckpt`` or a run directory, whose best checkpoint is
used) of a family with both capabilities: BLIP. Corrupt samples are skipped and counted. The new
folder appears complete or not at all (shards are written to a staging folder, renamed into place,
and the manifest comes last). A report with the counts is written to ``reports/capfilt.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lit_vlm.errors import UserError

log = logging.getLogger("lit_vlm")


def load_model(source: str, device: str = "cpu") -> Any:
    """The LightningModule of a lit-vlm checkpoint file or run directory (its best checkpoint)."""
    import lightning.pytorch as pl

    import lit_vlm.models  # noqa: F401 - the families must be imported for Lightning to rebuild them
    from lit_vlm.models.base import resolve_init_from

    path = resolve_init_from(source)
    try:
        model = pl.LightningModule.load_from_checkpoint(str(path), map_location=device)
    except Exception as err:  # noqa: BLE001 - reported with the file's name
        raise UserError(f"--model {source}: cannot rebuild a model from {path}: {type(err).__name__}: {err}") from err
    return model.to(device).eval()


def _sources(args: argparse.Namespace) -> list[str]:
    from lit_vlm.datamodules.stream import expand_urls

    if args.shards:
        return expand_urls(args.shards)
    from lit_vlm.datamodules.manifests import read_manifest, split_entry

    manifest = read_manifest(args.root)
    entry = split_entry(manifest, args.split)
    if not entry.get("shards"):
        raise UserError(f"--root {args.root} has no {args.split!r} split (splits: {sorted(manifest.get('splits', {}))})")
    return [str(Path(args.root) / s) for s in entry["shards"]]


def _raw_samples(urls: list[str], stats: dict[str, int]):
    """(key, {ext: bytes}) of every sample of the tar shards, in order; unreadable shards counted."""
    for url in urls:
        try:
            with tarfile.open(url, "r") as tar:
                current, members = None, {}
                for member in tar:
                    if not member.isfile():
                        continue
                    name = Path(member.name).name
                    key, _, ext = name.partition(".")
                    if key != current and current is not None:
                        yield current, members
                        members = {}
                    current = key
                    members[ext.lower()] = tar.extractfile(member).read()
                if current is not None:
                    yield current, members
        except (OSError, tarfile.TarError) as err:
            stats["unreadable_shards"] += 1
            log.warning("capfilt: skipping shard %s: %s", url, err)


def _captions(members: dict[str, bytes]) -> tuple[dict[str, Any], list[str]]:
    meta: dict[str, Any] = {}
    if "json" in members:
        meta = json.loads(members["json"].decode("utf-8"))
        if not isinstance(meta, dict):
            raise UserError("json is not an object")
    listed = meta.get("captions")
    if isinstance(listed, list) and all(isinstance(c, str) for c in listed) and any(c.strip() for c in listed):
        return meta, [c.strip() for c in listed if c.strip()]
    if "txt" in members and members["txt"].decode("utf-8").strip():
        return meta, [members["txt"].decode("utf-8").strip()]
    if isinstance(meta.get("caption"), str) and meta["caption"].strip():
        return meta, [meta["caption"].strip()]
    return meta, []


class _ShardWriter:
    def __init__(self, directory: Path, shard_size: int) -> None:
        self.directory, self.shard_size = directory, shard_size
        self.shards: list[str] = []
        self.tar: tarfile.TarFile | None = None
        self.count = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if self.tar is None or self.count % self.shard_size == 0:
            self.close()
            self.shards.append(f"shard-{len(self.shards):06d}.tar")
            self.tar = tarfile.open(self.directory / self.shards[-1], "w", format=tarfile.USTAR_FORMAT)
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lit_vlm.datamodules.transforms import CLIP_MEAN, CLIP_STD, decode_image, eval_transform

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: not empty; choose a new folder")
    model = load_model(args.model, args.device)
    missing = [c for c in ("generate", "pair_features", "score_pairs") if not callable(getattr(model, c, None))]
    if missing:
        raise UserError(f"--model {args.model}: {type(model).__name__} lacks {', '.join(missing)} (CapFilt needs a captioner with an ITM head, e.g. BLIP)")
    image_size = getattr(getattr(model, "vision", None), "image_size", None) or args.image_size
    transform = eval_transform(image_size, args.mean or CLIP_MEAN, args.std or CLIP_STD)
    urls = _sources(args)
    stats = {"images_in": 0, "images_out": 0, "skipped_corrupt": 0, "unreadable_shards": 0,
             "original_captions": 0, "original_kept": 0, "synthetic_captions": 0, "synthetic_kept": 0}
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".capfilt-staging-", dir=out))
    writer = _ShardWriter(staging, args.shard_size)
    options: dict[str, Any] = {"num_beams": args.num_beams} if args.num_beams > 1 else {"do_sample": True, "top_p": args.top_p, "num_beams": 1}
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    def flush(batch: list[tuple[str, dict[str, bytes], dict[str, Any], list[str], torch.Tensor]]) -> None:
        if not batch:
            return
        images = torch.stack([b[4] for b in batch]).to(args.device)
        synthetic: list[list[str]] = [[] for _ in batch]
        for _ in range(args.num_captions):
            for i, text in enumerate(model.generate(images, None, max_new_tokens=args.max_new_tokens, **options)):
                if text and text not in synthetic[i]:
                    synthetic[i].append(text)
        feats = model.pair_features(images)
        tok = model.text_tokenizer
        rows = [(i, c, origin) for i, b in enumerate(batch) for origin, caps in (("original", b[3]), ("synthetic", synthetic[i])) for c in caps]
        probs: list[float] = []
        for a in range(0, len(rows), args.batch_size):
            chunk = rows[a : a + args.batch_size]
            ids, mask = tok.encode([c for _, c, _ in chunk], args.context_length)
            idx = torch.tensor([i for i, _, _ in chunk], device=feats.device)
            with torch.no_grad():
                logodds = model.score_pairs(feats[idx], ids.to(feats.device), mask.to(feats.device))
            probs += torch.sigmoid(logodds.float()).cpu().tolist()
        for i, (key, members, meta, originals, _) in enumerate(batch):
            mine = [(c, origin, p) for (j, c, origin), p in zip(rows, probs) if j == i]
            kept = [(c, origin, p) for c, origin, p in mine if p >= args.threshold]
            stats["original_captions"] += len(originals)
            stats["synthetic_captions"] += len(synthetic[i])
            stats["original_kept"] += sum(1 for _, o, _ in kept if o == "original")
            stats["synthetic_kept"] += sum(1 for _, o, _ in kept if o == "synthetic")
            if not kept:
                continue
            record = {**meta, "captions": [c for c, _, _ in kept], "caption": kept[0][0],
                      "capfilt": {"scores": [{"caption": c, "source": o, "p_match": round(p, 4), "kept": p >= args.threshold}
                                             for c, o, p in mine]}}
            image_ext = next(e for e in ("jpg", "jpeg", "png", "webp") if e in members)
            writer.add(key, {image_ext: members[image_ext], "txt": kept[0][0].encode("utf-8"),
                             "json": json.dumps(record, ensure_ascii=False).encode("utf-8")})
            stats["images_out"] += 1

    try:
        pending: list = []
        for key, members in _raw_samples(urls, stats):
            if args.limit and stats["images_in"] >= args.limit:
                break
            stats["images_in"] += 1
            try:
                meta, originals = _captions(members)
                data = next(members[e] for e in ("jpg", "jpeg", "png", "webp") if e in members)
                image = transform(decode_image(data), generator)
            except (StopIteration, ValueError, OSError, UnicodeDecodeError) as err:
                stats["skipped_corrupt"] += 1
                log.warning("capfilt: skipping sample %s: %s", key, err)
                continue
            pending.append((key, members, meta, originals, image))
            if len(pending) == args.batch_size:
                flush(pending)
                pending = []
                if not args.quiet:
                    print(f"[capfilt] {stats['images_in']} images ({time.perf_counter() - start:.0f}s)", file=sys.stderr)
        flush(pending)
        writer.close()
        (out / "train").mkdir(exist_ok=True)
        for name in writer.shards:
            os.replace(staging / name, out / "train" / name)
    finally:
        writer.close()
        shutil.rmtree(staging, ignore_errors=True)
    stats["seconds"] = round(time.perf_counter() - start, 1)
    report = {"model": str(args.model), "sources": urls, "threshold": args.threshold, "decoding": options,
              "num_captions": args.num_captions, **stats}
    (out / "reports").mkdir(exist_ok=True)
    (out / "reports" / "capfilt.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    from lit_vlm.datamodules.convert import FORMAT, MANIFEST, VERSION
    from lit_vlm.io import write_json_atomic

    manifest = {"format": FORMAT, "version": VERSION, "source": "capfilt",
                "splits": {"train": {"shards": [f"train/{s}" for s in writer.shards], "num_samples": stats["images_out"],
                                     "packed": True, "report": "reports/capfilt.json"}},
                "annotations": {}}
    write_json_atomic(out / MANIFEST, manifest)
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lit-vlm data capfilt", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="lit-vlm checkpoint (.ckpt) or run directory of a captioner with an ITM head (BLIP)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--root", help="lit-vlm dataset folder (synthetic world or converted) to read --split of")
    src.add_argument("--shards", help="shard spec (path, brace pattern, glob, directory; several joined with ::)")
    p.add_argument("--split", default="train", help="split of --root to read (default: train)")
    p.add_argument("--out", required=True, help="new dataset folder (must be new or empty)")
    p.add_argument("--threshold", type=float, default=0.5, help="keep a caption when the ITM head's p(match) >= this (0.5)")
    p.add_argument("--num-captions", type=int, default=1, help="synthetic captions drawn per image (1)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams instead of nucleus sampling")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling's top-p (0.9, as BLIP)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="longest synthetic caption, in tokens (40)")
    p.add_argument("--context-length", type=int, default=56, help="token length the filter reads captions at (56)")
    p.add_argument("--batch-size", type=int, default=64, help="images per generation batch and pairs per ITM batch (64)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per written shard (1000)")
    p.add_argument("--limit", type=int, default=0, help="stop after this many input images (0: all)")
    p.add_argument("--image-size", type=int, default=224, help="image size when the model's tower does not say (224)")
    p.add_argument("--mean", type=float, nargs=3, default=None, help="normalisation mean (default: CLIP's, as the DataModule)")
    p.add_argument("--std", type=float, nargs=3, default=None, help="normalisation std (default: CLIP's)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    p.add_argument("--seed", type=int, default=0, help="seed of the nucleus sampling (0)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for name, low in (("num_captions", 1), ("num_beams", 1), ("batch_size", 1), ("shard_size", 1), ("max_new_tokens", 1)):
        if getattr(args, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if not 0.0 <= args.threshold <= 1.0 or not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--threshold must be in [0, 1] and --top-p in (0, 1], got {args.threshold}, {args.top_p}")
    report = run(args)
    print(json.dumps({k: report[k] for k in ("images_in", "images_out", "original_captions", "original_kept",
                                             "synthetic_captions", "synthetic_kept", "skipped_corrupt", "seconds")}))
    return 0


__all__ = ["load_model", "main", "run"]
