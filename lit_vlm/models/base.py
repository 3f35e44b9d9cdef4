"""What every family shares: the optimiser recipe, the logging of named loss terms, starting
weights from a checkpoint, and exact gradient accumulation for losses that couple the samples of a
batch.

A family subclasses :class:`VLMModule`, builds its connector and losses from the towers it is given
(dependency injection), and implements the capabilities its evaluations need:

- ``encode_image(images) -> [B, D]`` and ``encode_text(ids, mask) -> [N, D]`` (normalised):
  retrieval and zero-shot classification callbacks;
- optionally ``encode_image_tokens(images) -> (tokens [B, P, E], mask [B, P] | None)``,
  ``encode_text_tokens(ids, mask) -> (tokens [N, L, E], mask [N, L])`` and
  ``similarity(image_tokens, image_mask, text_tokens, text_mask) -> (sim_i2t [I, T], sim_t2i [I, T])``
  (or one ``[I, T]`` matrix for both directions): the retrieval callback then ranks with the
  family's own similarity (FILIP's token-wise late interaction) instead of a dot product;
- ``pair_features(images)`` + ``score_pairs(features, ids, mask) -> [N]`` (ITM re-ranking of
  retrieval; BLIP, FLAVA) and ``generate(images, prompts, max_new_tokens) -> list[str]``
  (captioning, VQA; the families mix in :class:`lit_vlm.models.generating.GeneratingMixin`, which
  also gives ``score_answers`` for VQA by ranking).

Contrastive gradient accumulation (``accum_freq``)
-------------------------------------------------
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
accumulated step); a Python ``Trainer(gradient_clip_val=...)`` with ``accum_freq > 1`` is an error
that names ``accum_clip_val``.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import lightning.pytorch as pl
import torch
from torch import nn

from lit_vlm.errors import UserError
from lit_vlm.optim import build_adamw, param_groups, warmup_cosine
from lit_vlm.weights import load_state_dict, read_weights, resolve_init_from

log = logging.getLogger("lit_vlm")


class VLMModule(pl.LightningModule):
    """Base LightningModule of the families.

    Args:
        lr: Peak learning rate of AdamW (reached after warmup).
        weight_decay: Decoupled weight decay on weight matrices (none on norms, biases,
            embeddings, learned queries and the logit scale).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: Linear warmup length in optimiser steps; a value in (0, 1) is a fraction
            of the total number of steps.
        min_lr_ratio: Learning rate at the end of the cosine decay, as a fraction of ``lr``.
        accum_freq: Exact gradient accumulation over this many micro-batches (families whose loss
            couples the batch; see the module docstring). 1 disables it.
        accum_clip_val: With ``accum_freq > 1``: clip the accumulated gradients to this value once
            per optimiser step (``trainer.gradient_clip_val`` cannot act under manual optimisation;
            ``lit-vlm fit`` moves it here). None: no clipping.
        accum_clip_algorithm: ``"norm"`` (global L2 norm) or ``"value"``, as Lightning's
            ``gradient_clip_algorithm``.
        init_from: Starting weights, loaded when ``fit`` starts (not when resuming from
            ``--ckpt_path``): a lit-vlm Lightning checkpoint (``.ckpt``), a file holding a plain
            state dict, or a run directory (``runs/<name>``, ``runs/<name>/version_N`` or its
            ``checkpoints/``), whose ``checkpoints/index.json`` names the best checkpoint (the
            newest version when several). Foreign formats (OpenAI, open_clip, Hugging Face) go
            through :mod:`lit_vlm.interop`.
        init_from_parts: Load only parameters under these attribute names (e.g. ``["vision",
            "image_projection"]`` for the image tower of a CLIP checkpoint); every such parameter
            must be in the checkpoint with the same shape (a learned positional embedding is
            resized for another image size). None loads the whole model, strictly.
    """

    #: True for families whose loss couples the samples of a batch (contrastive losses): they
    #: implement ``features``/``loss_from_features`` and refuse ``trainer.accumulate_grad_batches``.
    couples_batch: bool = False

    def __init__(
        self,
        lr: float = 5e-4,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: float = 0.05,
        min_lr_ratio: float = 0.0,
        accum_freq: int = 1,
        init_from: str | None = None,
        init_from_parts: list[str] | None = None,
        accum_clip_val: float | None = None,
        accum_clip_algorithm: str = "norm",
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise UserError(f"model lr must be > 0, got {lr}")
        if warmup_steps < 0:
            raise UserError(f"model warmup_steps must be >= 0, got {warmup_steps}")
        if not isinstance(accum_freq, int) or isinstance(accum_freq, bool) or accum_freq < 1:
            raise UserError(f"model accum_freq must be an integer >= 1, got {accum_freq!r}")
        if accum_freq > 1 and not self.couples_batch:
            raise UserError(
                f"model accum_freq={accum_freq}: {type(self).__name__} has no batch-coupled loss; "
                "use trainer.accumulate_grad_batches for it"
            )
        if accum_clip_val is not None and not accum_clip_val > 0:
            raise UserError(f"model accum_clip_val must be None or > 0, got {accum_clip_val!r}")
        if accum_clip_algorithm not in ("norm", "value"):
            raise UserError(f"model accum_clip_algorithm must be 'norm' or 'value', got {accum_clip_algorithm!r}")
        if accum_clip_val is not None and accum_freq == 1:
            raise UserError(
                "model accum_clip_val only acts with accum_freq > 1; with accum_freq=1 clip with trainer.gradient_clip_val"
            )
        if init_from_parts is not None and (not init_from_parts or any(not str(p) for p in init_from_parts)):
            raise UserError(f"model init_from_parts must be None or a non-empty list of names, got {init_from_parts!r}")
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.eps = eps
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.accum_freq = accum_freq
        self.init_from = init_from
        self.init_from_parts = list(init_from_parts) if init_from_parts is not None else None
        self.automatic_optimization = accum_freq == 1
        self.accum_clip_val = accum_clip_val
        self.accum_clip_algorithm = accum_clip_algorithm
        self._accum_buffer: list[dict] = []

    def save_config(self) -> None:
        """``save_hyperparameters`` for families that receive built towers.

        Under the CLI, Lightning hands over the parsed config, in which towers are
        ``class_path``/``init_args`` dicts: all of it is saved, so ``load_from_checkpoint`` and
        ``lit-vlm test`` rebuild the model alone. Built in Python, the tower objects themselves are
        not saved (pass them again to ``load_from_checkpoint``).
        """
        frame = inspect.currentframe().f_back
        given = _given_hparams()
        modules = [k for k, v in frame.f_locals.items() if isinstance(v, nn.Module) and k != "self"]
        self.save_hyperparameters(ignore=[] if given else modules, frame=frame)

    # ---- optimisation ------------------------------------------------------------------------
    def num_optimizer_steps(self) -> int:
        """Optimiser steps of this fit: the trainer's estimate, divided by ``accum_freq`` (whole
        groups per epoch) when accumulating, capped by ``trainer.max_steps``."""
        trainer = self.trainer
        total = trainer.estimated_stepping_batches  # also sets up the train dataloader
        if self.accum_freq > 1 and trainer.max_epochs not in (None, -1) and trainer.num_training_batches != math.inf:
            total = (int(trainer.num_training_batches) // self.accum_freq) * max(1, trainer.max_epochs)
            if trainer.max_steps not in (None, -1):
                total = min(total, trainer.max_steps)
        if total in (math.inf, -1):
            raise UserError("cannot size the learning-rate schedule of an endless fit: set trainer.max_steps")
        return max(1, int(total))

    def configure_optimizers(self):
        optimizer = build_adamw(param_groups(self, self.weight_decay), self.lr, self.betas, self.eps)
        total = self.num_optimizer_steps()
        warmup = int(self.warmup_steps * total) if 0 < self.warmup_steps < 1 else int(self.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup, self.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self) -> list:
        """Checks the trainer before a fit (this hook runs before Lightning validates the loops).

        - A family with a batch-coupled loss refuses ``trainer.accumulate_grad_batches > 1`` and
          points to ``accum_freq``.
        - With ``accum_freq > 1`` (manual optimisation) ``trainer.gradient_clip_val`` must be
          unset (Lightning cannot clip manual steps): the clipping is ``accum_clip_val``.
        """
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit":
            return []
        if self.couples_batch and trainer.accumulate_grad_batches != 1:
            k = trainer.accumulate_grad_batches
            raise UserError(
                f"trainer.accumulate_grad_batches={k} would sum {k} separate contrastive losses, each "
                f"seeing only its own micro-batch's negatives; set --model.init_args.accum_freq {k} instead "
                "(exact: one loss over the whole accumulated batch) and leave accumulate_grad_batches at 1"
            )
        if self.accum_freq > 1 and trainer.gradient_clip_val:
            raise UserError(
                f"trainer.gradient_clip_val={trainer.gradient_clip_val} cannot act with model accum_freq="
                f"{self.accum_freq} (manual optimisation): set model accum_clip_val={trainer.gradient_clip_val} "
                "instead (one clip per accumulated step) and trainer.gradient_clip_val null; lit-vlm fit does this itself"
            )
        if self.accum_clip_val is not None and str(trainer.precision) == "16-mixed":
            raise UserError(
                "model accum_clip_val cannot unscale fp16 gradients before clipping them: "
                "use trainer.precision bf16-mixed, or model accum_clip_val null"
            )
        return []

    # ---- exact accumulation for batch-coupled losses ---------------------------------------
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

    # ---- starting weights ------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit" or self.init_from is None:
            return
        if self._trainer is not None and self._trainer.ckpt_path is not None:
            log.info("init_from=%s not loaded: resuming from %s", self.init_from, self._trainer.ckpt_path)
            return
        self.load_initial_weights()

    def load_initial_weights(self) -> list[str]:
        """Load ``init_from`` (restricted to ``init_from_parts``) into the module; returns the
        names of the loaded tensors. Called when ``fit`` starts; callable by hand."""
        if self.init_from is None:
            raise UserError("model init_from is not set")
        source, layout = read_weights(self.init_from, model=self)
        loaded = self._load_parts(source, layout)
        log.info("init_from: loaded %d tensors from %s", len(loaded), layout)
        return loaded

    def _load_parts(self, source: dict[str, torch.Tensor], layout: str) -> list[str]:
        """Copy ``source`` into the module (all of it, or the ``init_from_parts``), or raise one
        paragraph naming the layout it was read as and every key and shape that disagrees."""
        own = self.state_dict()
        if self.init_from_parts is None:
            wanted = list(own)
            unexpected = sorted(set(source) - set(own))
        else:
            for part in self.init_from_parts:
                if not any(k == part or k.startswith(part + ".") for k in own):
                    raise UserError(f"model init_from_parts: {type(self).__name__} has no part named {part!r}")
            wanted = [k for k in own if any(k == p or k.startswith(p + ".") for p in self.init_from_parts)]
            unexpected = []
        missing = [k for k in wanted if k not in source]
        update, mismatched = {}, []
        for key in (k for k in wanted if k in source):
            value = source[key]
            if value.shape != own[key].shape:
                value = self._adapt(key, value, own[key])
            if value.shape != own[key].shape:
                mismatched.append(f"{key}: checkpoint {list(value.shape)} vs model {list(own[key].shape)}")
            update[key] = value
        problems = [
            f"{len(items)} {what} ({', '.join(items[:8])}{f' and {len(items) - 8} more' if len(items) > 8 else ''})"
            for what, items in (("key(s) missing from the checkpoint", missing),
                                ("unexpected key(s) in the checkpoint", unexpected), ("shape mismatch(es)", mismatched))
            if items
        ]
        if problems:
            hint = " Set init_from_parts to load only some parts (e.g. [vision])." if unexpected and not missing and not mismatched else ""
            raise UserError(
                f"model init_from={self.init_from}: read as {layout}, it does not fit {type(self).__name__}: "
                + "; ".join(problems) + "." + hint
            )
        with torch.no_grad():
            for key, value in update.items():
                own[key].copy_(value)
        return list(update)

    def _adapt(self, key: str, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """A ViT's learned positions [1 + N, D] resized to this model's grid (another image size)."""
        from lit_vlm.modules.vision import VisionTransformer, interpolate_pos_embed

        owner_name, _, attr = key.rpartition(".")
        owner = self.get_submodule(owner_name) if owner_name else self
        if isinstance(owner, VisionTransformer) and attr == "positional_embedding" and value.dim() == 2:
            if value.shape[1] == target.shape[1]:
                try:
                    return interpolate_pos_embed(value, owner.grid_size)  # [1 + N', D]
                except ValueError:
                    return value
        return value

    # ---- default steps: forward(batch) -> named terms ----------------------------------------
    #: Terms logged on the val/test splits (None: every scalar term of ``forward``).
    eval_terms: tuple[str, ...] | None = None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        """``forward(batch)`` gives the named terms (``loss`` among them); log them as ``train/*``.
        Under ``accum_freq > 1`` the micro-batch is buffered (see :meth:`accumulation_step`)."""
        if not self.automatic_optimization:
            terms = self.accumulation_step(batch)
            if terms is not None:
                self.log_terms("train", terms, batch_size=batch["image"].shape[0] * self.accum_freq)
            return None
        terms = self(batch)
        self.log_terms("train", terms, batch_size=batch["image"].shape[0])
        return terms["loss"]

    def evaluation_step(self, stage: str, batch: dict) -> dict[str, torch.Tensor]:
        """``forward(batch)`` on a val/test batch, its ``eval_terms`` logged (averaged over ranks)."""
        terms = self(batch)
        keep = terms if self.eval_terms is None else {k: terms[k] for k in self.eval_terms if k in terms}
        self.log_terms(stage, keep, batch["image"].shape[0], sync_dist=True)
        return terms

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluation_step("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluation_step("test", batch)

    # ---- logging -----------------------------------------------------------------------------
    def log_terms(self, stage: str, terms: dict[str, torch.Tensor], batch_size: int, **kwargs) -> None:
        """Log every named scalar term as ``{stage}/{name}``; ``loss`` also on the progress bar."""
        on_step = stage == "train"
        for name, value in terms.items():
            if torch.is_tensor(value) and value.numel() != 1:
                continue
            self.log(
                f"{stage}/{name}",
                value.detach() if torch.is_tensor(value) else value,
                prog_bar=name == "loss",
                on_step=on_step,
                on_epoch=not on_step,
                batch_size=batch_size,
                **kwargs,
            )


# ---- helpers -----------------------------------------------------------------------------------
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


def _given_hparams() -> dict | None:
    """The config LightningCLI is instantiating this module from, if any."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - older/newer Lightning: fall back to ignoring modules
        return None
    return _given_hyperparameters.get()


__all__ = ["VLMModule", "concat_features", "load_state_dict", "resolve_init_from"]  # the last two: lit_vlm.weights
