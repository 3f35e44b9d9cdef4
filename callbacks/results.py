"""Run bookkeeping: checkpoints written atomically, the checkpoint index that lets a later
``lit-vlm test --ckpt_path best`` (or ``fit --ckpt_path last``) find them, and the results JSON every
test run writes (the leaderboard's only input)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

import lit_vlm
from lit_vlm.io import atomic_output
from lit_vlm.io import write_json_atomic as _write_json_atomic
from lit_vlm.metrics import describe_metric
from lit_vlm.weights import INDEX_FILE


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON (indented, unknown objects as ``str``) atomically: a crash never leaves a
    half-written file. See :func:`lit_vlm.io.write_json_atomic`."""
    _write_json_atomic(path, data, indent=2, default=str)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoint IO, made crash-safe for local paths: the checkpoint is
    written to a temporary file in the same directory, flushed to disk and renamed over the target
    (:func:`lit_vlm.io.atomic_output`). Lightning's own save stages the bytes in the system temp
    directory and moves them, which is a plain copy (and can leave a torn ``last.ckpt``) when that
    directory is on another filesystem. Remote paths (``s3://`` ...) keep Lightning's behaviour."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if type(get_filesystem(path)).__name__ != "LocalFileSystem":
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_output(str(path).removeprefix("file://"), "wb") as fh:
            torch.save(checkpoint, fh)


def use_atomic_checkpoint_io(strategy: Any) -> None:
    """Give ``strategy`` :class:`AtomicCheckpointIO` if it would use Lightning's default IO
    (a custom checkpoint IO is left alone)."""
    io = strategy.checkpoint_io
    if type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
    elif isinstance(io, _WrappingCheckpointIO) and type(io.checkpoint_io) is TorchCheckpointIO:
        io.checkpoint_io = AtomicCheckpointIO()


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that writes checkpoints atomically (:class:`AtomicCheckpointIO`:
    a crash while saving never leaves a torn ``last.ckpt``) and keeps ``checkpoints/index.json``
    ({"best", "last", "monitor", "best_score"}) up to date after every save, so ``--ckpt_path
    best|last`` resolves in a later process (``lit-vlm fit --ckpt_path last`` resumes a killed run).

    With a ``monitor``, ``every_n_train_steps`` (and ``train_time_interval``) write ``last`` from the
    first steps on, and only ``last``: Lightning would hold them back until the monitored metric
    exists (a run killed in its first epoch had nothing to resume) and then rank the current
    weights by a stale validation score. The top-k are ranked after every validation of the fit
    (or, when the fit does not validate, at each epoch's end on a training metric), so ``best`` only
    ever names weights its metric was measured on (the index has no ``best`` before the first
    validation); ``last`` is also written after each validation and at each epoch's end, once per
    step, as a full file also under ``save_last="link"``.
    The run's final step is always in ``last``, also when N does not divide the step count."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._indexed: dict[str, Any] | None = None
        self._last_step_in_last: int | None = None
        self._step_seen: int | None = None  # the optimiser step of the previous batch end

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        use_atomic_checkpoint_io(trainer.strategy)

    def _write_index(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero or not self.dirpath:
            return
        last = str(Path(self.last_model_path).resolve()) if self.last_model_path else None
        best = str(Path(self.best_model_path).resolve()) if self.best_model_path else None
        if best is None and self.monitor is None:
            best = last  # nothing is ranked: the newest weights are the best there are
        if not best and not last:
            return
        score = self.best_model_score
        index = {"best": best, "last": last, "monitor": self.monitor, "best_score": None if score is None else float(score)}
        if index == self._indexed:
            return
        write_json_atomic(Path(self.dirpath) / INDEX_FILE, index)
        self._indexed = index

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_step_in_last = trainer.global_step

    def _write_last(self, trainer: pl.Trainer) -> None:
        """Write ``last`` with the current weights: a full save, also under ``save_last="link"``
        (a link would point at an older top-k file)."""
        link, self.save_last = self.save_last, True
        try:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        finally:
            self.save_last = link

    def _step_save_due(self, trainer: pl.Trainer) -> bool:
        """Lightning's every_n_train_steps / train_time_interval test, once per optimiser step (a
        batch that did not step, e.g. inside an ``accum_freq`` group, never saves)."""
        step = trainer.global_step
        stepped, self._step_seen = step != self._step_seen, step
        if not stepped:
            return False
        due = self._every_n_train_steps >= 1 and step % self._every_n_train_steps == 0
        if self._train_time_interval is not None:
            now = time.monotonic()
            if self._last_time_checked is None:
                self._last_time_checked = now
            elif now - self._last_time_checked >= self._train_time_interval.total_seconds():
                due, self._last_time_checked = True, now
            due = trainer.strategy.broadcast(due)
        return due and step > 0 and self._last_step_in_last != step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.monitor is None:  # nothing ranked by validation: Lightning's own step saving
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        elif self.save_last and not self._should_skip_saving_checkpoint(trainer) and self._step_save_due(trainer):
            saved_step = self._last_global_step_saved
            self._write_last(trainer)
            self._last_global_step_saved = saved_step  # a validation at this step still ranks its weights
        self._write_index(trainer)

    def on_validation_end(self, trainer, pl_module):
        if self.monitor is None:
            super().on_validation_end(trainer, pl_module)
        elif not self._should_skip_saving_checkpoint(trainer):  # a fit's validation (not the sanity check)
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)  # rank the weights just validated
            if self.save_last:
                self._save_last_checkpoint(trainer, candidates)
        self._write_index(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        if self.monitor is None:
            super().on_train_epoch_end(trainer, pl_module)
        elif not self._should_skip_saving_checkpoint(trainer):  # nothing saved at this step yet
            candidates = self._monitor_candidates(trainer)
            validates = bool(sum(trainer.num_val_batches)) if isinstance(trainer.num_val_batches, list) else bool(trainer.num_val_batches)
            if not validates and self.monitor in candidates:  # a training metric, fresh at the epoch's end
                self._save_topk_checkpoint(trainer, candidates)
            if self.save_last and self._last_step_in_last != trainer.global_step:
                self._save_last_checkpoint(trainer, candidates)
        self._write_index(trainer)

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        if self.save_last and not trainer.fast_dev_run and self._last_step_in_last != trainer.global_step:
            self._write_last(trainer)  # the final step
        self._write_index(trainer)
        log_dir = trainer.log_dir  # a collective under DDP: read it on every rank
        if trainer.is_global_zero and self.dirpath:
            log_dir = log_dir or str(Path(self.dirpath).parent)
            rank_zero_info(
                f"\nRun directory: {log_dir}\n"
                f"  checkpoints: {self.dirpath} (best: {self.best_model_path or '-'}, last: {self.last_model_path or '-'})\n"
                f"  TensorBoard: tensorboard --logdir {Path(log_dir).parent}"
            )


def git_commit() -> dict[str, Any]:
    """The commit of the lit-vlm checkout in use (and whether it has local changes), if any."""
    root = Path(lit_vlm.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return {"commit": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10)
        return {"commit": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def machine_info() -> dict[str, Any]:
    """Where a number was measured: host, OS, CPU, accelerators and library versions."""
    import lightning

    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "lit_vlm": lit_vlm.__version__,
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


#: Version of the results.json / fit.json layout; raised when a key changes meaning or is removed.
SCHEMA_VERSION = 1


def _sha256(path: str | os.PathLike) -> str | None:
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    except OSError:
        return None


def dataset_identity(dm: Any, stage: str = "test") -> dict[str, Any] | None:
    """Which data a result was measured on: the dataset's name (from its manifest: the converted
    dataset, or the synthetic world with a hash of its generation config), root or shards, split,
    and every evaluation annotation file with its SHA-256."""
    if dm is None:
        return None
    root = getattr(dm, "root", None)
    split = "test" if stage in ("test", "predict") else "val"
    info: dict[str, Any] = {"class": type(dm).__name__, "split": split, "root": str(Path(root).resolve()) if root else None}
    specs = getattr(dm, "shard_specs", None)
    info["shards"] = specs.get(split) if isinstance(specs, dict) else None
    name = None
    if root:
        from lit_vlm.datamodules.manifests import dataset_identity as folder_identity

        found = folder_identity(root, split)
        name = found.pop("name")
        info.update(found)
    info["name"] = name or (Path(root).name if root else "shards")
    annotations = {}
    if callable(getattr(dm, "eval_annotations", None)):
        try:
            annotations = dm.eval_annotations(stage)
        except (ValueError, OSError):
            annotations = {}
    info["annotations"] = {kind: {"path": str(Path(path).resolve()), "sha256": _sha256(path)} for kind, path in sorted(annotations.items())}
    return info


def parameter_counts(module: torch.nn.Module) -> dict[str, int]:
    """Total and trainable parameters (``parameters()`` yields a shared tensor once)."""
    params = list(module.parameters())
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


def _training_of(ckpt_path: str | None) -> dict[str, Any] | None:
    """Steps, epochs and training samples seen of the checkpoint a test ran on (read lazily)."""
    if not ckpt_path or not Path(ckpt_path).is_file():
        return None
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - the test itself loaded it; a bookkeeping read must not fail the run
        return None
    samples = (ckpt.get("callbacks") or {}).get("SamplesPerSecond", {}).get("train_samples_seen")
    return {"global_step": ckpt.get("global_step"), "epoch": ckpt.get("epoch"), "samples_seen": samples}


class ResultsWriter(pl.Callback):
    """Writes ``results.json`` into the run directory at the end of every ``test``: family, config,
    checkpoint, data, metrics, test samples/s, skip counts, machine, date and git commit, and each
    evaluation's protocol; beside it ``results.per_sample.json``, every evaluation's per-sample
    scores (``EvalCallback.sample_scores``: what a report resamples for confidence intervals). At the end
    of every ``fit`` it writes (or, for a resumed run, rewrites) ``fit.json``: steps, epochs, the
    training skip counts per reason over the whole fit, skipped non-finite steps, checkpoints,
    wall-clock seconds of this invocation (``time``: ``fit_s`` from the start of the fit loop to its
    end, ``validation_s`` spent in validation loops, sanity check included, and ``train_s`` the
    difference), machine, date and commit.

    Args:
        dirpath: Directory for the file; default: the run's log directory.
        filename: File name; an existing file is never overwritten (a numbered name is used).
    """

    def __init__(self, dirpath: str | None = None, filename: str = "results.json") -> None:
        self.dirpath = dirpath
        self.filename = filename
        self.last_path: Path | None = None
        self._fit_start: float | None = None
        self._val_start: float | None = None
        self._val_seconds = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start, self._val_seconds = time.perf_counter(), 0.0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit_start is not None:
            self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_start is not None:
            self._val_seconds += time.perf_counter() - self._val_start
            self._val_start = None

    def _fit_time(self) -> dict[str, float] | None:
        if self._fit_start is None:
            return None
        total = time.perf_counter() - self._fit_start
        return {"fit_s": round(total, 1), "train_s": round(total - self._val_seconds, 1), "validation_s": round(self._val_seconds, 1)}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_dir = trainer.log_dir  # a collective under DDP: read it on every rank
        if not trainer.is_global_zero:
            return
        log_dir = Path(self.dirpath or run_dir or trainer.default_root_dir)
        stats = next((c for c in trainer.callbacks if hasattr(c, "fit_totals")), None)
        guard = next((c for c in trainer.callbacks if hasattr(c, "skipped") and hasattr(c, "max_consecutive")), None)
        checkpoint = trainer.checkpoint_callback
        def counts(by_reason: dict[str, int] | None) -> dict[str, Any] | None:
            return None if by_reason is None else {"skipped": sum(by_reason.values()), "skipped_by_reason": dict(by_reason)}

        speed = next((c for c in trainer.callbacks if hasattr(c, "train_samples_seen")), None)
        summary = {
            "schema_version": SCHEMA_VERSION,
            "family": type(pl_module).__name__,
            "global_step": trainer.global_step,
            "epochs": trainer.current_epoch,
            "resumed_from": trainer.ckpt_path,
            "samples_seen": None if speed is None else speed.train_samples_seen,
            "parameters": parameter_counts(pl_module),
            "data": {
                "train": counts(stats.fit_totals) if stats is not None else None,  # every epoch of the fit
                "val": counts(stats.totals.get("val")) if stats is not None else None,  # the latest validation
            },
            "nonfinite_steps_skipped": None if guard is None else guard.skipped,
            "checkpoints": None if checkpoint is None else {
                "best": checkpoint.best_model_path or None, "last": getattr(checkpoint, "last_model_path", None) or None,
            },
            "world_size": trainer.world_size,
            "time": self._fit_time(),
            "machine": machine_info(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **git_commit(),
        }
        self._fit_start = None
        write_json_atomic(log_dir / "fit.json", summary)
        rank_zero_info(f"Fit summary: {log_dir / 'fit.json'}")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_dir = trainer.log_dir  # a collective under DDP: read it on every rank
        if not trainer.is_global_zero:
            return
        log_dir = Path(self.dirpath or run_dir or trainer.default_root_dir)
        config_file = log_dir / "config.yaml"
        config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
        metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("test/")}
        throughput = next((c.test_samples_per_sec for c in trainer.callbacks if hasattr(c, "test_samples_per_sec")), None)
        skipped = next((c.totals.get("test") for c in trainer.callbacks if hasattr(c, "totals")), None)
        dm = trainer.datamodule
        results = {
            "schema_version": SCHEMA_VERSION,
            "family": type(pl_module).__name__,
            "family_class": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
            "config_file": str(config_file) if config_file.is_file() else None,
            "config": config,
            "checkpoint": trainer.ckpt_path,
            "data": {
                "class": type(dm).__name__ if dm is not None else None,
                "hparams": dict(dm.hparams) if dm is not None and hasattr(dm, "hparams") else None,
                "corpus": dm.corpus.describe() if callable(getattr(getattr(dm, "corpus", None), "describe", None)) else None,
                "skipped": skipped,
            },
            "task": {"stage": "test", "dataset": dataset_identity(dm, "test")},
            "metrics": metrics,
            "metric_info": {k: describe_metric(k) for k in metrics},
            "parameters": parameter_counts(pl_module),
            "training": _training_of(trainer.ckpt_path),
            "samples_per_sec": throughput,
            "world_size": trainer.world_size,
            "machine": machine_info(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **git_commit(),
        }
        evaluations = [c for c in trainer.callbacks if callable(getattr(c, "protocol", None)) and hasattr(c, "prefix")]
        results["evaluations"] = {c.prefix: {"protocol": c.protocol()} for c in evaluations}
        path = log_dir / self.filename
        n = 1
        while path.exists():
            path = log_dir / f"{Path(self.filename).stem}-{n}{Path(self.filename).suffix}"
            n += 1
        per_sample = {c.prefix: c.per_sample["test"] for c in evaluations if "test" in getattr(c, "per_sample", {})}
        if per_sample:  # what a report resamples for confidence intervals (EvalCallback.sample_scores)
            scores_path = path.with_name(f"{path.stem}.per_sample.json")
            write_json_atomic(scores_path, per_sample)
            for prefix in per_sample:
                results["evaluations"][prefix]["per_sample"] = scores_path.name
        write_json_atomic(path, results)
        self.last_path = path
        rank_zero_info(f"\nResults JSON: {path}\n  TensorBoard: tensorboard --logdir {log_dir.parent}")
