"""Streaming webdataset pipeline: shard specs, rank/worker splitting, epochs, robust decoding.

The pieces, from the outside in:

* :func:`expand_urls` turns shard specs (local paths, ``{000000..000099}`` brace patterns, globs,
  directories, ``pipe:`` commands, ``http(s)://`` URLs, several joined with ``::``) into a flat
  list of URLs; :func:`make_sources` builds one :class:`Source` per spec of a list.
* :class:`StreamDataset` is an :class:`~torch.utils.data.IterableDataset` that reads the shards
  with webdataset's building blocks, splits the work across DDP ranks and DataLoader workers,
  decodes samples with a user callable (skipping and counting bad ones) and yields ready
  *batches* (so the DataLoader runs with ``batch_size=None``).
* :class:`StreamLoader` is a :class:`~torch.utils.data.DataLoader` that calls
  ``dataset.set_epoch(epoch_fn())`` each time it is iterated, because Lightning only tells
  *samplers* about the epoch.

Splitting.  The dataset is told ``rank`` and ``world_size``; the worker id comes from
:func:`torch.utils.data.get_worker_info`.  With ``total = world_size * num_workers`` workers in
all, this worker's global index is ``g = rank * num_workers + worker_id``.

* Training is an infinite stream cut into epochs of exactly ``batches_per_worker`` batches in
  every worker, so every rank runs the same number of steps (DDP would hang otherwise).  For a
  source with at least ``total`` shards each pass over the data shuffles the shard list with a
  seed derived from (seed, epoch, pass) -- identical on every rank -- and takes
  ``shards[g::total]``; with fewer shards every worker reads everything and keeps the samples
  whose running index ``% total == g``.  ``resampled=True`` instead draws shards with replacement
  in each worker.  Several sources are mixed at random with the given weights.  A seeded shuffle
  buffer follows.
* Evaluation reads every shard in order and keeps raw sample ``i`` iff ``i % total == g``
  (before decoding), so every sample is seen exactly once across ranks and workers and the ranks
  stay balanced; the last batch may be partial and a worker may get nothing.  Every worker does
  read every evaluation shard (only the tar parsing is repeated, not the decoding), which for
  remote shards multiplies the download volume by ``total``.

Robustness.  Bad input never kills a worker: unreadable/truncated shards are handled by a
webdataset handler (counted as ``tar_error``; the sample being assembled when the error struck is
dropped and reading continues with the next shard), a sample whose key already occurred in its
shard is dropped (``duplicate_key``; a member name repeated inside a sample starts such a
repeat), and the decode callable raises :class:`~lit_vlm.datamodules.transforms.BadSample` for
bad samples.  Skips are counted per reason; the first few per worker are logged (logger
``lit_vlm.data``) with shard URL and key.  Every batch carries ``batch["data_stats"]`` with the
worker's cumulative counts for the epoch.  An evaluation worker holds each batch back until the
next is ready, so its last batch carries the counts of its whole pass (skips after the last
sample included); a worker that produced no batch at all sends its counts alone (``STATS_ONLY``).

Resuming mid-epoch.  Every random choice of a training stream derives from (seed, epoch, global
worker), so a worker's position is fully described by the number of raw samples it has drawn
from its (mixed, shuffled) raw stream, the number of batches it has yielded, its augmentation
generator's state and its counts.  Each training batch carries that position; :class:`StreamLoader`
keeps the latest one per worker and is *stateful* in Lightning's sense (``state_dict`` /
``load_state_dict``, saved in every checkpoint and gathered from all ranks under DDP).  On resume
each worker replays its raw stream up to its position *without decoding* (tar reading and the
shuffle buffer only), restores its generator and counts, and yields exactly the batches the
interrupted run had not yet delivered; the DataLoader's workers are rotated so that the next batch
comes from the worker whose turn it was.  Resuming needs the same ``world_size``, ``num_workers``,
batch size and seed; otherwise the epoch restarts from its beginning, with a warning.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, tar_file_expander, url_opener

from lit_vlm.datamodules.transforms import BadSample
from lit_vlm.distributed import all_gather_objects
from lit_vlm.errors import MissingFileError, UserError

__all__ = [
    "DROPPED",
    "STREAM_SKIP_REASONS",
    "BadSample",
    "Source",
    "StreamDataset",
    "StreamLoader",
    "StreamState",
    "count_samples",
    "derive_seed",
    "expand_urls",
    "is_remote",
    "make_sources",
]

logger = logging.getLogger("lit_vlm.data")

STREAM_SKIP_REASONS: tuple[str, ...] = ("tar_error", "duplicate_key")
"""Reasons the stream itself skips samples for; a corpus's decoder adds its own
(:attr:`lit_vlm.datamodules.corpus.Corpus.skip_reasons`)."""

DROPPED = "__dropped__"
"""Key of a decoded example (and ``BadSample.dropped``): parts of the sample dropped, per reason,
which the stream counts in ``data_stats["dropped"]`` and removes before collation."""

Batch = dict[str, Any]

STATS_ONLY = "__stats_only__"
"""Key of the item an evaluation worker that produced no batch yields to report its skip counts;
:class:`StreamLoader` hands it to its ``stats_fn`` and never yields it."""
DecodeFn = Callable[[dict[str, Any], torch.Generator], dict[str, Any]]
CollateFn = Callable[[list[dict[str, Any]]], Batch]


# --------------------------------------------------------------------------------------------
# Shard specs
# --------------------------------------------------------------------------------------------


def is_remote(url: str) -> bool:
    """True for ``pipe:`` commands and ``scheme://`` URLs (anything but a local path)."""
    if url.startswith("pipe:"):
        return True
    scheme, sep, _ = url.partition("://")
    return bool(sep) and scheme != "file" and len(scheme) > 1


