"""The command line of the synthetic data writers (``lit-vlm data docs``, ``lit-vlm data clips``):
one option per field of the writer's config dataclass, ``--out`` and ``--num-workers``."""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from typing import Any

__all__ = ["writer_main"]


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
