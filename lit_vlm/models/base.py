"""What every family shares: the optimiser recipe, starting weights, the default steps and the
logging of named loss terms. Exact gradient accumulation lives in
:mod:`lit_vlm.models.accumulation`, weight reading and loading in :mod:`lit_vlm.weights`.

A family subclasses :class:`VLMModule`, builds its connector and losses from the towers it is given
(dependency injection), passes ``**kwargs`` on to it (the arguments below are declared here once)
and sets ``optim_defaults`` when its paper's recipe differs from the base one. It implements the
capabilities its evaluations need:

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
"""

from __future__ import annotations

import logging
import math
import typing
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import nn

from lit_vlm.datamodules.batch import batch_size as samples_in
from lit_vlm.errors import UserError
from lit_vlm.models.accumulation import ExactAccumulation, concat_features
from lit_vlm.optim import build_adamw, param_groups, warmup_cosine
from lit_vlm.weights import load_init_from, load_state_dict, rename_keys, resolve_init_from

log = logging.getLogger("lit_vlm")


class VLMModule(ExactAccumulation, pl.LightningModule):
    """Base LightningModule of the families.

    Args:
        lr: Peak learning rate of AdamW (reached after warmup). None: the family's
            ``optim_defaults`` (its paper's recipe).
        weight_decay: Decoupled weight decay on weight matrices (none on norms, biases,
            embeddings, learned queries and the logit scale). None: the family's default.
        betas: AdamW betas. None: the family's default.
        eps: AdamW epsilon. None: the family's default.
        warmup_steps: Linear warmup length in optimiser steps; a value in (0, 1) is a fraction
            of the total number of steps.
        min_lr_ratio: Learning rate at the end of the cosine decay, as a fraction of ``lr``.
        accum_freq: Exact gradient accumulation over this many micro-batches for families whose
            loss couples the batch (contrastive losses; see :mod:`lit_vlm.models.accumulation`).
            Use it instead of ``trainer.accumulate_grad_batches``. 1 disables it.
        accum_clip_val: With ``accum_freq > 1``: clip the accumulated gradients to this value once
            per optimiser step (``trainer.gradient_clip_val`` cannot act under manual optimisation;
            ``lit-vlm fit`` moves it here). None: no clipping.
        accum_clip_algorithm: ``"norm"`` (global L2 norm) or ``"value"``, as Lightning's
            ``gradient_clip_algorithm``.
        init_from: Starting weights, loaded when ``fit`` starts (not when resuming from
            ``--ckpt_path``): a lit-vlm checkpoint (``.ckpt``), a run directory (``runs/<name>``,
            ``runs/<name>/version_N`` or its ``checkpoints/``: its best checkpoint), or foreign
            weights (OpenAI / open_clip files, a Hugging Face ``CLIPModel`` directory; see
            :mod:`lit_vlm.weights`).
        init_from_parts: Load only parameters under these attribute names (e.g. ``["vision",
            "image_projection"]`` for the image tower of a CLIP checkpoint); every such parameter
            must be in the checkpoint with the same shape (a learned positional embedding is
            resized for another image size). None loads the whole model, strictly.
        save_frozen: Keep frozen parameters (``requires_grad=False``: a locked tower, a frozen
            language model) in checkpoints. ``False`` leaves out those that came from ``init_from``
            (within ``init_from_parts``) and reads them from there again when a checkpoint loads,
            so checkpoints hold only what trains; ``init_from`` must then stay readable.
    """

    #: The optimiser values a family's paper uses, for the arguments left at None.
    optim_defaults: ClassVar[dict[str, Any]] = dict(lr=5e-4, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)
    #: Old -> new key prefixes of tensors a family renamed; checkpoints that use the old names load.
    renamed_keys: ClassVar[dict[str, str]] = {}
    #: True for families whose loss couples the samples of a batch (contrastive losses): they
    #: implement ``features``/``loss_from_features`` and refuse ``trainer.accumulate_grad_batches``.
    couples_batch: bool = False

    def __init__(
        self,
        lr: float | None = None,
        weight_decay: float | None = None,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        warmup_steps: float = 0.05,
        min_lr_ratio: float = 0.0,
        accum_freq: int = 1,
        init_from: str | None = None,
        init_from_parts: list[str] | None = None,
        accum_clip_val: float | None = None,
        accum_clip_algorithm: str = "norm",
        save_frozen: bool = True,
    ) -> None:
        super().__init__()
        self._save_config()
        given = dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
        optim = {k: self.optim_defaults[k] if v is None else v for k, v in given.items()}
        if optim["lr"] <= 0:
            raise UserError(f"model lr must be > 0, got {optim['lr']}")
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
        self.lr = optim["lr"]
        self.weight_decay = optim["weight_decay"]
        self.betas = tuple(optim["betas"])
        self.eps = optim["eps"]
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.accum_freq = accum_freq
        self.init_from = init_from
        self.init_from_parts = list(init_from_parts) if init_from_parts is not None else None
        if not save_frozen and init_from is None:
            raise UserError("model save_frozen=false re-reads the frozen weights from init_from when a checkpoint loads: set init_from")
        self.save_frozen = save_frozen
        self.automatic_optimization = accum_freq == 1
        self.accum_clip_val = accum_clip_val
        self.accum_clip_algorithm = accum_clip_algorithm
        self._accum_buffer: list[dict] = []

    def _save_config(self) -> None:
        """``save_hyperparameters``, so ``load_from_checkpoint`` and ``lit-vlm test`` rebuild the model.

        Under the CLI, Lightning hands over the parsed config, in which towers are
        ``class_path``/``init_args`` dicts: all of it is saved. Built in Python, the constructor
        arguments annotated as modules (towers, decoders) are left out (pass them again to
        ``load_from_checkpoint``)."""
        modules = [] if _given_hparams() is not None else _module_arguments(type(self))
        self.save_hyperparameters(ignore=modules)

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

    def group_lrs(self) -> dict[str, float]:
        """Learning rates of parameter groups that differ from ``lr``, by name prefix (a family's
        own; e.g. a language model's adapters)."""
        return {}

    def configure_optimizers(self):
        optimizer = build_adamw(param_groups(self, self.weight_decay, self.group_lrs()), self.lr, self.betas, self.eps)
        total = self.num_optimizer_steps()
        warmup = int(self.warmup_steps * total) if 0 < self.warmup_steps < 1 else int(self.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup, self.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _check_trainer(self) -> None:
        """Refuse trainer settings that would silently change a fit's objective or clipping."""
        trainer = self._trainer
        if self.couples_batch and trainer.accumulate_grad_batches != 1:
            k = trainer.accumulate_grad_batches
            raise UserError(
                f"trainer.accumulate_grad_batches={k} would sum {k} separate contrastive losses, each "
                f"seeing only its own micro-batch's negatives; set --model.init_args.accum_freq {k} instead "
                "(exact: one loss over the whole accumulated batch) and leave accumulate_grad_batches at 1"
            )
        if self.accum_clip_val is not None and str(trainer.precision) == "16-mixed":
            raise UserError(
                "model accum_clip_val cannot unscale fp16 gradients before clipping them: "
                "use trainer.precision bf16-mixed, or model accum_clip_val null"
            )

    # ---- starting weights ------------------------------------------------------------------
    def _frozen_from_init(self) -> list[str]:
        """Frozen parameters that ``init_from`` provides (``save_frozen=False`` leaves them out)."""
        parts = self.init_from_parts
        return [name for name, p in self.named_parameters()
                if not p.requires_grad and (parts is None or any(name == q or name.startswith(q + ".") for q in parts))]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.save_frozen:
            return
        keys = self._frozen_from_init()
        for key in keys:
            checkpoint["state_dict"].pop(key, None)
        checkpoint["frozen_weights"] = {"init_from": str(self.init_from), "keys": keys}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints written before a rename (:attr:`renamed_keys`) load under today's names; the
        frozen weights a ``save_frozen=False`` checkpoint left out are read from its ``init_from``."""
        if isinstance(checkpoint.get("state_dict"), dict):
            checkpoint["state_dict"] = rename_keys(checkpoint["state_dict"], self.renamed_keys)
        frozen = checkpoint.get("frozen_weights")
        if frozen:
            source = frozen["init_from"]
            try:
                weights = load_state_dict(source, self)
            except UserError as exc:
                raise UserError(f"this checkpoint left its frozen weights out (save_frozen=false); reading them from "
                                f"init_from={source} failed: {exc}") from exc
            missing = [k for k in frozen["keys"] if k not in weights]
            if missing:
                raise UserError(f"this checkpoint's frozen weights are not in its init_from={source}: {', '.join(missing[:8])}")
            checkpoint["state_dict"].update({k: weights[k] for k in frozen["keys"]})

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if self._trainer is not None:
            self._check_trainer()
        if self.init_from is None:
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
        loaded = load_init_from(self, self.init_from, self.init_from_parts)
        log.info("init_from: loaded %d tensors from %s", len(loaded), self.init_from)
        return loaded

    # ---- default steps: forward(batch) -> named terms ----------------------------------------
    #: Terms logged on the val/test splits (None: every scalar term of ``forward``).
    eval_terms: tuple[str, ...] | None = None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        """``forward(batch)`` gives the named terms (``loss`` among them); log them as ``train/*``.
        Under ``accum_freq > 1`` the micro-batch is buffered (see :meth:`accumulation_step`)."""
        if "sources" in batch:  # a train_mix step: one batch per source, the loss their weighted sum
            return self.mixed_step(batch)
        if not self.automatic_optimization:
            terms = self.accumulation_step(batch)
            if terms is not None:
                self.log_terms("train", terms, batch_size=samples_in(batch) * self.accum_freq)
            return None
        terms = self(batch)
        self.log_terms("train", terms, batch_size=samples_in(batch))
        return terms["loss"]

    def mixed_step(self, batch: dict) -> torch.Tensor:
        """``loss = sum_s w_s loss_s`` over the sources of a ``train_mix`` step; each source's terms
        are logged as ``train/{source}/*``."""
        if not self.automatic_optimization:
            raise UserError("train_mix steps need automatic optimisation: set model accum_freq: 1")
        loss, terms = 0.0, {}
        for name, part in batch["sources"].items():
            own = self(part)
            loss = loss + batch["loss_weights"][name] * own["loss"]
            terms.update({f"{name}/{k}": v for k, v in own.items()})
        self.log_terms("train", {"loss": loss, **terms}, batch_size=sum(samples_in(p) for p in batch["sources"].values()))
        return loss

    def evaluation_step(self, stage: str, batch: dict) -> dict[str, torch.Tensor]:
        """``forward(batch)`` on a val/test batch, its ``eval_terms`` logged (averaged over ranks)."""
        terms = self(batch)
        keep = terms if self.eval_terms is None else {k: terms[k] for k in self.eval_terms if k in terms}
        self.log_terms(stage, keep, samples_in(batch), sync_dist=True)
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
def _given_hparams() -> dict | None:
    """The config LightningCLI is instantiating this module from, if any."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - older/newer Lightning: fall back to ignoring modules
        return None
    return _given_hyperparameters.get()




def _module_arguments(cls: type) -> list[str]:
    """The constructor arguments of ``cls`` (and of the classes it passes ``**kwargs`` to) annotated
    as ``nn.Module`` subclasses, or as a union of them (``VisionTransformer | ConvNet``)."""

    def is_module(hint: object) -> bool:
        options = typing.get_args(hint) or (hint,)
        return any(isinstance(h, type) and issubclass(h, nn.Module) for h in options)

    names = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # noqa: BLE001 - an annotation that does not resolve is not a module
            continue
        names += [n for n, h in hints.items() if is_module(h)]
    return sorted(set(names))


__all__ = ["VLMModule", "concat_features", "load_state_dict", "resolve_init_from"]  # the last three: re-exported
