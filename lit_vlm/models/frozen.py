"""Frozen (Tsimpoukelli et al., 2021): a vision encoder trained into the prompt of a frozen LM.

The image tower is *trained* (the paper: an NF-ResNet from scratch) and its pooled output is
linearly mapped to ``prefix_length`` embeddings (the paper: 2) of a frozen language model, which
reads them before the caption; only the vision side learns, from the LM's next-token loss:

    prefix = W . vision(image)   [B, K, D_lm]
    frozen LM([prefix, bos, w_1 .. w_n]) -> loss on w_1 .. eos
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lit_vlm.errors import UserError
from lit_vlm.models.bridge import Bridge
from lit_vlm.modules import ConvNet, VisionTransformer


class Frozen(Bridge):
    """Frozen over a lit-vlm image tower (trained) and a local Hugging Face causal LM (frozen).

    Args:
        vision: The image tower; it trains (start it from a CLIP run's through ``init_from`` to
            shorten training, or from scratch as the paper).
        prefix_length: K, the number of visual prefix embeddings (the paper: 2).
        **kwargs: :class:`~lit_vlm.models.bridge.Bridge`'s and :class:`~lit_vlm.models.base.VLMModule`'s
            arguments (the LM stays frozen: ``train_lm`` must be ``frozen``).

    This family's optimiser defaults: lr=3e-4 (the paper's Adam, 3e-4), weight_decay=0.0,
    betas=(0.9, 0.95), eps=1e-8.
    """

    optim_defaults = dict(lr=3e-4, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    eval_terms = ("loss",)

    def __init__(self, vision: VisionTransformer | ConvNet, prefix_length: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.train_lm != "frozen":
            raise UserError(f"Frozen keeps its language model frozen (the method's point); got train_lm={self.train_lm!r}")
        if prefix_length < 1:
            raise UserError(f"model prefix_length must be >= 1, got {prefix_length}")
        self.vision = vision
        self.to_prefix = nn.Linear(vision.width, prefix_length * self.lm.width)
        self.prefix_length = int(prefix_length)

    def prefix(self, images: Tensor) -> tuple[Tensor, None]:
        pooled = self.vision(images).pooled  # [B, Dv]
        return self.to_prefix(pooled).view(images.shape[0], self.prefix_length, -1), None  # [B, K, D_lm]


__all__ = ["Frozen"]
