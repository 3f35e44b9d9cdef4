"""Image decoding and augmentation without torchvision.

Everything here works on :class:`PIL.Image.Image` inputs and produces ``torch`` tensors at the
end of a :class:`Compose` chain:

* :func:`decode_image` turns raw bytes into an RGB image, whatever the file's mode (palette with
  transparency, 16-bit greyscale, CMYK, ...), honours the EXIF orientation tag and refuses
  decompression bombs by raising :class:`BadSample`.
* :class:`RandomResizedCrop`, :class:`Resize`, :class:`CenterCrop`, :class:`ToTensor`,
  :class:`Normalize` and :class:`Compose` are small callables with the semantics of their
  torchvision namesakes.
* :func:`train_transform` / :func:`eval_transform` build the standard CLIP-style pipelines.

Random transforms take an optional ``generator`` (:class:`torch.Generator`) so that the data
pipeline can make augmentation deterministic per (seed, epoch, rank, worker).  There is no
horizontal flip by default: the synthetic captions talk about "left" and "right".
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from lit_vlm.errors import UserError

__all__ = [
    "BadSample",
    "CLIP_MEAN",
    "CLIP_STD",
    "CenterCrop",
    "Compose",
    "DEFAULT_MAX_PIXELS",
    "Normalize",
    "RandomResizedCrop",
    "RandomTransform",
    "Resize",
    "ToTensor",
    "decode_image",
    "eval_transform",
    "train_transform",
]

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel mean of OpenAI CLIP's training images (RGB, in [0, 1])."""

CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel standard deviation of OpenAI CLIP's training images (RGB, in [0, 1])."""

DEFAULT_MAX_PIXELS = 89_478_485
"""Default decompression-bomb limit: the same number of pixels as Pillow's own default."""

_WHITE = (255, 255, 255, 255)


