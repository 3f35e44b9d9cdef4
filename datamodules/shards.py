"""The generic streaming DataModule: webdataset shards of any kind, read through a corpus plug-in.

:class:`ShardDataModule` owns everything that does not depend on what a sample holds: where the
shards are (a dataset folder's manifest, or shard specs), the training mix, splitting over ranks and
workers, shuffling, epochs, skip statistics and the resume state (the mechanics live in
:mod:`lit_vlm.datamodules.stream`).  What the samples are -- decoding, skip reasons, collation,
manifest formats, annotation files -- comes from its :class:`~lit_vlm.datamodules.corpus.Corpus`.
Batches follow :mod:`lit_vlm.datamodules.batch`.

``data_stats`` (see :class:`~lit_vlm.datamodules.batch.DataStats`) travels with every batch; the
DataModule removes it in :meth:`ShardDataModule.on_after_batch_transfer` and keeps the latest per
(split, worker): :meth:`ShardDataModule.skip_counts` sums them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import CombinedLoader

from lit_vlm.datamodules import manifests
from lit_vlm.datamodules.corpus import Corpus, Split
from lit_vlm.datamodules.stream import (
    STREAM_SKIP_REASONS,
    Source,
    StreamDataset,
    StreamLoader,
    StreamState,
    derive_seed,
    expand_urls,
    make_sources,
)
from lit_vlm.errors import UserError

__all__ = ["ShardDataModule", "TextFacts"]

logger = logging.getLogger("lit_vlm.data")

# Our IterableDatasets split the work across workers themselves, so their length is exact.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")

_STAGE_SPLITS = {"fit": "val", "val": "val", "validate": "val", "test": "test", "predict": "predict"}


class ShardDataModule(pl.LightningDataModule):
    """Streams a corpus from webdataset shards (see the module docstring).

    Args:
        corpus: What the samples are (a :class:`~lit_vlm.datamodules.corpus.Corpus`).
        root: Dataset folder whose ``manifest.json`` lists the train/val/test shards (see
            :mod:`lit_vlm.datamodules.manifests`); ``prepare_data`` asks the corpus to make it ready.
        train_shards: Training shards, overriding ``root``'s: a spec (path, brace pattern
            ``shard-{000000..000099}.tar``, glob, directory, ``pipe:`` command or URL; several
            joined with ``::``) or a list of specs, each then a separate source mixed by
            ``train_weights``.
        train_weights: Sampling weight of each training source (one per entry of
            ``train_shards``). Default: proportional to their sample counts when known, else equal.
        val_shards: Validation shards (same syntax), overriding ``root``'s.
        test_shards: Test shards (same syntax), overriding ``root``'s.
        predict_shards: Shards for ``predict`` (same syntax); default: ``root``'s test split.
        batch_size: Training batch size per process (per GPU).
        eval_batch_size: Batch size for validation, test and prediction; default ``batch_size``.
        num_workers: DataLoader worker processes per GPU process (0 loads in the main process).
        shuffle_buffer: Samples in each worker's training shuffle buffer (0 disables sample
            shuffling; shards are shuffled regardless).
        resampled: Draw training shards with replacement in every worker (open_clip's
            ``--dataset-resampled``) instead of splitting them between workers.
        train_epoch_samples: Training samples per epoch over all processes. Default: the number of
            samples of the training sources (required when unknown, e.g. remote shards without
            img2dataset ``*_stats.json`` files).
        seed: Seed of shard order, shuffling and augmentation (combined with epoch, rank, worker).
        pin_memory: Use pinned host memory for batches (faster host-to-GPU copies).
        val_annotations: Evaluation annotation files of the validation data (keys among the
            corpus's ``annotation_kinds``, values paths), for shards outside a ``root`` or to
            override its files. See :meth:`eval_annotations`.
        test_annotations: The same for the test data.
        train_mix: Sources read side by side, one batch of each per step, instead of one stream:
            ``{name: {"shards": spec, "batch_size": n, "loss_weight": w}}`` (``shards`` default
            ``root``'s train split, ``batch_size`` default ``batch_size``, ``loss_weight`` default 1). A step's batch is then
            ``{"sources": {name: batch}, "loss_weights": {name: w}}`` and a family's loss is the
            weighted sum of its sources' losses (OpenFlamingo: MMC4 documents beside LAION pairs at
            0.2). Needs ``train_epoch_samples`` (all sources together, shared in proportion to the
            batch sizes, so every source gives the same number of batches); ``resampled`` and the
            seed apply to each source (each with its own seed); resuming mid-epoch restores every
            source's position.
    """

    def __init__(
        self,
        corpus: Corpus,
        root: str | None = None,
        train_shards: str | list[str] | None = None,
        train_weights: list[float] | None = None,
        val_shards: str | list[str] | None = None,
        test_shards: str | list[str] | None = None,
        predict_shards: str | list[str] | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 2000,
        resampled: bool = False,
        train_epoch_samples: int | None = None,
        seed: int = 0,
        pin_memory: bool = False,
        val_annotations: dict[str, str] | None = None,
        test_annotations: dict[str, str] | None = None,
        train_mix: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        if type(self) is ShardDataModule:  # a subclass saves its own arguments
            self.save_hyperparameters(ignore=["corpus"])
            self.hparams["corpus"] = corpus.describe()
        self.corpus = corpus
        self.root = None if root is None else str(root)
        self.shard_specs: dict[str, str | list[str] | None] = {
            "train": train_shards,
            "val": val_shards,
            "test": test_shards,
            "predict": predict_shards,
        }
        self.train_weights = None if train_weights is None else [float(w) for w in train_weights]
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else self.batch_size
        self.num_workers = int(num_workers)
        self.shuffle_buffer = int(shuffle_buffer)
        self.resampled = resampled
        self.train_epoch_samples = train_epoch_samples
        self.seed = int(seed)
        self.pin_memory = pin_memory
        self.annotation_files: dict[str, dict[str, str]] = {
            "val": {k: str(v) for k, v in (val_annotations or {}).items()},
            "test": {k: str(v) for k, v in (test_annotations or {}).items()},
        }
        self.train_mix = {str(k): dict(v) for k, v in (train_mix or {}).items()}
        self._validate()
        self._stream_state = StreamState()
        self._stats: dict[tuple[str, int], dict[str, Any]] = {}
        self._logged_skips: dict[str, int] = {}

    # ----------------------------------------------------------------------------- validation

    def _validate(self) -> None:
        if self.root is not None and Path(self.root).exists() and not Path(self.root).is_dir():
            raise UserError(
                f"data root={self.root!r} is a file, not a folder: root is the folder of a dataset (a synthetic world "
                "or a converted one); give a folder path, or set root null and name shards"
            )
        if self.root is not None and manifests.interrupted_conversion(self.root):
            raise UserError(f"root={self.root!r} holds an interrupted dataset conversion (no manifest.json); run it again")
        for name, value, low in (
            ("batch_size", self.batch_size, 1),
            ("eval_batch_size", self.eval_batch_size, 1),
            ("num_workers", self.num_workers, 0),
            ("shuffle_buffer", self.shuffle_buffer, 0),
        ):
            if value < low:
                raise UserError(f"{name} must be >= {low}, got {value}")
        for name, mix in self.train_mix.items():
            unknown = sorted(set(mix) - {"shards", "batch_size", "loss_weight"})
            if unknown or ("shards" not in mix and self.root is None):
                raise UserError(f"train_mix[{name!r}]: takes shards (default: root's train split), batch_size and "
                                f"loss_weight; got {sorted(mix)}")
            if int(mix.get("batch_size", self.batch_size)) < 1 or float(mix.get("loss_weight", 1.0)) < 0:
                raise UserError(f"train_mix[{name!r}]: batch_size must be >= 1 and loss_weight >= 0, got {mix}")
            try:
                if "shards" in mix:
                    expand_urls(mix["shards"])
            except (OSError, ValueError) as exc:
                raise UserError(f"train_mix[{name!r}] shards={mix['shards']!r}: {exc}") from exc
        if self.train_mix and self.train_epoch_samples is None:
            raise UserError("train_mix needs train_epoch_samples: the samples of one epoch, all sources together")
        if self.train_epoch_samples is not None and self.train_epoch_samples < 1:
            raise UserError(f"train_epoch_samples must be >= 1, got {self.train_epoch_samples}")
        if self.train_weights is not None:
            train_spec = self.shard_specs["train"]
            n_sources = (1 if isinstance(train_spec, str) else len(train_spec)) if train_spec is not None else 1
            if len(self.train_weights) != n_sources:
                raise UserError(
                    f"train_weights={self.train_weights} has {len(self.train_weights)} entries but there are "
                    f"{n_sources} training sources (train_shards={train_spec!r})"
                )
            if any(w < 0 or not math.isfinite(w) for w in self.train_weights) or sum(self.train_weights) <= 0:
                raise UserError(f"train_weights must be non-negative with a positive sum, got {self.train_weights}")
        for split, spec in self.shard_specs.items():
            if spec is None:
                continue
            if (isinstance(spec, str) and not spec.strip()) or (not isinstance(spec, str) and not spec):
                raise UserError(f"{split}_shards is empty: {spec!r}")
            try:
                expand_urls(spec)
            except (OSError, ValueError) as exc:
                raise UserError(f"{split}_shards={spec!r}: {exc}") from exc
        self.corpus.check(self.root)
        kinds = self.corpus.annotation_kinds
        for split, files in self.annotation_files.items():
            unknown = sorted(set(files) - set(kinds))
            if unknown:
                raise UserError(f"{split}_annotations has unknown keys {unknown}; valid keys: {sorted(kinds)}")
            for kind, path in files.items():
                if not Path(path).is_file():
                    raise UserError(f"{split}_annotations[{kind!r}]={path!r} does not exist")

    # ----------------------------------------------------------------------------- the dataset folder

    def has_manifest(self) -> bool:
        """True when ``root`` is set and holds a ``manifest.json``."""
        return self.root is not None and (Path(self.root) / manifests.MANIFEST).is_file()

    def manifest(self) -> dict[str, Any]:
        """``root``'s manifest, checked (see :func:`~lit_vlm.datamodules.manifests.read_manifest`)."""
        if not self.has_manifest():
            raise UserError(
                f"root={self.root!r} has no manifest.json yet: call prepare_data() (the Trainer does) or create the dataset first"
            )
        assert self.root is not None
        data = manifests.read_manifest(self.root)
        self.corpus.check_root(self.root, data)
        return data

    def prepare_data(self) -> None:
        """Make ``root`` ready (once per node): the corpus checks it, or creates it (the
        image-text corpus generates the synthetic world)."""
        if self.root is not None:
            self.corpus.prepare(self.root)

    def split(self, split: str, train: bool | None = None) -> Split:
        """What the corpus is told about a split (``train`` defaults to ``split == "train"``)."""
        from_root = self.shard_specs[split] is None and self.has_manifest()
        return Split(
            name=split,
            train=split == "train" if train is None else train,
            root=self.root if from_root else None,
            entry=manifests.split_entry(self.manifest(), split) if from_root else {},
        )

    def eval_annotations(self, stage: str) -> dict[str, str]:
        """Evaluation annotation files of a stage's data, when known: ``kind -> path`` for the
        corpus's ``annotation_kinds``.

        The files come from ``root``'s manifest (see
        :func:`~lit_vlm.datamodules.manifests.annotation_files`) if the split's shards come from
        ``root`` and the files exist, overridden key by key by ``val_annotations`` /
        ``test_annotations``.

        Args:
            stage: ``"val"`` / ``"validate"`` / ``"fit"`` (the validation data), ``"test"`` or
                ``"predict"`` (``root``'s test files when ``predict_shards`` is not set).
        """
        split = _STAGE_SPLITS.get(stage)
        if split is None:
            raise UserError(f"stage must be one of {sorted(_STAGE_SPLITS)}, got {stage!r}")
        found: dict[str, str] = {}
        if self.shard_specs[split] is None and self.has_manifest():
            assert self.root is not None
            found = manifests.annotation_files(self.root, self.manifest(), split, self.corpus.annotation_kinds)
        found.update(self.annotation_files.get(split, {}))
        return found

    # ----------------------------------------------------------------------------- loaders

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _sources(self, split: str) -> list[Source]:
        spec = self.shard_specs[split]
        if spec is not None:
            try:
                return make_sources(spec, self.train_weights if split == "train" else None)
            except (OSError, ValueError) as exc:
                raise UserError(f"{split}_shards={spec!r}: {exc}") from exc
        if self.root is None:
            return []
        entry = manifests.split_entry(self.manifest(), split)
        if not entry.get("shards"):
            return []
        urls = [str(Path(self.root) / shard) for shard in entry["shards"]]
        weight = self.train_weights[0] if split == "train" and self.train_weights else 1.0
        name = f"{self.root}:{manifests.file_split(split)}"
        return [Source(urls=urls, weight=weight, num_samples=entry.get("num_samples"), name=name)]

    def _dataset(self, split: str, sources: list[Source], layout: str | None = None, num_workers: int | None = None,
                 mix: str | None = None) -> StreamDataset:
        """The stream of a split (``mix``: one source of ``train_mix``, with its batch size, share of
        the epoch and seed)."""
        train = split == "train" and layout is None
        batch_size, epoch_samples, seed = self.batch_size, self.train_epoch_samples, self.seed
        if mix is not None:
            sizes = {name: int(m.get("batch_size", self.batch_size)) for name, m in self.train_mix.items()}
            batch_size = sizes[mix]
            epoch_samples = max(batch_size, round(self.train_epoch_samples * batch_size / sum(sizes.values())))
            seed = derive_seed(self.seed, mix)
        rank, world_size = self._rank_world() if layout is None else (0, 1)
        info = self.split(split, train=train)
        return StreamDataset(
            sources,
            decode=self.corpus.decoder(info),
            collate=self.corpus.collator(info),
            batch_size=batch_size if train else self.eval_batch_size,
            split=split if mix is None else f"{split}/{mix}",
            train=train,
            rank=rank,
            world_size=world_size,
            num_workers=self.num_workers if num_workers is None else num_workers,
            seed=seed,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            resampled=self.resampled and train,
            epoch_samples=epoch_samples if train else None,
            skip_reasons=self.corpus.skip_reasons,
        )

    def _loader(self, dataset: StreamDataset, epoch_fn: Any = None) -> StreamLoader:
        return StreamLoader(
            dataset, num_workers=self.num_workers, pin_memory=self.pin_memory, epoch_fn=epoch_fn, stats_fn=self.record_stats
        )

    def train_dataloader(self) -> StreamLoader | CombinedLoader:
        """Endless shuffled stream cut into equal epochs on every rank (with ``train_mix``: one such
        stream per source, read side by side)."""
        epoch_fn = self._current_epoch if self.trainer is not None else None
        if self.train_mix:
            loaders = {}
            for name, mix in self.train_mix.items():
                sources = make_sources(mix["shards"]) if "shards" in mix else self._sources("train")
                if not sources:
                    raise UserError(f"train_mix[{name!r}]: no training data (give shards, or a root with a train split)")
                dataset = self._dataset("train", sources, mix=name)
                dataset.state = self._stream_state
                loaders[name] = self._loader(dataset, epoch_fn)
            return CombinedLoader(loaders, mode="min_size")
        sources = self._sources("train")
        if not sources:
            raise UserError("no training data: set root (a dataset folder) or train_shards")
        dataset = self._dataset("train", sources)
        dataset.state = self._stream_state  # one state object, shared with state_dict()
        return self._loader(dataset, epoch_fn)

    def _current_epoch(self) -> int:
        return int(self.trainer.current_epoch) if self.trainer is not None else self._stream_state.epoch

    def _eval_dataloader(self, split: str) -> StreamLoader | list[Any]:
        sources = self._sources(split)
        if not sources:
            return []
        return self._loader(self._dataset(split, sources))

    def sample_loader(self, split: str, num_workers: int = 0) -> StreamLoader | list[Any]:
        """Evaluation-layout batches (no augmentation, no shuffling) of any split, ``"train"``
        included, read whole by this process alone whatever the number of ranks. For evaluations
        that need a reference set (e.g. the nearest-neighbour caption baseline of
        :class:`~lit_vlm.callbacks.CaptionEvaluation`); the caller stops reading when it has
        enough. ``[]`` when the split has no data."""
        if split not in self.shard_specs:
            raise UserError(f"sample_loader: split must be one of {sorted(self.shard_specs)}, got {split!r}")
        sources = self._sources(split)
        if not sources:
            return []
        dataset = self._dataset(split, sources, layout="eval", num_workers=num_workers)
        return StreamLoader(dataset, num_workers=num_workers, pin_memory=False)

    def val_dataloader(self) -> StreamLoader | list[Any]:
        """Every validation sample exactly once across ranks; ``[]`` when there is none."""
        return self._eval_dataloader("val")

    def test_dataloader(self) -> StreamLoader | list[Any]:
        """Every test sample exactly once across ranks; ``[]`` when there is none."""
        return self._eval_dataloader("test")

    def predict_dataloader(self) -> StreamLoader | list[Any]:
        """Every prediction sample exactly once across ranks; ``[]`` when there is none."""
        return self._eval_dataloader("predict")

    # ----------------------------------------------------------------------------- statistics

    @property
    def skip_reasons(self) -> tuple[str, ...]:
        """Every reason a sample can be skipped for: the stream's and the corpus's."""
        return tuple(dict.fromkeys((*STREAM_SKIP_REASONS, *self.corpus.skip_reasons)))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Remove ``data_stats`` from the batch and record it (see :meth:`skip_counts`); a
        ``train_mix`` step's batches become ``{"sources": {name: batch}, "loss_weights": {name: w}}``."""
        if isinstance(batch, dict) and self.train_mix and set(batch) == set(self.train_mix):
            for part in batch.values():
                self.record_stats(part.pop("data_stats"))
            return {"sources": batch, "loss_weights": {n: float(m.get("loss_weight", 1.0)) for n, m in self.train_mix.items()}}
        if isinstance(batch, dict) and "data_stats" in batch:
            self.record_stats(batch.pop("data_stats"))
        return batch

    def record_stats(self, stats: dict[str, Any]) -> None:
        """Keep the latest ``data_stats`` of a (split, worker); log the counts per reason when the
        total of the epoch or pass first exceeds 0, then each time it doubles (1, 2, 4, ...), so
        a badly broken corpus does not flood the log."""
        split = str(stats.get("split", "?"))
        self._stats[(split, int(stats.get("worker", 0)))] = stats
        total = sum(self.skip_counts(split).values())
        last = self._logged_skips.get(split, 0)
        if total < last:  # a new epoch or pass: its counts start again
            last = self._logged_skips[split] = 0
        if total > 0 and total >= 2 * last:
            counts = {k: v for k, v in self.skip_counts(split).items() if v}
            logger.info("%s: %d bad samples skipped so far in this %s %s", split, total,
                        "epoch" if split.startswith("train") else "pass", counts)
            self._logged_skips[split] = total

    def skip_counts(self, split: str | None = None) -> dict[str, int]:
        """Skipped samples per reason, summed over workers (and over splits when ``split=None``).

        Counts come from the latest batch of each worker, so they cover the current (or most
        recent) epoch or evaluation pass of this process. Every reason of :attr:`skip_reasons` is
        present (zero when none).
        """
        counts = dict.fromkeys(self.skip_reasons, 0)
        for (stats_split, _), stats in self._stats.items():
            if split is None or stats_split == split or stats_split.startswith(f"{split}/"):
                for reason, n in stats.get("skipped", {}).items():
                    counts[reason] = counts.get(reason, 0) + int(n)
        return counts

    def drop_counts(self, split: str | None = None) -> dict[str, int]:
        """Parts of samples dropped (an interleaved document's images) per reason, summed like
        :meth:`skip_counts`; only the reasons that occurred."""
        counts: dict[str, int] = {}
        for (stats_split, _), stats in self._stats.items():
            if split is None or stats_split == split or stats_split.startswith(f"{split}/"):
                for reason, n in stats.get("dropped", {}).items():
                    counts[reason] = counts.get(reason, 0) + int(n)
        return counts

    @property
    def stream_stats(self) -> dict[str, dict[str, Any]]:
        """Totals per split: ``{"samples": int, "skipped": int, "skipped_by_reason": {...}}``, and
        ``"dropped_by_reason"`` where parts of samples were dropped."""
        result: dict[str, dict[str, Any]] = {}
        for split in sorted({s for s, _ in self._stats}):
            by_reason = self.skip_counts(split)
            samples = sum(int(v.get("samples", 0)) for (s, _), v in self._stats.items() if s == split)
            result[split] = {"samples": samples, "skipped": sum(by_reason.values()), "skipped_by_reason": by_reason}
            dropped = self.drop_counts(split)
            if dropped:
                result[split]["dropped_by_reason"] = dropped
        return result

    @property
    def skipped_total(self) -> int:
        """Skipped samples over all splits, workers and reasons (see :meth:`skip_counts`)."""
        return sum(self.skip_counts().values())

    # ----------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The training stream's epoch. The position inside the epoch (every worker of every rank)
        is the training loader's own state (:meth:`StreamLoader.state_dict`), which Lightning
        saves beside this in each checkpoint."""
        return {"stream": dataclasses.asdict(self._stream_state)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        stream = state_dict.get("stream", {})
        self._stream_state.epoch = int(stream.get("epoch", self._stream_state.epoch))


class TextFacts:
    """The model-facing facts of a DataModule whose corpus tokenizes text and has images (or
    frames): what ``lit-vlm`` links into the model's unset arguments (``vocab_size``, ...)."""

    corpus: Any

    @property
    def tokenizer(self) -> Any:
        """The text tokenizer (the corpus's)."""
        return self.corpus.tokenizer

    @property
    def image_size(self) -> int:
        """Side of the square images (or frames) given to the model."""
        return self.corpus.image_size

    @property
    def context_length(self) -> int:
        """Length of every token row."""
        return self.corpus.context_length

    @property
    def vocab_size(self) -> int:
        """Number of token ids (rows of a text embedding table)."""
        return self.tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        """Id used to pad token rows."""
        return self.tokenizer.pad_id
