"""What every family shares: the optimiser recipe and the logging of named loss terms.

A family subclasses :class:`VLMModule`, builds its connector and losses from the towers it is given
(dependency injection), and implements the capabilities its evaluations need:

- ``encode_image(images) -> [B, D]`` and ``encode_text(ids, mask) -> [N, D]`` (normalised):
  retrieval and zero-shot classification callbacks;
- later: ``score_pairs`` (ITM re-ranking) and ``generate(images, prompts)`` (captioning, VQA).
"""

from __future__ import annotations

import inspect

import lightning.pytorch as pl
import torch
from torch import nn

from lit_vlm.optim import build_adamw, param_groups, warmup_cosine


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
    """

    def __init__(
        self,
        lr: float = 5e-4,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: float = 0.05,
        min_lr_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"model lr must be > 0, got {lr}")
        if warmup_steps < 0:
            raise ValueError(f"model warmup_steps must be >= 0, got {warmup_steps}")
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.eps = eps
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio

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

    def configure_optimizers(self):
        optimizer = build_adamw(param_groups(self, self.weight_decay), self.lr, self.betas, self.eps)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup_steps * total) if 0 < self.warmup_steps < 1 else int(self.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup, self.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def log_terms(self, stage: str, terms: dict[str, torch.Tensor], batch_size: int, **kwargs) -> None:
        """Log every named term as ``{stage}/{name}``; ``loss`` also on the progress bar."""
        on_step = stage == "train"
        for name, value in terms.items():
            self.log(
                f"{stage}/{name}",
                value.detach() if torch.is_tensor(value) else value,
                prog_bar=name == "loss",
                on_step=on_step,
                on_epoch=not on_step,
                batch_size=batch_size,
                **kwargs,
            )


def _given_hparams() -> dict | None:
    """The config LightningCLI is instantiating this module from, if any."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - older/newer Lightning: fall back to ignoring modules
        return None
    return _given_hyperparameters.get()
