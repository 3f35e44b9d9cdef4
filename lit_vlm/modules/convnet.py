"""Convolutional image tower: stages of 3x3 convolutions with BatchNorm, averaged over space.

The CPU quickstarts use it because it learns the synthetic world's shapes several times faster
per step than a ViT of the same cost: with a direct shape label it reaches 0.81 after 100 steps
where the quickstart ViT is at 0.27, and CLIP with it learns zero-shot shapes inside the CPU
budget (``benchmarks/README.md``, "Every family learns the embedded world"). BatchNorm is what
makes it fast; under DDP its statistics are the global batch's (:class:`GlobalBatchNorm2d`),
so a run gives the numbers of one process. With ``accum_freq > 1`` they are each micro-batch's,
as for open_clip's ResNet towers (the replayed pass updates the running statistics again).

Shape letters: B batch, C=3 channels, H/W image height/width (pixels), h/w the final feature
map (H and W divided by the product of the strides), D width (the last stage's channels).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from lit_vlm.distributed import is_distributed
from lit_vlm.errors import UserError

from .transformer import make_activation
from .vision import VisionOutput

NORMS = ("batch", "group")


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch under DDP.

    ``torch.nn.SyncBatchNorm`` runs on GPUs only; this one sums each channel's count, sum and sum
    of squares over ranks with an autograd all-reduce (any backend, gloo included), so the forward
    pass and the gradients equal those of one process holding the whole batch. In one process, or
    in eval mode (running statistics), it is plain ``nn.BatchNorm2d``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        c = x.shape[1]
        local = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)),
                           x.new_tensor([x.numel() // c])])  # [2C + 1]
        total = dist_fn.all_reduce(local)  # [2C + 1], summed over ranks
        count = total[-1]
        mean = total[:c] / count  # [C]
        var = (total[c:2 * c] / count - mean * mean).clamp(min=0)  # [C], biased
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp(min=1), m)
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]  # [B, C, H, W]
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None] if self.affine else y


class ConvNet(nn.Module):
    """Image tower of ``len(channels)`` stages; each stage is ``convs_per_stage`` blocks of
    3x3 convolution (the first with the stage's stride), normalisation and activation.

    ``pooled`` is the mean of the last feature map over space; ``tokens`` are that mean followed
    by the feature map's positions in raster order, so families that read tokens (CoCa, BLIP,
    FILIP) see the same layout as a ViT's "class token first".

    Args:
        channels: Output channels of each stage; the last one is the tower's ``width``.
        strides: Stride of each stage's first convolution (same length as ``channels``).
        convs_per_stage: Convolutions per stage (>= 1).
        norm: "batch" (BatchNorm2d, the default: fastest to train) or "group" (GroupNorm with
            one group, i.e. LayerNorm over channels and space: independent of the batch).
        act_layer: Activation after each normalisation (see :func:`make_activation`).
        image_size: Training resolution, recorded for the data pipeline and the model card.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 128, 128),
        strides: Sequence[int] = (2, 2, 2, 1),
        convs_per_stage: int = 2,
        norm: str = "batch",
        act_layer: str = "gelu",
        image_size: int = 64,
    ) -> None:
        super().__init__()
        channels, strides = [int(c) for c in channels], [int(s) for s in strides]
        if not channels or len(channels) != len(strides):
            raise UserError(f"ConvNet channels and strides need the same non-zero length, got channels={channels}, "
                            f"strides={strides}")
        if min(channels) < 1 or min(strides) < 1 or convs_per_stage < 1:
            raise UserError(f"ConvNet channels, strides and convs_per_stage must be >= 1, got channels={channels}, "
                            f"strides={strides}, convs_per_stage={convs_per_stage}")
        if norm not in NORMS:
            raise UserError(f"ConvNet norm must be one of {NORMS}, got {norm!r}")
        layers: list[nn.Module] = []
        c_in = 3
        for c_out, stride in zip(channels, strides):
            for i in range(convs_per_stage):
                layers += [
                    nn.Conv2d(c_in, c_out, 3, stride=stride if i == 0 else 1, padding=1, bias=False),
                    GlobalBatchNorm2d(c_out) if norm == "batch" else nn.GroupNorm(1, c_out),
                    make_activation(act_layer),
                ]
                c_in = c_out
        self.body = nn.Sequential(*layers)
        self.width = channels[-1]
        self.image_size = int(image_size)
        self.stride = math.prod(strides)  # input pixels per feature-map cell, per side

    def forward(self, images: Tensor, output_hidden_states: bool = False, patch_dropout: float | None = None) -> VisionOutput:
        """Encode ``images`` [B, 3, H, W]. Patch dropout (FLIP) is a ViT technique: asking for it raises."""
        if patch_dropout:
            raise UserError("patch dropout (FLIP) needs a VisionTransformer image tower; ConvNet has no patches to drop")
        if output_hidden_states:
            raise UserError("ConvNet does not return hidden states; use a VisionTransformer image tower")
        fmap = self.body(images)  # [B, D, h, w]
        grid = fmap.flatten(2).transpose(1, 2)  # [B, h*w, D]
        pooled = grid.mean(dim=1)  # [B, D]
        return VisionOutput(pooled=pooled, tokens=torch.cat([pooled[:, None], grid], dim=1))  # [B, 1+h*w, D]
