"""ClipCap (Mokady et al., 2021): a CLIP image embedding mapped to a prefix of a language model.

The frozen image tower's pooled embedding goes through a mapping network to ``prefix_length``
embeddings in the LM's space, put before the caption; the LM's next-token loss on the caption
trains the mapping (and the LM, when it is tuned):

    prefix = F(clip(image))      [B, K, D_lm]
    LM([prefix, bos, w_1 .. w_n])  -> loss on w_1 .. eos

Mapping networks, as the paper's two variants: ``mlp`` (Linear, Tanh, Linear to K x D_lm; the
paper tunes GPT-2 with it) and ``transformer`` (the embedding projected to ``clip_length`` tokens,
learned prefix constants beside them, a small transformer; its outputs at the constants are the
prefix; the paper keeps GPT-2 frozen with it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lit_vlm.errors import UserError
from lit_vlm.models.bridge import Bridge
from lit_vlm.modules import ConvNet, Transformer, VisionTransformer
from lit_vlm.modules.freeze import lock

MAPPINGS = ("mlp", "transformer")


class TransformerMapper(nn.Module):
    """ClipCap's transformer mapping: [clip tokens, prefix constants] -> the constants' outputs."""

    def __init__(self, in_width: int, width: int, prefix_length: int, clip_length: int, layers: int, heads: int) -> None:
        super().__init__()
        self.clip_length = clip_length
        self.project = nn.Linear(in_width, clip_length * width)
        self.constants = nn.Parameter(torch.randn(prefix_length, width) * width**-0.5)
        self.transformer = Transformer(width, layers, heads)

    def forward(self, x: Tensor) -> Tensor:  # [B, Dv] -> [B, K, D]
        B = x.shape[0]
        clip = self.project(x).view(B, self.clip_length, -1)  # [B, C, D]
        seq = torch.cat([clip, self.constants.expand(B, -1, -1)], dim=1)  # [B, C + K, D]
        out, _ = self.transformer(seq)
        return out[:, self.clip_length :]  # [B, K, D]


class ClipCap(Bridge):
    """ClipCap over a lit-vlm image tower and a local Hugging Face causal LM (see the module docstring).

    Args:
        vision: The image tower (frozen; usually a CLIP run's, through ``init_from``).
        prefix_length: K, the number of prefix embeddings (the paper: 10 with the MLP, 40 with the
            transformer).
        mapping: ``mlp`` or ``transformer``.
        clip_length: Tokens the embedding is projected to before the transformer mapping.
        mapping_layers: Layers of the transformer mapping (the paper: 8).
        mapping_heads: Its attention heads.
        **kwargs: :class:`~lit_vlm.models.bridge.Bridge`'s (``language_model``, ``train_lm``: the
            paper tunes the LM with ``mlp``) and :class:`~lit_vlm.models.base.VLMModule`'s arguments.

    This family's optimiser defaults: lr=2e-5 x 10 (the paper's 2e-5 is for GPT-2 tuned; a frozen
    small LM wants more): lr=2e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8.
    """

    optim_defaults = dict(lr=2e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    eval_terms = ("loss",)

    def __init__(
        self,
        vision: VisionTransformer | ConvNet,
        prefix_length: int = 10,
        mapping: str = "mlp",
        clip_length: int = 10,
        mapping_layers: int = 8,
        mapping_heads: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if mapping not in MAPPINGS:
            raise UserError(f"model mapping must be one of {MAPPINGS}, got {mapping!r}")
        if prefix_length < 1:
            raise UserError(f"model prefix_length must be >= 1, got {prefix_length}")
        self.vision = vision
        lock(self.vision)
        width, k = self.lm.width, int(prefix_length)
        if mapping == "mlp":
            self.mapper = nn.Sequential(nn.Linear(vision.width, k * width // 2), nn.Tanh(), nn.Linear(k * width // 2, k * width))
        else:
            heads = mapping_heads if width % mapping_heads == 0 else 1
            self.mapper = TransformerMapper(vision.width, width, k, clip_length, mapping_layers, heads)
        self.prefix_length = k

    def prefix(self, images: Tensor) -> tuple[Tensor, None]:
        with torch.no_grad():
            pooled = self.vision(images).pooled  # [B, Dv]
        return self.mapper(pooled).view(images.shape[0], self.prefix_length, -1), None  # [B, K, D_lm]


__all__ = ["ClipCap", "TransformerMapper"]
