"""Video-ChatGPT (Maaz et al., 2024): video conversation through a frozen image tower and a frozen LM.

Each frame goes through the frozen image tower; its patch features are pooled two ways:

    frames [N, T, 3, H, W] -> tower -> patches [N, T, P, D]
    temporal features: mean over the T frames of each patch    [N, P, D]
    spatial features:  mean over the P patches of each frame   [N, T, D]
    video tokens = projector([temporal; spatial])              [N, P + T, D_lm]

and the video tokens take the place of ``<image>`` in the conversation, as LLaVA's image tokens do
(Video-ChatGPT trains only the linear projector, on video instruction data; the LM stays frozen).
Training, generation and the LM handling are :class:`~lit_vlm.models.llava.LLaVA`'s: a batch's
``video`` (with ``video_mask``) replaces its ``image``; ``generate(videos, prompts)`` answers about
clips ``[B, C, T, 3, H, W]`` (all frames taken as real), so ``VQAEvaluation(modality: video)``
measures video QA.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lit_vlm.models.llava import LLaVA


class VideoChat(LLaVA):
    """Video-ChatGPT over a lit-vlm image tower and a local Hugging Face causal LM.

    Arguments are :class:`~lit_vlm.models.llava.LLaVA`'s (``vision``, ``projector`` -- Video-ChatGPT:
    ``linear`` --, ``language_model``, ``train_lm``, ...); ``pool_grid`` pools each frame's patch
    grid first (fewer temporal tokens).
    """

    def __init__(self, *args: Any, projector: str = "linear", **kwargs: Any) -> None:
        super().__init__(*args, projector=projector, **kwargs)

    def image_tokens(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        """Clips [N, C, T, 3, H, W] (frames of all C clips taken together; ``mask`` [N, C, T] marks
        the real ones) -> video tokens [N, P + C*T, D_lm]; images [N, 3, H, W] -> LLaVA's tokens."""
        if images.dim() != 6:
            return super().image_tokens(images)
        n, c, t = images.shape[:3]
        with torch.set_grad_enabled(self.train_vision and torch.is_grad_enabled()):
            _, tokens = self.vision_tokens(images.flatten(0, 2))  # [N*C*T, P, D]
        patches = tokens.view(n, c * t, *tokens.shape[1:])  # [N, F, P, D]
        real = (mask.reshape(n, c * t) if mask is not None else torch.ones(n, c * t, dtype=torch.bool, device=images.device))
        weights = real.to(patches.dtype)[..., None, None]  # [N, F, 1, 1]
        temporal = (patches * weights).sum(1) / weights.sum(1).clamp_min(1)  # [N, P, D]
        spatial = patches.mean(2) * real.to(patches.dtype)[..., None]  # [N, F, D] (padding frames zero)
        return self.projector(torch.cat([temporal, spatial], dim=1))  # [N, P + F, D_lm]

    def media_tokens(self, batch: dict, has_image: Tensor) -> Tensor:
        """The clips' video tokens (a batch without ``video`` is LLaVA's image batch)."""
        if "video" not in batch:
            return super().media_tokens(batch, has_image)
        mask = batch["video_mask"][has_image] if "video_mask" in batch else None
        return self.image_tokens(batch["video"][has_image], mask)  # [N, P + C*T, D_lm]


__all__ = ["VideoChat"]