class BadSample(Exception):
    """A sample that cannot be used and must be skipped.

    Args:
        reason: Short machine-readable category used for skip counting, e.g. ``"image_decode"``,
            ``"image_too_large"``, ``"missing_caption"``.
        message: Human-readable detail for logs.
        dropped: Parts of the sample dropped before it was given up, per reason (an interleaved
            document's images), counted apart from skipped samples.
    """

    def __init__(self, reason: str, message: str = "", dropped: dict[str, int] | None = None) -> None:
        super().__init__(reason, message)
        self.reason = reason
        self.message = message
        self.dropped = dict(dropped or {})

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}" if self.message else self.reason

    def __reduce__(self) -> tuple[Any, ...]:  # keep picklable across worker processes
        return (type(self), (self.reason, self.message, self.dropped))


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def decode_image(
    data: bytes,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode image bytes into an RGB :class:`PIL.Image.Image`.

    The EXIF orientation tag is applied, and every Pillow mode is mapped to RGB: greyscale and
    bilevel images are replicated to three channels, CMYK is converted, 16/32-bit integer images
    (``I;16*``, ``I``) are scaled down from the 16-bit range to 8 bits, and images with an alpha
    channel or palette/colour-key transparency are composited on a white background.

    Args:
        data: The encoded image (JPEG, PNG, WebP, ... anything Pillow reads).
        max_pixels: Refuse images with more pixels than this (decompression-bomb guard); checked
            from the header before any pixel is decoded.  ``None`` disables this check, but
            Pillow's global ``PIL.Image.MAX_IMAGE_PIXELS`` guard still applies on top.
        draft_size: JPEG only: let the decoder downscale by a power of two while keeping both
            sides at least this large (much faster for big photos).  ``None`` decodes at full size.

    Returns:
        The decoded RGB image (fully loaded).

    Raises:
        BadSample: ``reason="image_decode"`` for empty or unreadable data and
            ``reason="image_too_large"`` for images over the pixel limit.
    """
    if not data:
        raise BadSample("image_decode", "zero-byte image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise BadSample("image_too_large", f"{width}x{height} pixels exceeds max_pixels={max_pixels}")
            if draft_size is not None and img.format == "JPEG":
                img.draft(None, (draft_size, draft_size))
            img.load()
    except BadSample:
        raise
    except Image.DecompressionBombError as exc:
        raise BadSample("image_too_large", str(exc)) from exc
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise BadSample("image_decode", f"{type(exc).__name__}: {exc}") from exc
    try:
        img = _apply_exif_orientation(img)
        return _to_rgb(img)
    except Exception as exc:
        raise BadSample("image_decode", f"cannot convert mode {img.mode}: {type(exc).__name__}: {exc}") from exc


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip according to the EXIF orientation tag; a broken EXIF block is ignored."""
    try:
        transposed = ImageOps.exif_transpose(img)
    except Exception:
        return img
    return img if transposed is None else transposed


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (see :func:`decode_image`)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("RGBA", "LA", "PA"):
        return _composite_on_white(img.convert("RGBA"))
    if mode in ("RGBa", "La"):  # premultiplied alpha
        return _composite_on_white(img.convert("RGBA"))
    if mode in ("P", "L", "RGB", "1") and "transparency" in img.info:
        return _composite_on_white(img.convert("RGBA"))
    if mode.startswith("I;16") or mode == "I":
        # 16-bit (or 32-bit integer holding 16-bit data) greyscale: map [0, 65535] to [0, 255].
        arr = np.asarray(img).astype(np.int64)
        arr = np.clip(arr, 0, 65535)
        arr8 = ((arr * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        scale = 255.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 1.0
        arr8 = np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    return img.convert("RGB")


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """Return ``(height, width)`` from an int or a 2-sequence."""
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise UserError(f"size must be an int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


class RandomTransform:
    """Base class of transforms that draw random numbers.

    Subclasses implement ``__call__(img, generator=None)``; :class:`Compose` forwards its
    generator to them (and only to them).
    """

    def __call__(self, img: Any, generator: torch.Generator | None = None) -> Any:  # pragma: no cover
        raise NotImplementedError


class RandomResizedCrop(RandomTransform):
    """Crop a random area/aspect-ratio window and resize it to ``size`` (bicubic).

    The window is drawn like torchvision's ``RandomResizedCrop``: up to 10 attempts with an area
    fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``; if no attempt fits
    inside the image, a centre crop with the aspect ratio clamped to ``ratio`` is used.

    Args:
        size: Output size, an int (square) or ``(height, width)``.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop aspect ratio (width / height).
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        if scale[0] > scale[1] or ratio[0] > ratio[1]:
            raise UserError(f"scale and ratio must be (min, max) ranges, got scale={scale}, ratio={ratio}")
        if scale[0] <= 0 or ratio[0] <= 0:
            raise UserError(f"scale and ratio must be positive, got scale={scale}, ratio={ratio}")
        self.size = _pair(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def get_params(
        self, width: int, height: int, generator: torch.Generator | None = None
    ) -> tuple[int, int, int, int]:
        """Draw a crop window ``(top, left, height, width)`` for an image of the given size."""
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            u_area, u_ratio = torch.rand(2, generator=generator).tolist()
            target_area = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u_area)
            aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
            crop_w = int(round(math.sqrt(target_area * aspect)))
            crop_h = int(round(math.sqrt(target_area / aspect)))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator))
                return top, left, crop_h, crop_w
        # Fallback: the largest centred window whose aspect ratio lies inside `ratio`.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            crop_w, crop_h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            crop_w, crop_h = int(round(height * self.ratio[1])), height
        else:
            crop_w, crop_h = width, height
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        top, left, crop_h, crop_w = self.get_params(img.width, img.height, generator)
        out_h, out_w = self.size
        return img.resize((out_w, out_h), Image.Resampling.BICUBIC, box=(left, top, left + crop_w, top + crop_h))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class Resize:
    """Resize so that the shorter side equals ``size`` (aspect ratio kept, bicubic).

    Args:
        size: Target length of the shorter side.
    """

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise UserError(f"size must be positive, got {size}")
        self.size = int(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        width, height = img.size
        short, long = (width, height) if width <= height else (height, width)
        if short == self.size:
            return img
        new_short, new_long = self.size, int(self.size * long / short)
        new_size = (new_short, new_long) if width <= height else (new_long, new_short)
        return img.resize(new_size, Image.Resampling.BICUBIC)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class CenterCrop:
    """Crop the centre ``size`` window (zero-padded if the image is smaller).

    The offsets are ``round((H - h) / 2)`` and ``round((W - w) / 2)``, as in torchvision.

    Args:
        size: Output size, an int (square) or ``(height, width)``.
    """

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _pair(size)

    @staticmethod
    def offsets(width: int, height: int, crop_h: int, crop_w: int) -> tuple[int, int]:
        """Return ``(top, left)`` of the centred window (negative when padding is needed)."""
        return int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))

    def __call__(self, img: Image.Image) -> Image.Image:
        crop_h, crop_w = self.size
        if img.size == (crop_w, crop_h):
            return img
        top, left = self.offsets(img.width, img.height, crop_h, crop_w)
        return img.crop((left, top, left + crop_w, top + crop_h))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class ToTensor:
    """Convert an RGB PIL image (or ``uint8`` HWC array) to a float tensor ``[3, H, W]`` in [0, 1]."""

    def __call__(self, img: Image.Image | np.ndarray) -> torch.Tensor:
        arr = np.array(img, dtype=np.uint8)  # a writable copy (PIL's buffer is read-only)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        tensor = torch.from_numpy(arr).permute(2, 0, 1)
        return tensor.to(torch.float32).div_(255.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Normalize:
    """Channel-wise ``(x - mean) / std`` on a ``[C, H, W]`` float tensor.

    Args:
        mean: Per-channel mean.
        std: Per-channel standard deviation (all positive).
    """

    def __init__(self, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> None:
        if len(mean) != len(std):
            raise UserError(f"mean and std must have the same length, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise UserError(f"std must be positive, got {tuple(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._inv_std = (1.0 / torch.tensor(self.std, dtype=torch.float32)).view(-1, 1, 1)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor - self._mean) * self._inv_std

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


class Compose:
    """Apply transforms in order; a ``generator`` is passed to the :class:`RandomTransform` ones.

    Args:
        transforms: The callables to chain.
    """

    def __init__(self, transforms: Sequence[Callable[..., Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, img: Any, generator: torch.Generator | None = None) -> Any:
        for transform in self.transforms:
            img = transform(img, generator) if isinstance(transform, RandomTransform) else transform(img)
        return img

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"{type(self).__name__}([{inner}])"


def train_transform(
    image_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    scale: tuple[float, float] = (0.9, 1.0),
) -> Compose:
    """Training pipeline: random resized crop to ``image_size`` (no flip), tensor, normalise."""
    return Compose([RandomResizedCrop(image_size, scale=scale), ToTensor(), Normalize(mean, std)])


def eval_transform(
    image_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Compose:
    """Evaluation pipeline: shorter side to ``image_size``, centre crop, tensor, normalise."""
    return Compose([Resize(image_size), CenterCrop(image_size), ToTensor(), Normalize(mean, std)])
