"""Exact gradient accumulation for losses that couple the samples of a batch (``accum_freq``).

A contrastive loss scores every sample against all others of the batch, so Lightning's
``accumulate_grad_batches`` (k separate losses over k micro-batches) changes the objective: each
loss only sees the negatives of its own micro-batch. A family whose loss couples the batch
(``couples_batch = True``) implements ``features(batch) -> dict of tensors`` and
``loss_from_features(features, gather, detach_scalars) -> terms``; with ``accum_freq = k > 1`` the
module switches to manual optimisation and does what open_clip's ``--accum-freq`` and GradCache
(Gao et al., 2021) do: buffer k micro-batches, compute all their features without gradients, then
for each micro-batch recompute its features with gradients, splice them into the cached set, compute
the loss of the whole accumulated batch and backpropagate. The summed gradients equal those of one
batch k times larger (tests/test_contrastive_family.py checks it to 1e-5), at the memory cost of one
micro-batch plus the cached features. Details that keep it exact:

- random state (patch dropout, dropout) is recorded before each micro-batch's first pass and
  restored for its replay, so both passes see the same masks;
- parameters the loss uses directly (logit scale and bias) receive their gradient once, from the
  last replay (open_clip's loop counts it k times);
- under DDP only the last replay synchronises gradients (``block_backward_sync``).

One optimiser step, one scheduler step and gradient clipping follow each group of k micro-batches;
an incomplete group at the end of an epoch is dropped, as in open_clip. Lightning cannot clip under
manual optimisation, so the clipping is the module's ``accum_clip_val``: ``lit-vlm fit`` moves
``trainer.gradient_clip_val`` there when ``accum_freq > 1`` (the same clipping, applied once per
accumulated step); in Python, set ``accum_clip_val`` and leave ``Trainer(gradient_clip_val=None)``
(Lightning refuses trainer clipping under manual optimisation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch

log = logging.getLogger("lit_vlm")


class ExactAccumulation:
    """Mixed into :class:`~lit_vlm.models.base.VLMModule` (a LightningModule): GradCache-style
    accumulation over ``self.accum_freq`` micro-batches for families with ``couples_batch``."""

    def features(self, batch: dict) -> dict[str, torch.Tensor | None]:
        """Per-sample features the loss needs (tensors with the batch on dim 0)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement features()")

    def loss_from_features(
        self, features: dict[str, torch.Tensor | None], gather: bool = True, detach_scalars: bool = False
    ) -> dict[str, torch.Tensor]:
        """Loss terms of a (possibly accumulated) batch of features; ``detach_scalars`` stops the
        gradient to parameters the loss uses directly (e.g. the logit scale)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement loss_from_features()")

    def accumulated_backward(
        self,
        micro_batches: list[dict],
        backward: Callable[[torch.Tensor], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Backpropagate the loss of the concatenation of ``micro_batches`` one micro-batch at a
        time (GradCache); gradients accumulate in ``.grad`` exactly as if the whole batch had been
        one. Returns the loss terms of the whole batch.

        Args:
            micro_batches: The batches to accumulate (each as ``training_step`` receives it).
            backward: Called with each replay's loss; default ``manual_backward`` (Lightning), or
                e.g. ``torch.Tensor.backward`` outside a trainer.
        """
        backward = backward or self.manual_backward
        k = len(micro_batches)
        states, cached = [], []
        with torch.no_grad():
            for batch in micro_batches:
                states.append(_RngState(self.device))
                cached.append(self.features(batch))
        terms: dict[str, torch.Tensor] = {}
        for j, batch in enumerate(micro_batches):
            states[j].restore()
            with self._backward_sync(last=j == k - 1):
                live = self.features(batch)  # this micro-batch, with gradients
                feats = concat_features(cached[:j] + [live] + cached[j + 1 :])
                terms = self.loss_from_features(feats, gather=True, detach_scalars=j < k - 1)
                backward(terms["loss"])
        return terms

    @contextmanager
    def _backward_sync(self, last: bool) -> Iterator[None]:
        """Under DDP, let only the last replay synchronise gradients."""
        strategy = getattr(self._trainer, "strategy", None)
        block = getattr(strategy, "block_backward_sync", None)
        with nullcontext() if last or block is None else block():
            yield

    def accumulation_step(self, batch: dict) -> dict[str, torch.Tensor] | None:
        """``training_step`` under ``accum_freq > 1``: buffer the micro-batch; on the k-th, run
        :meth:`accumulated_backward`, clip, step the optimiser and the scheduler. Returns the
        loss terms on an optimiser step, else None."""
        self._accum_buffer.append(batch)
        if len(self._accum_buffer) < self.accum_freq:
            return None
        micro_batches, self._accum_buffer = self._accum_buffer, []
        optimizer = self.optimizers()
        optimizer.zero_grad()
        terms = self.accumulated_backward(micro_batches)
        if self.accum_clip_val is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.accum_clip_val, gradient_clip_algorithm=self.accum_clip_algorithm
            )
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return terms

    def on_train_epoch_start(self) -> None:
        if self._accum_buffer:
            log.info(
                "accum_freq=%d: dropped the %d micro-batch(es) left at the end of the epoch (an incomplete group)",
                self.accum_freq,
                len(self._accum_buffer),
            )
        self._accum_buffer = []


class _RngState:
    """The CPU (and current CUDA device's) random state, to replay a forward pass exactly."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def concat_features(parts: list[dict[str, torch.Tensor | None]]) -> dict[str, torch.Tensor | None]:
    """Concatenate per-micro-batch feature dicts along dim 0.

    Tensors whose dim 1 differs between parts (token features [B, L, E] and masks [B, L] of texts
    trimmed to each micro-batch's longest caption) are zero-padded (False for masks) on dim 1 first.
    """
    out: dict[str, torch.Tensor | None] = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        if values[0] is None:
            out[key] = None
            continue
        if values[0].dim() >= 2:
            width = max(v.shape[1] for v in values)
            values = [
                v if v.shape[1] == width else torch.cat([v, v.new_zeros(v.shape[0], width - v.shape[1], *v.shape[2:])], 1)
                for v in values
            ]  # each [b, width, ...]
        out[key] = torch.cat(values, dim=0)  # [sum b, ...]
    return out
