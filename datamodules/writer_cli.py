"""What the synthetic data writers (``lit-vlm data docs``, ``lit-vlm data clips``) share: their
command line (one option per field of the writer's config dataclass, ``--out``, ``--num-workers``)
and their way of writing shards (:func:`write_splits`, :func:`finish`): a folder that holds
something else is refused, an interrupted write is marked as such, the manifest comes last."""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from lit_vlm.errors import UserError
from lit_vlm.io import write_json_atomic

__all__ = ["SPLITS", "finish", "is_written", "write_splits", "writer_main"]

SPLITS = ("train", "val", "test")


def is_written(root: str | os.PathLike, fmt: str) -> bool:
    """True when ``root`` holds a complete write of format ``fmt`` (its manifest says so)."""
    try:
        return json.loads((Path(root) / "manifest.json").read_text(encoding="utf-8")).get("format") == fmt
    except (OSError, ValueError, AttributeError):
        return False


def write_splits(out_dir: str | os.PathLike, config: Any, write_shard: Callable[[tuple], Any], fmt: str, what: str,
                 num_workers: int = 2, progress: bool = True, spawn: bool = False) -> tuple[dict[str, list[str]], list]:
    """Write ``config.num_<split>`` samples of each split to ``out_dir/<split>/shard-NNNNNN.tar``,
    ``config.shard_size`` per shard, by ``write_shard((config as dict, out, split, shard, start,
    stop))`` in ``num_workers`` processes (``spawn``: fresh ones, not forked). Returns each split's
    shard names and ``write_shard``'s results in order. Call :func:`finish` with the manifest."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (is_written(out, fmt) or (out / f".{fmt}-incomplete").exists()):
        raise UserError(f"{out} is not empty and holds no {what}; refusing to write into it")
    (out / "manifest.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / f".{fmt}-incomplete").touch()
    started = time.perf_counter()
    tasks, shards = [], {}
    for split in SPLITS:
        (out / split).mkdir(exist_ok=True)
        n = getattr(config, f"num_{split}")
        bounds = list(range(0, n, config.shard_size))
        shards[split] = [f"{split}/shard-{s:06d}.tar" for s in range(len(bounds))]
        tasks += [(dataclasses.asdict(config), str(out), split, s, b, min(b + config.shard_size, n))
                  for s, b in enumerate(bounds)]
    pool = None
    if num_workers > 1:
        pool = ProcessPoolExecutor(min(num_workers, len(tasks) or 1), mp_context=mp.get_context("spawn") if spawn else None)
    results = []
    for k, result in enumerate(pool.map(write_shard, tasks) if pool else map(write_shard, tasks), 1):
        results.append(result)
        if progress:
            print(f"[{what}] {k}/{len(tasks)} shards ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if pool:
        pool.shutdown()
    return shards, results


def finish(out_dir: str | os.PathLike, manifest: dict) -> dict:
    """Write ``manifest.json`` (the last file: its presence means the write is complete)."""
    write_json_atomic(Path(out_dir) / "manifest.json", manifest, indent=2)
    (Path(out_dir) / f".{manifest['format']}-incomplete").unlink(missing_ok=True)
    return manifest


def writer_main(argv: list[str] | None, prog: str, description: str, config_cls: type, generate: Callable[..., dict],
                what: str) -> int:
    """Parse ``argv`` into ``config_cls``, run ``generate(out, config, num_workers)`` and print what
    it wrote (``what``: e.g. "world clips")."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", required=True, help="output folder")
    fields = dataclasses.fields(config_cls)
    for f in fields:
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default), default=f.default,
                            help=f"(default: {f.default})")
    parser.add_argument("--num-workers", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args(argv)
    config: Any = config_cls(**{f.name: getattr(args, f.name) for f in fields})
    started = time.perf_counter()
    manifest = generate(args.out, config, args.num_workers)
    print(f"{what} written to {args.out} in {time.perf_counter() - started:.1f} s: "
          + ", ".join(f"{s} {e['num_samples']} in {len(e['shards'])} shards" for s, e in manifest["splits"].items()))
    return 0
