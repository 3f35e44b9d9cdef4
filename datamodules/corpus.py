"""Corpus plug-ins: what a kind of data adds to the generic shard DataModule.

:class:`~lit_vlm.datamodules.shards.ShardDataModule` streams webdataset shards whatever they hold
(sources, splitting, shuffling, epochs, statistics, resume).  A :class:`Corpus` says what the
samples *are*:

* :meth:`Corpus.decoder` turns one raw sample (webdataset's dict of member bytes) into an example,
  raising :class:`~lit_vlm.datamodules.transforms.BadSample` with one of its
  :attr:`Corpus.skip_reasons` to skip it;
* :meth:`Corpus.collator` stacks examples into a batch (see :mod:`lit_vlm.datamodules.batch`);
* :attr:`Corpus.manifest_formats` names the dataset folders it reads, :meth:`Corpus.prepare` makes
  a ``root`` ready (the image-text corpus generates the synthetic world there),
  :attr:`Corpus.annotation_kinds` names its evaluation annotation files.

A new kind of data (interleaved documents, video-audio clips) is a new Corpus subclass in a file of
its own; nothing in the DataModule changes.  Decoders and collators run in loader worker
processes, so they must be picklable (plain objects, no lambdas).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lit_vlm.datamodules import manifests
from lit_vlm.errors import UserError

__all__ = ["Corpus", "Split", "is_empty"]

DecodeFn = Callable[[dict[str, Any], torch.Generator], dict[str, Any]]
CollateFn = Callable[[list[dict[str, Any]]], dict[str, Any]]


def is_empty(root: str) -> bool:
    """True when ``root`` has no manifest and holds nothing (a corpus may write its synthetic data there)."""
    path = Path(root)
    return not (path / manifests.MANIFEST).exists() and not (path.is_dir() and any(path.iterdir()))


@dataclass(frozen=True)
class Split:
    """What a corpus is told about the split it decodes.

    Args:
        name: ``"train"``, ``"val"``, ``"test"`` or ``"predict"``.
        train: Training layout (augmented, one view per sample) or evaluation layout.
        root: Dataset folder the shards come from; ``None`` for shards named explicitly.
        entry: The manifest's entry for the split (``{}`` for explicit shards), e.g. its
            ``image_root``.
    """

    name: str
    train: bool
    root: str | None = None
    entry: dict[str, Any] = field(default_factory=dict)


class Corpus:
    """Base class of corpus plug-ins (see the module docstring).

    Subclasses set :attr:`skip_reasons` and implement :meth:`decoder` and :meth:`collator`; the
    rest has defaults that suit a corpus read from shards or from a manifest-described folder.
    """

    #: Reasons this corpus's decoder skips a sample for (the stream adds ``tar_error`` and
    #: ``duplicate_key``); counts are reported for each, zero included.
    skip_reasons: tuple[str, ...] = ()
    #: Manifest formats (``manifest.json`` ``"format"``) this corpus reads; empty: any.
    manifest_formats: tuple[str, ...] = ()
    #: Evaluation annotation kinds -> manifest entry name with a ``{split}`` placeholder.
    annotation_kinds: dict[str, str] = {}

    def decoder(self, split: Split) -> DecodeFn:
        """``decode(raw_sample, generator) -> example``; raises ``BadSample`` to skip."""
        raise NotImplementedError

    def collator(self, split: Split) -> CollateFn:
        """``collate(examples) -> batch``; each example has its ``"__key__"``."""
        raise NotImplementedError

    def check(self, root: str | None) -> None:
        """Check the corpus's settings against the DataModule's ``root`` at construction (before
        any data is read); raise :class:`~lit_vlm.errors.UserError` naming the option."""

    def prepare(self, root: str) -> None:
        """Make ``root`` ready to read (once per node, before any loader): by default it must hold
        a manifest this corpus reads."""
        self.check_root(root, manifests.read_manifest(root))

    def check_root(self, root: str, manifest: dict[str, Any]) -> None:
        """Refuse a dataset folder of a format this corpus does not read."""
        kind = manifest.get("format")
        if self.manifest_formats and kind not in self.manifest_formats:
            raise UserError(
                f"root={root!r} holds a {kind!r} dataset; {type(self).__name__} reads {list(self.manifest_formats)}"
            )

    def describe(self) -> dict[str, Any]:
        """Settings recorded with results (the corpus's class by default)."""
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}"}
