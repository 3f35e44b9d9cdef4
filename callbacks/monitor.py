"""Training monitors: samples/s on the progress bar and in TensorBoard, and the data pipeline's
skip counts (corrupt samples that were dropped, by reason)."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as pl

from lit_vlm.datamodules.batch import batch_size
from lit_vlm.distributed import all_gather_objects

log = logging.getLogger("lit_vlm.data")


class SamplesPerSecond(pl.Callback):
    """Logs ``train/samples_per_sec`` (global: this rank's rate x world size, averaged over the last
    ``window`` steps) on the progress bar and to the logger. Counts the training samples seen
    (``train_samples_seen``: this rank's x world size; kept in checkpoints, so a resumed run goes
    on counting and a test reports what its checkpoint was trained on) and keeps the mean rate of
    each test run in ``test_samples_per_sec`` for the results JSON.

    Args:
        window: Number of recent steps the rate is averaged over.
    """

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._times: list[tuple[float, int]] = []
        self.test_samples_per_sec: float | None = None
        self.train_samples_seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"train_samples_seen": self.train_samples_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_samples_seen = int(state_dict.get("train_samples_seen", 0))

    def on_train_epoch_start(self, trainer, pl_module):
        self._times = [(time.perf_counter(), 0)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_samples_seen += batch_size(batch) * trainer.world_size
        self._times.append((time.perf_counter(), batch_size(batch)))
        self._times = self._times[-(self.window + 1) :]
        if len(self._times) < 2:
            return
        elapsed = self._times[-1][0] - self._times[0][0]
        samples = sum(n for _, n in self._times[1:])
        if elapsed > 0:
            rate = samples / elapsed * trainer.world_size
            pl_module.log("train/samples_per_sec", rate, prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)

    def on_test_epoch_start(self, trainer, pl_module):
        self._test_start, self._test_samples = time.perf_counter(), 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._test_samples += batch_size(batch)

    def on_test_epoch_end(self, trainer, pl_module):
        elapsed = time.perf_counter() - self._test_start
        counts = all_gather_objects(self._test_samples)
        self.test_samples_per_sec = sum(counts) / elapsed if elapsed > 0 else None


class DataStats(pl.Callback):
    """Logs the data pipeline's skip counts per reason, summed over ranks and workers, as
    ``data/{split}/skipped_{reason}`` at the end of each train/val/test epoch; keeps the totals in
    ``totals`` (the latest epoch or pass of each split) and ``fit_totals`` (training: every epoch
    of the fit, kept in checkpoints so a resumed run goes on counting) for the results JSONs.
    Reads ``trainer.datamodule.skip_counts(split)``."""

    def __init__(self) -> None:
        self.totals: dict[str, dict[str, int]] = {}
        self.fit_totals: dict[str, int] = {}  # training skips of the epochs completed so far

    def state_dict(self) -> dict[str, Any]:
        return {"fit_totals": dict(self.fit_totals)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.fit_totals = {k: int(v) for k, v in state_dict.get("fit_totals", {}).items()}

    def _log(self, trainer, pl_module, split: str) -> None:
        dm = trainer.datamodule
        if dm is None or not callable(getattr(dm, "skip_counts", None)) or trainer.sanity_checking:
            return
        merged: dict[str, int] = {}
        for counts in all_gather_objects(dict(dm.skip_counts(split))):
            for reason, n in counts.items():
                merged[reason] = merged.get(reason, 0) + int(n)
        self.totals[split] = merged
        if trainer.is_global_zero and any(merged.values()):
            log.info(
                "%s: %d bad samples skipped in this %s %s", split, sum(merged.values()),
                "epoch" if split == "train" else "pass", {r: n for r, n in merged.items() if n},
            )
        if trainer.logger is not None and trainer.is_global_zero and merged:
            trainer.logger.log_metrics({f"data/{split}/skipped_{r}": n for r, n in merged.items()}, step=trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module):
        self._log(trainer, pl_module, "train")
        for reason, n in self.totals.get("train", {}).items():
            self.fit_totals[reason] = self.fit_totals.get(reason, 0) + n

    def on_validation_epoch_end(self, trainer, pl_module):
        self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module):
        self._log(trainer, pl_module, "test")
