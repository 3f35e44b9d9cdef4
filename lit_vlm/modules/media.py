"""Encoders of the time-based modalities: a ViT on log-mel spectrograms (ImageBind's audio encoder,
sizes as options) and a temporal head over an image tower's per-frame features (frame averaging,
or a small transformer over the frames as CLIP4Clip's ``seqTransf``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_vlm.errors import UserError
from lit_vlm.modules.transformer import Transformer

__all__ = ["AudioOutput", "AudioTransformer", "TemporalHead"]


@dataclass
class AudioOutput:
    pooled: Tensor  # [B, D] the class token after the final LayerNorm
    tokens: Tensor  # [B, 1 + P, D]


class AudioTransformer(nn.Module):
    """ViT on spectrograms: ``[B, 1, M, F]`` -> class token ``[B, D]``. Patches of
    ``patch_size`` x ``patch_size`` every ``patch_stride`` bins and frames (ImageBind: 16 every
    10, overlapping), learned positions, pre-LN blocks.

    Args:
        num_mel_bins: M, the spectrogram's height (the data's; ``lit-vlm`` fills it).
        target_frames: F, its width (the data's ``audio.target_frames``; ``lit-vlm`` fills it).
        patch_size: Patch side.
        patch_stride: Step between patches (< ``patch_size``: overlapping patches).
        width: Transformer width D.
        layers: Transformer blocks.
        heads: Attention heads.
        mlp_ratio: MLP width as a multiple of D.
    """

    def __init__(self, num_mel_bins: int | None = None, target_frames: int | None = None, patch_size: int = 16,
                 patch_stride: int = 16, width: int = 128, layers: int = 4, heads: int = 4, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if num_mel_bins is None or target_frames is None:
            raise UserError("AudioTransformer needs num_mel_bins and target_frames (lit-vlm fills them from the data's "
                            "audio front end)")
        if patch_size > min(num_mel_bins, target_frames) or patch_stride < 1:
            raise UserError(f"AudioTransformer: patch_size {patch_size} must fit in {num_mel_bins} x {target_frames} "
                            "and patch_stride must be >= 1")
        self.width = width
        self.grid = ((num_mel_bins - patch_size) // patch_stride + 1, (target_frames - patch_size) // patch_stride + 1)
        self.patch = nn.Conv2d(1, width, kernel_size=patch_size, stride=patch_stride, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(1 + self.grid[0] * self.grid[1], width) * 0.02)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio)
        self.ln_post = nn.LayerNorm(width)

    def forward(self, spectrogram: Tensor) -> AudioOutput:
        x = self.patch(spectrogram).flatten(2).transpose(1, 2)  # [B, P, D]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # [B, 1, D]
        x = self.ln_pre(torch.cat([cls, x], 1) + self.positional_embedding)  # [B, 1 + P, D]
        x, _ = self.transformer(x)  # [B, 1 + P, D]
        x = self.ln_post(x)
        return AudioOutput(pooled=x[:, 0], tokens=x)


class TemporalHead(nn.Module):
    """Per-frame features ``[N, T, W]`` with their mask ``[N, T]`` -> one feature per clip ``[N, W]``.

    ``mode="mean"``: the mean of the real frames (ImageBind and CLIP4Clip's ``meanP``);
    ``mode="transformer"``: learned frame positions and ``layers`` pre-LN blocks over the frames
    (padding masked out), added to the input (a residual, so it starts near the mean), then the
    masked mean (CLIP4Clip's ``seqTransf``).

    Args:
        width: Feature width W (the image tower's).
        mode: ``mean`` or ``transformer``.
        max_frames: Longest clip the positions cover.
        layers: Blocks of the temporal transformer.
        heads: Its attention heads.
    """

    def __init__(self, width: int, mode: str = "transformer", max_frames: int = 32, layers: int = 1, heads: int = 4) -> None:
        super().__init__()
        if mode not in ("mean", "transformer"):
            raise UserError(f"TemporalHead mode must be mean or transformer, got {mode!r}")
        self.mode, self.width = mode, width
        if mode == "transformer":
            self.positional_embedding = nn.Parameter(torch.zeros(max_frames, width))
            self.transformer = Transformer(width, layers, heads)
            self.ln = nn.LayerNorm(width)

    def forward(self, frames: Tensor, mask: Tensor) -> Tensor:
        weights = mask.float().unsqueeze(-1)  # [N, T, 1]
        if self.mode == "transformer":
            t = frames.shape[1]
            if t > self.positional_embedding.shape[0]:
                raise UserError(f"TemporalHead: {t} frames, max_frames is {self.positional_embedding.shape[0]}")
            attend = mask[:, None, :].expand(-1, t, -1)  # [N, T, T] each frame sees the real frames
            x, _ = self.transformer(self.ln(frames + self.positional_embedding[:t]), attn_mask=attend)  # [N, T, W]
            frames = frames + x
        return (frames * weights).sum(1) / weights.sum(1).clamp_min(1)  # [N, W]
