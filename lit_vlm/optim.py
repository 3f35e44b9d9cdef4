"""Optimiser and schedule shared by every family: AdamW with decoupled weight decay applied only to
weight matrices, linear warmup then cosine decay, stepped every optimisation step."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import nn

# Parameters that are embeddings or scalars by role, whatever their rank.
_NO_DECAY_NAME = re.compile(
    r"(^|\.)(logit_scale|logit_bias|class_embedding|cls_token|positional_embedding|pos_embed|"
    r"position_embedding|token_embedding|queries|query_tokens|mask_token)(\.|$)"
)


def param_groups(model: nn.Module, weight_decay: float, lrs: dict[str, float] | None = None) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group (and, with ``lrs``, by
    learning rate: parameters whose name starts with a key of ``lrs`` get its value; the first
    matching key wins).

    No weight decay on: biases and norm weights (ndim < 2), every ``nn.Embedding`` weight, and
    parameters named like embeddings, learned queries or the logit scale/bias (``_NO_DECAY_NAME``),
    as CLIP, open_clip and timm do, and parameters a family marks ``p.no_weight_decay = True`` (a
    frozen LM's output embedding, of which only new rows train: decay would move the others).
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    lrs = lrs or {}
    groups: dict[tuple[bool, str | None], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decayed = not (p.ndim < 2 or id(p) in embedding_params or _NO_DECAY_NAME.search(name)
                       or getattr(p, "no_weight_decay", False))
        prefix = next((k for k in lrs if name.startswith(k)), None)
        groups.setdefault((decayed, prefix), []).append(p)
    out = [{"params": groups.pop((True, None), []), "weight_decay": weight_decay},
           {"params": groups.pop((False, None), []), "weight_decay": 0.0}]
    for (decayed, prefix), params in groups.items():
        out.append({"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr": lrs[prefix]})
    return out


def warmup_cosine(total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0):
    """LambdaLR factor: linear warmup from 0 over ``warmup_steps``, then cosine decay to
    ``min_lr_ratio`` of the base learning rate at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, max(0.0, progress))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_adamw(
    params: Iterable[dict],
    lr: float,
    betas: tuple[float, float],
    eps: float,
) -> torch.optim.AdamW:
    """AdamW over the given parameter groups (each group carries its own weight decay)."""
    return torch.optim.AdamW(list(params), lr=lr, betas=betas, eps=eps)
