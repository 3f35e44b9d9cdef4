"""Pictures for the evaluation logs: thumbnails of model-input images, framed rows of tiles,
candidate order with the metrics' ties, and a confusion matrix labelled with its class names.
Plain torch and Pillow; no callback state."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F

from lit_vlm.errors import UserError

GREEN = (40, 200, 40)
RED = (220, 40, 40)
GREY = (150, 150, 150)
_MISSING = 60  # fill of a tile without thumbnail


def normalisation(trainer: pl.Trainer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(mean [3], std [3])`` of the trainer's DataModule (``mean``/``std`` attributes), else None."""
    dm = getattr(trainer, "datamodule", None)
    mean, std = getattr(dm, "mean", None), getattr(dm, "std", None)
    try:
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()  # [3]
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()  # [3]
    except (TypeError, ValueError, RuntimeError):
        return None
    if mean_t.numel() != 3 or std_t.numel() != 3:
        return None
    return mean_t, std_t


def make_thumbnail(
    image: torch.Tensor,  # [C, H, W] float, normalised
    norm: tuple[torch.Tensor, torch.Tensor] | None,
    size: int = 64,
) -> torch.Tensor:
    """A small uint8 RGB copy ``[3, h, w]`` (``max(h, w) <= size``) of a model-input image.

    Args:
        image: The normalised image tensor ``[C, H, W]`` (C = 1 or 3).
        norm: ``(mean, std)`` used for the normalisation, undone here; None: min-max scaling.
        size: Longest side of the thumbnail in pixels.
    """
    x = image.detach().float().cpu()  # [C, H, W]
    if x.dim() != 3:
        raise UserError(f"make_thumbnail expects [C, H, W], got {list(x.shape)}")
    if norm is not None and x.shape[0] == 3:
        mean, std = norm
        x = x * std.view(3, 1, 1) + mean.view(3, 1, 1)  # [3, H, W] in [0, 1]
    else:
        lo, hi = x.min(), x.max()
        x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)  # [3, H, W]
    x = x[:3].clamp(0, 1)
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    if scale < 1:
        new = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = F.interpolate(x.unsqueeze(0), size=new, mode="bilinear", antialias=True)[0]  # [3, h, w]
    return (x * 255).round().to(torch.uint8)  # [3, h, w]


def image_grid(
    tiles: Sequence[torch.Tensor | None],
    colours: Sequence[tuple[int, int, int]],
    size: int = 64,
    border: int = 3,
) -> torch.Tensor:
    """One row of framed tiles as a uint8 image ``[3, size + 2 border, n (size + 2 border)]``.

    Args:
        tiles: uint8 thumbnails ``[3, h, w]``, or None for a missing one (dark tile); larger ones are
            cropped to ``size``, much smaller ones enlarged by an integer factor.
        colours: RGB frame colour of every tile.
        size: Inner tile size in pixels.
        border: Frame width in pixels.
    """
    cell = size + 2 * border
    grid = torch.full((3, cell, max(1, len(tiles)) * cell), 255, dtype=torch.uint8)  # [3, cell, n * cell]
    for n, (tile, colour) in enumerate(zip(tiles, colours, strict=True)):
        x0 = n * cell
        grid[:, :, x0 : x0 + cell] = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)
        grid[:, border : border + size, x0 + border : x0 + border + size] = _MISSING
        if tile is not None:
            factor = size // max(tile.shape[1], tile.shape[2])
            if factor > 1:  # small images: enlarge by an integer factor (nearest) for viewing
                tile = tile.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)  # [3, f h, f w]
            h, w = min(tile.shape[1], size), min(tile.shape[2], size)
            top, left = border + (size - h) // 2, x0 + border + (size - w) // 2
            grid[:, top : top + h, left : left + w] = tile[:3, :h, :w]
    return grid


def ranked(
    scores: torch.Tensor,  # [N]
    correct: torch.Tensor,  # [N] bool
) -> torch.Tensor:
    """Candidate order ``[N]``, best first, with the metrics' pessimistic ties.

    Among equal scores wrong candidates come before correct ones, then lower index first, so the
    position of the first correct candidate is exactly the rank used by :mod:`lit_vlm.metrics`.

    Args:
        scores: Score of every candidate ``[N]``.
        correct: Whether each candidate is a ground-truth match ``[N]``.
    """
    by_truth = torch.sort(correct.to(torch.uint8), stable=True).indices  # [N] wrong first
    by_score = torch.sort(scores[by_truth], descending=True, stable=True).indices  # [N]
    return by_truth[by_score]  # [N]


def confusion_image(cm: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """Row-normalised confusion matrix ``[C, C]`` as a uint8 image ``[3, H, W]`` (white = 0, dark
    blue = 1), each row labelled ``index name`` on the left and each column by its index on top."""
    from PIL import Image, ImageDraw

    num_classes = cm.shape[0]
    rows = cm.sum(dim=1, keepdim=True).clamp(min=1)  # [C, 1]
    v = (cm.double() / rows).numpy()  # [C, C] in [0, 1]
    cell = max(8, min(24, 480 // max(1, num_classes)))
    label_w = 8 + 6 * max(len(f"{c} {n}") for c, n in enumerate(names))  # the default bitmap font: ~6 px a character
    top = 14
    image = Image.new("RGB", (label_w + num_classes * cell + 2, top + num_classes * cell + 2), "white")
    draw = ImageDraw.Draw(image)
    for c, name in enumerate(names):
        y = top + c * cell
        draw.text((2, y + (cell - 10) // 2), f"{c} {name}", fill=(0, 0, 0))
        if cell >= 12 or c % 5 == 0:
            draw.text((label_w + c * cell + 1, 1), str(c), fill=(0, 0, 0))
        for p in range(num_classes):
            shade = float(v[c, p])
            colour = tuple(int(round(255 * x)) for x in (1 - shade, 1 - shade, 1 - 0.5 * shade))
            x0 = label_w + p * cell
            draw.rectangle([x0, y, x0 + cell - 1, y + cell - 1], fill=colour, outline=(220, 220, 220))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # [3, H, W] uint8


__all__ = ["GREEN", "GREY", "RED", "confusion_image", "image_grid", "make_thumbnail", "normalisation", "ranked"]
