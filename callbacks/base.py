"""The machinery every evaluation callback shares: collect per-sample outputs keyed by sample id,
gather them from every rank, drop duplicates, compute set-level metrics once, log them everywhere.

A subclass implements ``collect`` (per batch: {sample_id: record}) and ``compute`` (on the merged,
id-sorted records: {metric: value}). Callbacks never know families; they call capabilities such as
``pl_module.encode_image``.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch

from lit_vlm.capabilities import require
from lit_vlm.distributed import all_gather_objects
from lit_vlm.errors import UserError

# TensorBoard renders text summaries with Python-Markdown (tables extension) and then sanitises
# the HTML. Python-Markdown honours a backslash before these characters; before < > & it would
# show the backslash, so those three become HTML entities instead.
_MARKDOWN_SPECIAL = "\\`*_|[]#"
_HTML_ENTITIES = (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"))


def md_escape(text: Any) -> str:
    """User text (captions, answers, class names) made inert in TensorBoard's Markdown view and in a
    table cell: it shows exactly as written, can neither inject markup nor break the table (line
    breaks become spaces)."""
    text = str(text)
    for ch, entity in _HTML_ENTITIES:
        text = text.replace(ch, entity)
    for ch in _MARKDOWN_SPECIAL:
        text = text.replace(ch, "\\" + ch)
    for ch in "\r\n\v\f\u2028\u2029":
        text = text.replace(ch, " ")
    return text


def md_code(text: Any) -> str:
    """``text`` as a Markdown code span (ids: shown verbatim, backslash escapes don't apply there)."""
    text = str(text).replace("`", "'")
    for ch in "\r\n\v\f\u2028\u2029":
        text = text.replace(ch, " ")
    return "`" + text + "`"


log = logging.getLogger("lit_vlm.eval")

_STAGES = ("val", "test")


class EvalCallback(pl.Callback):
    """Base of the evaluation callbacks.

    Args:
        splits: Stages to evaluate on, among "val" and "test".
        prefix: Metric names are logged as ``{stage}/{prefix}/{metric}``.
    """

    #: Metrics that are the mean of others (``rmean``): a report bootstraps them from their parts.
    mean_of: dict[str, tuple[str, ...]] = {}

    def __init__(self, splits: tuple[str, ...] | list[str] = ("val", "test"), prefix: str = "eval") -> None:
        bad = [s for s in splits if s not in _STAGES]
        if bad:
            raise UserError(f"{type(self).__name__} splits must be among {_STAGES}, got {bad}")
        self.splits = tuple(splits)
        self.prefix = prefix
        self._records: dict[str, Any] = {}
        self.metrics: dict[str, dict[str, float]] = {}  # stage -> last computed metrics
        #: stage -> {"ids", "metrics": {name: {"num", "den"}}, "mean_of"} (global rank zero; see sample_scores)
        self.per_sample: dict[str, dict[str, Any]] = {}

    # ---- to implement ----------------------------------------------------------------------
    def setup_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> bool:
        """Prepare before an evaluation epoch; return False to skip this epoch."""
        return True

    def collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict) -> dict[str, Any]:
        raise NotImplementedError

    def compute(self, records: list[Any]) -> dict[str, float]:
        raise NotImplementedError

    def sample_scores(self, records: list[Any]) -> dict[str, tuple[list[float], list[float]]]:
        """Optional: for each metric that is a ratio of sums over samples (metric = sum(num) / sum(den):
        accuracies, recall@k, means of per-image scores), its numerator and denominator per sample,
        in ``records``' order. Leaderboard reports resample them for confidence intervals. Called on
        global rank zero after ``compute``."""
        return {}

    def protocol(self) -> dict[str, Any]:
        """Settings that change what this callback's numbers mean (k of recall@k, templates, metric
        versions): results with different protocols are never ranked together."""
        return {"callback": type(self).__name__}

    def log_examples(self, writer: Any, stage: str, step: int, ids: list[str], records: list[Any]) -> None:
        """Optional qualitative logs (a few examples) on global rank zero, after ``compute``.

        ``writer`` is the TensorBoard ``SummaryWriter`` of the run (only called when the trainer
        has a TensorBoard logger); ``ids``/``records`` are the merged, id-sorted records."""

    # ---- shared flow -----------------------------------------------------------------------
    def _active(self, trainer: pl.Trainer, stage: str) -> bool:
        return stage in self.splits and not trainer.sanity_checking

    def _start(self, trainer, pl_module, stage):
        self._records = {}
        self._repeated: list[str] = []
        self._enabled = self._active(trainer, stage) and self.setup_epoch(trainer, pl_module, stage)

    def _batch(self, trainer, pl_module, batch):
        if not getattr(self, "_enabled", False):
            return
        with torch.no_grad():
            for sample_id, record in self.collect(trainer, pl_module, batch).items():
                if sample_id in self._records:
                    self._repeated.append(sample_id)
                else:
                    self._records[sample_id] = record

    def _end(self, trainer, pl_module, stage):
        if not getattr(self, "_enabled", False):
            return
        merged: dict[str, Any] = {}
        repeated: list[str] = []
        for part, seen_twice in all_gather_objects((self._records, self._repeated)):  # rank order
            repeated += seen_twice
            for sample_id, record in part.items():
                if sample_id in merged:
                    repeated.append(sample_id)
                else:
                    merged[sample_id] = record
        if repeated:
            names = ", ".join(repr(i) for i in sorted(set(map(str, repeated)))[:10])
            log.warning(
                "%s: %d sample(s) of the %s split came more than once and were counted once (the first): %s%s",
                type(self).__name__, len(repeated), stage, names, " ..." if len(set(repeated)) > 10 else "",
            )
        self._records, self._repeated = {}, []
        if not merged:
            log.warning("%s: no samples to evaluate on the %s split", type(self).__name__, stage)
            return
        ids = sorted(merged)
        metrics = self.compute([merged[i] for i in ids])
        metrics["num_samples"] = float(len(ids))
        self.metrics[stage] = metrics
        if trainer.is_global_zero:
            scores = self.sample_scores([merged[i] for i in ids])
            if scores:
                self.per_sample[stage] = {
                    "ids": [str(i) for i in ids],
                    "metrics": {k: {"num": [float(x) for x in n], "den": [float(x) for x in d]} for k, (n, d) in scores.items()},
                    "mean_of": {k: list(v) for k, v in self.mean_of.items() if all(p in scores for p in v)},
                }
        for name, value in metrics.items():
            # Every rank holds the same value; sync_dist keeps Lightning's epoch-level logging consistent.
            pl_module.log(f"{stage}/{self.prefix}/{name}", float(value), sync_dist=True)
        writer = _tensorboard_writer(trainer)
        if writer is not None and trainer.is_global_zero:
            try:
                self.log_examples(writer, stage, trainer.global_step, ids, [merged[i] for i in ids])
            except Exception as exc:  # qualitative logs must never kill an evaluation
                log.warning("%s: could not log examples: %s: %s", type(self).__name__, type(exc).__name__, exc)

    def on_validation_epoch_start(self, trainer, pl_module):
        self._start(trainer, pl_module, "val")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch(trainer, pl_module, batch)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._end(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer, pl_module):
        self._start(trainer, pl_module, "test")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch(trainer, pl_module, batch)

    def on_test_epoch_end(self, trainer, pl_module):
        self._end(trainer, pl_module, "test")


def _tensorboard_writer(trainer: pl.Trainer) -> Any:
    """The SummaryWriter of the trainer's first TensorBoard logger, or None."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def annotation_file(trainer: pl.Trainer, stage: str, given: str | dict[str, str] | None, kind: str) -> str | None:
    """The annotation file an evaluation reads for ``stage``: ``given`` (one path, or ``{stage: path}``),
    else the DataModule's ``eval_annotations(stage)[kind]``, else None."""
    if isinstance(given, dict):
        return given.get(stage)
    if given:
        return given
    offer = getattr(trainer.datamodule, "eval_annotations", None)
    return (offer(stage) or {}).get(kind) if callable(offer) else None


def require_capability(pl_module: pl.LightningModule, *names: str, by: str = "this evaluation") -> None:
    """Raise one paragraph if the family lacks a capability an evaluation needs
    (:func:`lit_vlm.capabilities.require`)."""
    require(pl_module, *names, by=by)