def _expand_local(pattern: str) -> list[str]:
    path = pattern[len("file://") :] if pattern.startswith("file://") else pattern
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.tar")))
        if not found:
            raise MissingFileError(f"shard directory {pattern!r} contains no *.tar file")
        return found
    urls: list[str] = []
    missing: list[str] = []
    for item in braceexpand.braceexpand(path):
        if glob.has_magic(item):
            matches = sorted(glob.glob(item))
            urls.extend(matches)
            if not matches:
                missing.append(item)
        elif os.path.isfile(item):
            urls.append(item)
        else:
            missing.append(item)
    if not urls:
        raise MissingFileError(f"shard pattern {pattern!r} matches no file")
    if missing:
        shown = ", ".join(repr(m) for m in missing[:3]) + (", ..." if len(missing) > 3 else "")
        logger.warning(
            "shard pattern %r: %d of its paths do not exist and are ignored (%s)", pattern, len(missing), shown
        )
    return urls


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Expand a shard spec into a flat list of URLs.

    A spec is a local path, a brace pattern (``data/shard-{000000..000099}.tar``), a glob
    (``data/*.tar``), a directory (all its ``*.tar`` files), a ``pipe:`` command or an
    ``http(s)://`` (or other ``scheme://``) URL; several specs may be joined with ``::`` or given
    as a list (the URLs are concatenated).  Brace patterns are expanded everywhere; local paths
    are checked: paths that do not exist are dropped with a warning.

    Raises:
        FileNotFoundError: If a local pattern matches no file at all.
        ValueError: If the spec is empty.
    """
    if not isinstance(spec, str):
        return [url for item in spec for url in expand_urls(item)]
    urls: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        if is_remote(part):
            urls.extend(braceexpand.braceexpand(part))
        else:
            urls.extend(_expand_local(part))
    if not urls:
        raise UserError(f"empty shard spec {spec!r}")
    return urls


def count_samples(urls: Sequence[str]) -> int | None:
    """Sum the ``successes`` of the img2dataset ``*_stats.json`` files beside local shards.

    ``shard/00012.tar`` is described by ``shard/00012_stats.json``.  Returns ``None`` when any
    shard is remote or has no readable stats file.
    """
    total = 0
    for url in urls:
        if is_remote(url) or not url.endswith(".tar"):
            return None
        stats_path = url[: -len(".tar")] + "_stats.json"
        try:
            with open(stats_path, encoding="utf-8") as fh:
                total += int(json.load(fh)["successes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return total


@dataclass
class Source:
    """One stream of shards.

    Args:
        urls: Expanded shard URLs.
        weight: Relative probability of drawing the next training sample from this source.
        num_samples: Number of samples if known (synthetic manifest, img2dataset stats).
        name: Label for messages (usually the spec it came from).
    """

    urls: list[str]
    weight: float = 1.0
    num_samples: int | None = None
    name: str = ""


def make_sources(
    specs: str | Sequence[str],
    weights: Sequence[float] | None = None,
    num_samples: Sequence[int | None] | None = None,
) -> list[Source]:
    """One :class:`Source` per spec (a single string is one source).

    Without ``weights``, sources are weighted by their sample counts when all are known (the mix
    then behaves like one pooled dataset), else equally.
    """
    spec_list = [specs] if isinstance(specs, str) else list(specs)
    if weights is not None and len(weights) != len(spec_list):
        raise UserError(f"{len(weights)} weights given for {len(spec_list)} shard sources")
    sources = []
    for i, spec in enumerate(spec_list):
        urls = expand_urls(spec)
        known = num_samples[i] if num_samples is not None else count_samples(urls)
        sources.append(Source(urls=urls, num_samples=known, name=spec if isinstance(spec, str) else "+".join(spec)))
    if weights is not None:
        for source, weight in zip(sources, weights):
            source.weight = float(weight)
    elif len(sources) > 1 and all(s.num_samples for s in sources):
        for source in sources:
            source.weight = float(source.num_samples or 0)
    return sources


# --------------------------------------------------------------------------------------------
# Seeds, state, statistics
# --------------------------------------------------------------------------------------------


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings, stable across processes and machines."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class StreamState:
    """Everything that determines where a training stream is.

    Passes over the data restart from 0 at every epoch (their shard orders derive from
    (seed, epoch, pass)), so the epoch alone pins the stream down.
    """

    epoch: int = 0


@dataclass
class _WorkerStats:
    """Per-worker, per-epoch counters and stream position; logs the first few skips."""

    split: str
    worker: int
    epoch: int
    max_logged: int
    samples: int = 0
    reasons: tuple[str, ...] = STREAM_SKIP_REASONS
    skipped: dict[str, int] = field(default_factory=dict)
    logged: int = 0
    raw: int = 0  # raw samples drawn from the (mixed, shuffled) stream, decoded or skipped
    batches: int = 0  # batches yielded
    dropped: dict[str, int] = field(default_factory=dict)  # parts of samples dropped (a document's images)

    def __post_init__(self) -> None:
        self.skipped = dict.fromkeys(self.reasons, 0)

    def skip(self, reason: str, url: str, key: str | None, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if self.logged < self.max_logged:
            self.logged += 1
            logger.warning(
                "%s worker %d: skipped sample %r of %s (%s): %s", self.split, self.worker, key, url, reason, message
            )
            if self.logged == self.max_logged:
                logger.warning("%s worker %d: further bad samples are only counted", self.split, self.worker)

    def count_dropped(self, dropped: dict[str, int] | None) -> None:
        for reason, n in (dropped or {}).items():
            self.dropped[reason] = self.dropped.get(reason, 0) + int(n)

    def snapshot(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "worker": self.worker,
            "epoch": self.epoch,
            "samples": self.samples,
            "skipped": dict(self.skipped),
            "dropped": dict(self.dropped),
            "raw": self.raw,
            "batches": self.batches,
        }


def _group_members(files: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """webdataset's ``group_by_keys`` (consecutive members with one key prefix make a sample;
    extensions lower-cased), except that a member name that repeats inside a sample starts a new
    sample with the same key instead of raising (which ended the whole shard): the reader then
    counts the repeat as a ``duplicate_key`` skip."""
    current: dict[str, Any] | None = None
    for member in files:
        if "fname" not in member:  # an empty marker: the sample in progress is complete
            if current is not None:
                yield current
            current = None
            continue
        prefix, suffix = base_plus_ext(member["fname"])
        if prefix is None:
            continue
        suffix = suffix.lower()
        if current is None or prefix != current["__key__"] or suffix in current:
            if current is not None:
                yield current
            current = {"__key__": prefix, "__url__": member["__url__"]}
        current[suffix] = member["data"]
    if current is not None:
        yield current


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


class StreamDataset(IterableDataset):
    """Batched, rank/worker-aware webdataset stream.

    Args:
        sources: Shard sources.  Training mixes them by weight; evaluation concatenates them.
        decode: ``decode(raw_sample, generator) -> sample``; ``raw_sample`` is webdataset's dict of
            member bytes (``"jpg"``, ``"txt"``, ``"json"``, ..., plus ``"__key__"``/``"__url__"``);
            it raises :class:`BadSample` to skip.  ``generator`` is seeded per
            (seed, epoch, global worker) for random augmentation.  Must be picklable.
        collate: Turns a list of decoded samples (each with ``"__key__"`` added) into a batch dict
            (``"sample_id"``, the keys, is added when it has none).
        batch_size: Samples per batch.
        split: Name used in ``data_stats`` and logs (``"train"``, ``"val"``, ...).
        train: Infinite shuffled epochs (True) or exactly-once ordered evaluation (False).
        rank: This process's rank.
        world_size: Number of processes.
        num_workers: DataLoader workers per process (0 = load in the main process); must match
            the loader's.
        seed: Base seed of every random choice.
        shuffle_buffer: Size of the sample shuffle buffer (training; 0 or 1 disables it).
        resampled: Training: draw shards with replacement in every worker instead of splitting.
        epoch_samples: Training: samples per epoch over all ranks; ``None`` uses the sum of the
            sources' known sample counts.
        max_logged_skips: How many skips each worker logs at WARNING before only counting.
        skip_reasons: The decoder's skip reasons, counted (zero included) beside the stream's own
            :data:`STREAM_SKIP_REASONS`; a reason outside them is counted all the same.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        decode: DecodeFn,
        collate: CollateFn,
        batch_size: int,
        split: str = "train",
        train: bool = True,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 0,
        resampled: bool = False,
        epoch_samples: int | None = None,
        max_logged_skips: int = 5,
        skip_reasons: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not sources or any(not s.urls for s in sources):
            raise UserError(f"{split}: no shards to read")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_workers < 0:
            raise UserError(f"num_workers must be >= 0, got {num_workers}")
        weights = [s.weight for s in sources]
        if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
            raise UserError(f"{split}: source weights must be non-negative with a positive sum, got {weights}")
        self.sources = list(sources)
        self.decode = decode
        self.collate = collate
        self.batch_size = batch_size
        self.split = split
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.max_logged_skips = max_logged_skips
        self.skip_reasons = tuple(dict.fromkeys((*STREAM_SKIP_REASONS, *skip_reasons)))
        self.state = StreamState()
        #: Training: ``{"epoch": e, "workers": {g: position}}`` set by :class:`StreamLoader` to
        #: resume mid-epoch; a worker whose ``g`` is listed starts from that position in epoch e.
        self.resume_from: dict[str, Any] | None = None
        #: DataLoader worker k plays this rank's worker (k + worker_offset) % num_workers. The
        #: DataLoader takes batches from its workers in turn, starting with worker 0; a resumed
        #: epoch must start with the worker whose turn it was, so the loader rotates them.
        self.worker_offset = 0
        known = [s.num_samples for s in self.sources]
        self.num_samples: int | None = None if any(n is None for n in known) else sum(n or 0 for n in known)
        if train:
            if epoch_samples is None:
                if self.num_samples is None:
                    raise UserError(
                        f"{split}: the number of samples in {[s.name for s in self.sources]} is unknown "
                        "(no synthetic manifest and no img2dataset *_stats.json beside the shards); "
                        "set train_epoch_samples"
                    )
                epoch_samples = self.num_samples
            if epoch_samples < 1:
                raise UserError(f"{split}: epoch_samples must be >= 1, got {epoch_samples}")
            self.epoch_samples = epoch_samples
            self._log_split_modes()
        else:
            self.epoch_samples = self.num_samples
            self._warn_idle_ranks()

    # ----------------------------------------------------------------------------- geometry

    @property
    def workers_per_rank(self) -> int:
        """Data-loading processes per rank (the main process counts as one when num_workers=0)."""
        return max(1, self.num_workers)

    @property
    def total_workers(self) -> int:
        """Workers across all ranks."""
        return self.world_size * self.workers_per_rank

    @property
    def batches_per_worker(self) -> int:
        """Training: batches each worker yields per epoch (identical everywhere)."""
        if not self.train:
            raise TypeError("batches_per_worker is only defined for training streams")
        return max(1, self.epoch_samples // (self.total_workers * self.batch_size))

    def _eval_worker_batches(self, g: int) -> int:
        assert self.num_samples is not None
        total = self.total_workers
        mine = max(0, (self.num_samples - g + total - 1) // total)
        return math.ceil(mine / self.batch_size)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (training), or per pass (evaluation, if known).

        Raises:
            TypeError: For an evaluation stream whose sample count is unknown.
        """
        if self.train:
            return self.batches_per_worker * self.workers_per_rank
        if self.num_samples is None:
            raise TypeError(f"{self.split}: length unknown (sample count not available)")
        first = self.rank * self.workers_per_rank
        return sum(self._eval_worker_batches(g) for g in range(first, first + self.workers_per_rank))

    def _split_mode(self, source: Source) -> str:
        if self.resampled:
            return "resampled"
        return "shards" if len(source.urls) >= self.total_workers else "samples"

    def _log_split_modes(self) -> None:
        if self.rank != 0:
            return
        for i, source in enumerate(self.sources):
            mode = self._split_mode(source)
            detail = {
                "resampled": "every worker draws shards with replacement",
                "shards": "each worker reads its own shards",
                "samples": "every worker reads all shards and keeps every total-th sample",
            }[mode]
            logger.info(
                "%s source %d (%s): %d shards, %d workers in total -> split by %s (%s)",
                self.split,
                i,
                source.name or "?",
                len(source.urls),
                self.total_workers,
                mode,
                detail,
            )

    def _warn_idle_ranks(self) -> None:
        if self.num_samples is not None and self.num_samples <= self.rank * self.workers_per_rank:
            logger.warning(
                "%s: only %d samples for %d workers in total: rank %d gets none",
                self.split,
                self.num_samples,
                self.total_workers,
                self.rank,
            )

    # ----------------------------------------------------------------------------- epochs

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; shard order, shuffling and augmentation depend on it."""
        self.state.epoch = int(epoch)

    @property
    def epoch(self) -> int:
        """The current epoch (see :meth:`set_epoch`)."""
        return self.state.epoch

    # ----------------------------------------------------------------------------- reading

    def _read_shard(self, url: str, stats: _WorkerStats, count_errors: bool) -> Iterator[dict[str, Any]]:
        """Raw samples of one shard; a read error ends the shard and is counted once.

        webdataset's grouping stage only knows a sample is complete when the next key starts, so
        after an error it still hands over the sample it was assembling.  That sample is dropped
        when the failure happened in one of its members (or in the header after its last one);
        it is kept when the failing member was the first of the next sample.
        """
        errors: list[Exception] = []
        header: list[str | None] = [None]  # name of the last member whose header was read
        failed_key: list[str | None] = [None]

        def note_member(name: str) -> str:
            header[0] = name
            return name

        def handler(exn: Exception) -> bool:
            if not errors and header[0] is not None:
                failed_key[0] = base_plus_ext(header[0])[0]
            errors.append(exn)
            return False  # stop this shard; the caller goes on with the next one

        source: dict[str, Any] = {"url": url}
        files = tar_file_expander(url_opener([source], handler=handler), handler=handler, rename_files=note_member)
        seen: set[str] = set()
        try:
            for sample in _group_members(files):
                if errors and sample.get("__key__") == failed_key[0]:
                    break  # incomplete: lost with the rest of the shard
                key = sample["__key__"]
                if key in seen:
                    if count_errors:
                        stats.skip("duplicate_key", url, key, "a sample with this key came earlier in the shard")
                    continue
                seen.add(key)
                yield sample
        finally:
            stream = source.get("stream")
            if stream is not None:
                try:
                    stream.close()
                except Exception as exc:  # e.g. a pipe: closed early exits with SIGPIPE
                    logger.debug("closing %s: %s", url, exc)
            if errors and count_errors:
                stats.skip("tar_error", url, failed_key[0], f"{type(errors[0]).__name__}: {errors[0]}")

    def _train_source(self, index: int, source: Source, g: int, stats: _WorkerStats) -> Iterator[dict[str, Any]]:
        """Infinite stream of raw samples of one source for worker ``g``."""
        epoch, total, urls = self.state.epoch, self.total_workers, source.urls
        mode = self._split_mode(source)
        if mode == "resampled":
            shard_seed = derive_seed(self.seed, epoch, index, "resample") & 0x7FFFFFFF
            shards = wds.ResampledShards(urls, seed=shard_seed, worker_seed=lambda: g, deterministic=True)
            empty_run = 0
            for item in shards:
                produced = False
                for sample in self._read_shard(item["url"], stats, count_errors=True):
                    produced = True
                    yield sample
                empty_run = 0 if produced else empty_run + 1
                if empty_run >= max(100, 10 * len(urls)):
                    raise UserError(
                        f"{self.split}: no readable sample in {empty_run} shards drawn from {source.name!r}"
                    )
            return
        running = 0  # sample-split mode: index over the endless concatenation of passes
        empty_passes = 0
        for pass_index in itertools.count():
            order = [
                item["url"] for item in wds.SimpleShardList(urls, seed=derive_seed(self.seed, epoch, index, pass_index))
            ]
            produced = 0
            if mode == "shards":
                for url in order[g::total]:
                    for sample in self._read_shard(url, stats, count_errors=True):
                        produced += 1
                        yield sample
            else:
                for position, url in enumerate(order):
                    for sample in self._read_shard(url, stats, count_errors=position % total == g):
                        produced += 1
                        if running % total == g:
                            yield sample
                        running += 1
            empty_passes = 0 if produced else empty_passes + 1
            if empty_passes >= (10 if mode == "shards" else 1):
                raise UserError(
                    f"{self.split}: source {source.name!r} produced no readable sample in {empty_passes} passes"
                )

    def _mix(self, streams: list[Iterator[dict[str, Any]]], g: int) -> Iterator[dict[str, Any]]:
        """Draw from ``streams`` at random with the sources' weights (like ``wds.RandomMix``)."""
        rng = random.Random(derive_seed(self.seed, self.state.epoch, g, "mix"))
        weights = [s.weight for s in self.sources]
        indices = list(range(len(streams)))
        while True:
            (i,) = rng.choices(indices, weights=weights)
            yield next(streams[i])

    def _eval_raw(self, g: int, stats: _WorkerStats) -> Iterator[dict[str, Any]]:
        """Raw samples ``i`` with ``i % total == g``, reading every shard in order."""
        total = self.total_workers
        urls = [url for source in self.sources for url in source.urls]
        running = 0
        for position, url in enumerate(urls):
            for sample in self._read_shard(url, stats, count_errors=position % total == g):
                if running % total == g:
                    yield sample
                running += 1

    def _decoded(
        self, raw: Iterator[dict[str, Any]], generator: torch.Generator, stats: _WorkerStats
    ) -> Iterator[dict[str, Any]]:
        consecutive_bad = 0
        for sample in raw:
            try:
                decoded = self.decode(sample, generator)
            except BadSample as bad:
                stats.count_dropped(bad.dropped)
                stats.skip(bad.reason, sample.get("__url__", "?"), sample.get("__key__"), bad.message)
                consecutive_bad += 1
                if self.train and consecutive_bad >= 100_000:
                    raise UserError(
                        f"{self.split}: {consecutive_bad} bad samples in a row; is the data usable?"
                    ) from bad
                continue
            consecutive_bad = 0
            stats.count_dropped(decoded.pop(DROPPED, None))
            decoded["__key__"] = sample["__key__"]
            yield decoded

    def _worker_position(self) -> tuple[int, int]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != self.workers_per_rank:
            raise RuntimeError(
                f"{self.split}: dataset configured for num_workers={self.num_workers} but iterated with "
                f"{num_workers if info is not None else 0} DataLoader workers; use StreamLoader"
            )
        worker_id = (worker_id + self.worker_offset) % self.workers_per_rank
        return self.rank * self.workers_per_rank + worker_id, self.total_workers

    def __iter__(self) -> Iterator[Batch]:
        g, _ = self._worker_position()
        epoch = self.state.epoch
        stats = _WorkerStats(self.split, g, epoch, self.max_logged_skips, reasons=self.skip_reasons)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, g, "augment"))
        if self.train:
            streams = [self._train_source(i, s, g, stats) for i, s in enumerate(self.sources)]
            raw = streams[0] if len(streams) == 1 else self._mix(streams, g)
            if self.shuffle_buffer > 1:
                rng = random.Random(derive_seed(self.seed, epoch, g, "shuffle"))
                raw = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(raw)
            raw = self._counted(raw, stats)
            resume = self.resume_from
            if resume is not None and int(resume.get("epoch", -1)) == epoch and g in resume.get("workers", {}):
                self._fast_forward(raw, resume["workers"][g], generator, stats)
            limit: int | None = self.batches_per_worker
        else:
            raw = self._eval_raw(g, stats)
            limit = None
        yield from self._batches(self._decoded(raw, generator, stats), stats, limit, generator)

    @staticmethod
    def _counted(raw: Iterator[dict[str, Any]], stats: _WorkerStats) -> Iterator[dict[str, Any]]:
        for sample in raw:
            stats.raw += 1
            yield sample

    def _fast_forward(
        self, raw: Iterator[dict[str, Any]], position: dict[str, Any], generator: torch.Generator, stats: _WorkerStats
    ) -> None:
        """Skip the raw samples a previous run already drew (reading, not decoding them), then
        restore that run's generator and counts."""
        target = int(position["raw"])
        logged, stats.logged = stats.logged, stats.max_logged  # skips seen again are not news
        for _ in range(target):
            if next(raw, None) is None:  # pragma: no cover - training streams are endless
                break
        stats.logged = logged
        if stats.raw != target:  # pragma: no cover
            raise RuntimeError(f"{self.split} worker {stats.worker}: could only replay {stats.raw} of {target} samples")
        state = position["generator"]
        generator.set_state(state if isinstance(state, torch.Tensor) else torch.tensor(list(state), dtype=torch.uint8))
        stats.samples = int(position["samples"])
        stats.skipped = {**dict.fromkeys(stats.reasons, 0), **{k: int(v) for k, v in position["skipped"].items()}}
        stats.dropped = {k: int(v) for k, v in position.get("dropped", {}).items()}
        stats.batches = int(position["batches"])
        logger.info(
            "%s worker %d: resumed epoch %d after %d batches (%d raw samples replayed without decoding)",
            self.split, stats.worker, stats.epoch, stats.batches, target,
        )

    def _batches(
        self, samples: Iterator[dict[str, Any]], stats: _WorkerStats, limit: int | None, generator: torch.Generator
    ) -> Iterator[Batch]:
        pending: list[dict[str, Any]] = []
        if limit is not None and stats.batches >= limit:
            return
        if self.train:
            for sample in samples:
                pending.append(sample)
                if len(pending) == self.batch_size:
                    yield self._finish(pending, stats, generator)
                    pending = []
                    if limit is not None and stats.batches >= limit:
                        return
            return
        # Evaluation holds each batch back until the next one is ready, so that the last batch can
        # carry the counts of the whole pass (skips after it, e.g. a broken last shard, included).
        held: Batch | None = None
        for sample in samples:
            pending.append(sample)
            if len(pending) == self.batch_size:
                if held is not None:
                    yield held
                held, pending = self._finish(pending, stats, generator), []
        if pending:  # evaluation keeps the partial last batch
            if held is not None:
                yield held
            held = self._finish(pending, stats, generator)
        if held is not None:
            held["data_stats"] = stats.snapshot()
            yield held
        elif any(stats.skipped.values()):  # no sample at all: the counts travel alone
            yield {STATS_ONLY: True, "data_stats": stats.snapshot()}

    def _finish(self, samples: list[dict[str, Any]], stats: _WorkerStats, generator: torch.Generator) -> Batch:
        stats.samples += len(samples)
        stats.batches += 1
        batch = self.collate(samples)
        batch.setdefault("sample_id", [s["__key__"] for s in samples])  # the batch contract's one common key
        batch["data_stats"] = stats.snapshot()
        if self.train:  # the position StreamLoader keeps for resuming (bytes: cheap to pass between processes)
            batch["data_stats"]["generator"] = generator.get_state().numpy().tobytes()
        return batch

    def __repr__(self) -> str:
        shards = sum(len(s.urls) for s in self.sources)
        return (
            f"{type(self).__name__}(split={self.split!r}, train={self.train}, sources={len(self.sources)}, "
            f"shards={shards}, rank={self.rank}/{self.world_size}, num_workers={self.num_workers}, "
            f"batch_size={self.batch_size}, epoch={self.state.epoch})"
        )


class StreamLoader(DataLoader):
    """DataLoader for a :class:`StreamDataset` (which batches by itself).

    Each ``iter()`` first calls ``dataset.set_epoch(epoch_fn())`` when ``epoch_fn`` is given, so
    the (non-persistent) worker processes receive a dataset copy that knows the epoch.

    For a training stream the loader is resumable: it records the position each worker had
    reached when it delivered its latest batch, :meth:`state_dict` returns them (gathered from
    every rank under ``torch.distributed``) and :meth:`load_state_dict` makes the next ``iter()``
    continue from there (see the module docstring). Lightning calls both through its checkpoints.

    Args:
        dataset: The stream.
        batch_size: Must stay ``None``: batching happens inside the dataset (the argument
            exists so that Lightning can re-create the loader).
        num_workers: Worker processes; must equal ``dataset.num_workers``.
        pin_memory: Pin batches in page-locked memory (for faster GPU copies).
        epoch_fn: Returns the current epoch (e.g. ``lambda: trainer.current_epoch``).
        stats_fn: Called with the ``data_stats`` of an evaluation worker that yielded no batch
            (all its samples were bad), so that its skip counts are not lost.
        **kwargs: Other :class:`~torch.utils.data.DataLoader` options (``timeout``,
            ``prefetch_factor``, ``multiprocessing_context``, ...).
    """

    def __init__(
        self,
        dataset: StreamDataset,
        batch_size: None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        epoch_fn: Callable[[], int] | None = None,
        stats_fn: Callable[[dict[str, Any]], None] | None = None,
        **kwargs: Any,
    ) -> None:
        if batch_size is not None:
            raise UserError("StreamLoader batches inside the dataset: leave batch_size=None")
        if isinstance(dataset, StreamDataset) and dataset.num_workers != num_workers:
            raise UserError(
                f"dataset was built for num_workers={dataset.num_workers} but the loader uses {num_workers}"
            )
        # The loader draws a base seed for its workers at every iter(): from its own generator, not
        # the global one, so starting an epoch (or resuming one) leaves the model's random stream
        # (patch dropout, dropout) untouched. The stream's own randomness derives from its seed.
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        super().__init__(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kwargs)
        self.epoch_fn = epoch_fn
        self.stats_fn = stats_fn
        self._positions: dict[int, dict[str, Any]] = {}  # global worker -> latest position
        self._positions_epoch: int | None = None
        self._pending: dict[str, Any] | None = None

    def _resumable(self) -> bool:
        return isinstance(self.dataset, StreamDataset) and self.dataset.train

    def __iter__(self) -> Iterator[Batch]:
        """A lazy iterator: the epoch, the resume position and the worker processes are taken at
        its first ``next()``, not here. Lightning creates the training iterator early (while it
        counts the steps of the fit, before a checkpoint's state is restored); starting then would
        read the wrong epoch and miss the saved position."""
        return self._tracked()

    def _start(self) -> Iterator[Batch]:
        if self.epoch_fn is not None and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(int(self.epoch_fn()))
        if self._resumable():
            dataset: StreamDataset = self.dataset  # type: ignore[assignment]
            resume, self._pending = self._pending, None
            if resume is not None and int(resume["epoch"]) != dataset.epoch:
                resume = None  # saved at the end of an epoch: the next one starts afresh
            dataset.resume_from = resume
            self._positions_epoch = dataset.epoch
            self._positions = dict(resume["workers"]) if resume is not None else {}
            mine = range(dataset.rank * dataset.workers_per_rank, (dataset.rank + 1) * dataset.workers_per_rank)
            delivered = sum(int(self._positions[g]["batches"]) for g in mine if g in self._positions)
            dataset.worker_offset = delivered % dataset.workers_per_rank  # whose turn it is
        return super().__iter__()

    def _tracked(self) -> Iterator[Batch]:
        for batch in self._start():
            if isinstance(batch, dict) and batch.get(STATS_ONLY):
                if self.stats_fn is not None:
                    self.stats_fn(batch["data_stats"])
                continue
            stats = batch.get("data_stats") if isinstance(batch, dict) else None
            if isinstance(stats, dict) and "generator" in stats:
                position = {k: stats[k] for k in ("raw", "batches", "samples", "skipped")}
                position["generator"] = torch.frombuffer(bytearray(stats.pop("generator")), dtype=torch.uint8)
                self._positions[int(stats["worker"])] = position
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Training: where every worker of every rank stands in the current epoch (``{}`` for
        evaluation loaders). Under ``torch.distributed`` every rank must call it (it gathers)."""
        if not self._resumable():
            return {}
        dataset: StreamDataset = self.dataset  # type: ignore[assignment]
        workers = dict(self._positions)
        if dataset.world_size > 1:
            workers = {g: p for part in all_gather_objects(workers) for g, p in part.items()}
        return {
            "epoch": self._positions_epoch if self._positions_epoch is not None else dataset.epoch,
            "workers": workers,
            "geometry": self._geometry(),
        }

    def _geometry(self) -> dict[str, Any]:
        dataset: StreamDataset = self.dataset  # type: ignore[assignment]
        return {
            "world_size": dataset.world_size,
            "num_workers": dataset.num_workers,
            "batch_size": dataset.batch_size,
            "seed": dataset.seed,
            "batches_per_worker": dataset.batches_per_worker,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` at the next ``iter()`` (if it is the same epoch)."""
        if not self._resumable() or not state_dict:
            return
        saved, now = state_dict.get("geometry", {}), self._geometry()
        if saved != now:
            changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in now.items() if saved.get(k) != v)
            logger.warning(
                "%s: cannot resume mid-epoch because the stream changed (%s); epoch %s restarts from its beginning",
                self.dataset.split, changed, state_dict.get("epoch"),  # type: ignore[attr-defined]
            )
            return
        self._pending = {"epoch": int(state_dict["epoch"]), "workers": dict(state_dict.get("workers", {}))}
