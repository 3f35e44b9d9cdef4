"""Training samples/s and data-pipeline images/s for a config (default: the CLIP quickstart).

    python benchmarks/throughput.py [--config configs/clip/quickstart.yaml] [--steps 30] [--batches 40]

Builds the model and data exactly as `lit-vlm fit --config ...` does (same CLI, same soft links),
then measures, on this machine:
  1. the data pipeline alone: decoded + transformed + tokenised + collated training images/s
     through the real DataLoader (the config's num_workers);
  2. training: optimiser steps/s through Lightning (data loading included, validation off),
     after warmup steps; reported as samples/s.
Prints the figures and the machine; record them in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import lightning.pytorch as pl
import torch

from lit_vlm.callbacks.results import machine_info
from lit_vlm.cli import LitVLMCLI


class _StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.samples, self.steps = warmup, None, 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 == self.warmup:
            self.start = time.perf_counter()
        elif batch_idx + 1 > self.warmup:
            self.samples += batch["image"].shape[0]
            self.steps += 1

    def rate(self) -> tuple[float, float]:
        elapsed = time.perf_counter() - self.start
        return self.samples / elapsed, self.steps / elapsed


def build(config: str, extra: list[str]):
    return LitVLMCLI(args=["--config", config, *extra], run=False)


def data_throughput(dm, batches: int) -> float:
    dm.prepare_data()
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)  # worker start-up excluded
    n, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            n += next(it)["image"].shape[0]
        except StopIteration:
            break
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/clip/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps (after 5 warmup steps)")
    parser.add_argument("--batches", type=int, default=40, help="timed data-pipeline batches")
    args, extra = parser.parse_known_args()
    sys.argv = sys.argv[:1]  # the CLI below gets its arguments explicitly

    cli = build(args.config, extra)
    images_per_sec = data_throughput(cli.datamodule, args.batches)

    timer = _StepTimer(warmup=5)
    cli = build(args.config, extra)
    trainer = pl.Trainer(
        accelerator=cli.trainer.accelerator.__class__.__name__.replace("Accelerator", "").lower() or "auto",
        devices=1, max_epochs=1, limit_train_batches=5 + args.steps, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer], precision=cli.trainer.precision,
    )
    trainer.fit(cli.model, datamodule=cli.datamodule)
    samples_per_sec, steps_per_sec = timer.rate()
    figures = {
        "config": args.config,
        "overrides": extra,
        "batch_size": cli.datamodule.batch_size,
        "num_workers": cli.datamodule.num_workers,
        "data_images_per_sec": round(images_per_sec, 1),
        "train_samples_per_sec": round(samples_per_sec, 1),
        "train_steps_per_sec": round(steps_per_sec, 3),
        "torch_threads": torch.get_num_threads(),
        "machine": machine_info(),
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
