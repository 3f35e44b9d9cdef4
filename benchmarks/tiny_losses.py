"""Training losses of every family's tiny config, to show a refactor keeps behaviour.

    python benchmarks/tiny_losses.py --out before.json          # record
    python benchmarks/tiny_losses.py --check before.json        # compare (exit 1 on a difference)

``benchmarks/tiny_losses_reference.json`` holds the figures of commit b969211 (before the seams
restructure of issue 14), measured on the 2-core CPU machine; focal's were re-recorded when its
``focal_form`` default became ``softmax`` (issue 16), a change of behaviour on purpose.

Each ``configs/<family>/tiny.yaml`` is fitted for ``--steps`` optimiser steps on its own tiny
synthetic world (validation off), through the same CLI as ``lit-vlm fit``; the loss of every step
and a checksum of the trained weights are recorded. On CPU the runs are deterministic, so a
restructure that keeps behaviour gives the same numbers to float precision.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch

from lit_vlm.cli import LitVLMCLI

ROOT = Path(__file__).resolve().parents[1]


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = trainer.callback_metrics.get("train/loss")  # logged by every family's training step
        if loss is not None:
            self.losses.append(float(loss))


def run(config: Path, steps: int, workdir: Path) -> dict:
    args = [
        "--config", str(config), "--data.init_args.root", str(workdir / config.parent.name),
        "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
        "--trainer.logger.init_args.save_dir", str(workdir / "runs"),
        "--trainer.default_root_dir", str(workdir / "out"), "--trainer.enable_progress_bar", "false",
        "--checkpoint.monitor", "null",
    ]
    cli = LitVLMCLI(args=args, run=False)
    probe = _Losses()
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    checksum = sum(float(p.detach().double().sum()) for p in cli.model.parameters())
    return {"losses": probe.losses, "param_sum": checksum}


def compare(got: dict, want: dict, rtol: float) -> list[str]:
    problems = []
    for family, ref in want.items():
        if family not in got:
            problems.append(f"{family}: not run")
            continue
        pairs = list(zip(got[family]["losses"], ref["losses"])) + [(got[family]["param_sum"], ref["param_sum"])]
        worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs)
        same_len = len(got[family]["losses"]) == len(ref["losses"])
        status = "same" if same_len and worst <= rtol else "DIFFERENT"
        print(f"{family:10s} {status}: max relative difference {worst:.2e} over {len(pairs)} values")
        if status != "same":
            problems.append(family)
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", help="write the figures here")
    parser.add_argument("--check", help="compare with figures written before")
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--only", nargs="*", help="family folder names (default: every configs/*/tiny.yaml)")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]
    configs = sorted(ROOT.glob("configs/*/tiny.yaml"))
    if args.only:
        configs = [c for c in configs if c.parent.name in args.only]
    elif args.check:  # the families the reference has (the LM bridges' tiny configs need an LM folder first)
        recorded = json.loads(Path(args.check).read_text())
        configs = [c for c in configs if c.parent.name in recorded]
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            figures[config.parent.name] = run(config, args.steps, Path(tmp))
            assert all(math.isfinite(v) for v in figures[config.parent.name]["losses"])
    print(json.dumps(figures, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))
    if args.check:
        return 1 if compare(figures, json.loads(Path(args.check).read_text()), args.rtol) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
