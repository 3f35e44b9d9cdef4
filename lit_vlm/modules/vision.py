"""Vision Transformer image tower (CLIP / open_clip layout).

With ``pool="cls"``, ``ln_pre=True``, ``ln_post=True``, ``stem="patch"`` and ``act_layer`` /
``norm_eps`` set as the checkpoint was trained (QuickGELU / 1e-5 for OpenAI), the tower holds
OpenAI CLIP, open_clip and Hugging Face ``CLIPVisionModel`` ViT weights exactly: bias-free conv
patchify, class embedding, learned positions, ``ln_pre``, pre-LN blocks with a fused qkv
projection, ``ln_post`` on the pooled class token (the projection lives in the family). See
:mod:`lit_vlm.interop` for the key mapping.

Shape letters: B batch, C=3 channels, H/W image height/width (pixels), P patch size,
N number of patches (gh * gw), N' patches kept after patch dropout, D width, Q pooling queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_vlm.errors import UserError

from .presets import VISION_PRESETS, require, resolve_preset
from .transformer import AttentionalPooler, Transformer

POOL_TYPES = ("cls", "mean", "attn")


@dataclass
class VisionOutput:
    """Output of :class:`VisionTransformer`.

    Attributes:
        pooled: Image embedding after ``ln_post``: [B, D], or [B, Q, D] for attention pooling with
            more than one query.
        tokens: All tokens after ``ln_post``, class token first: [B, 1 + N', D] (``ln_post`` is
            applied to each token separately, so ``tokens[:, 0] == pooled`` for ``pool="cls"``).
        hidden_states: If requested, ``layers + 1`` tensors [B, 1 + N', D] before ``ln_post``;
            ``hidden_states[0]`` is the transformer input (after ``ln_pre``) and
            ``hidden_states[i]`` the output of block ``i - 1``. None otherwise.
    """

    pooled: Tensor
    tokens: Tensor
    hidden_states: tuple[Tensor, ...] | None = None


def _pair(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def interpolate_pos_embed(
    pos_embed: Tensor,
    new_grid: int | tuple[int, int],
    old_grid: int | tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
) -> Tensor:
    """Bicubically resize the patch-grid part of a learned positional embedding.

    Works on a module parameter at forward time and on a checkpoint tensor (e.g. to load a model
    trained at 224px into one built for 336px). Prefix tokens (the class token) are kept as is.

    Args:
        pos_embed: [num_prefix + gh*gw, D] or [1, num_prefix + gh*gw, D].
        new_grid: Target grid (gh', gw'), or a single int for a square grid.
        old_grid: Source grid; inferred as a square if None (raises if the count is not square).
        num_prefix_tokens: Leading non-grid tokens (1 for the class token).

    Returns:
        The resized embedding with the same number of dims as the input:
        [num_prefix + gh'*gw', D] (or with a leading 1). Returned unchanged if the grid matches.
    """
    squeeze = pos_embed.dim() == 2
    pe = pos_embed.unsqueeze(0) if squeeze else pos_embed  # [1, T, D]
    prefix, grid = pe[:, :num_prefix_tokens], pe[:, num_prefix_tokens:]  # [1, p, D], [1, N, D]
    n = grid.shape[1]
    if old_grid is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise UserError(f"cannot infer a square grid from {n} positions; pass old_grid")
        old_grid = (side, side)
    oh, ow = _pair(old_grid)
    nh, nw = _pair(new_grid)
    if oh * ow != n:
        raise UserError(f"old_grid {oh}x{ow} does not match {n} grid positions")
    if (oh, ow) == (nh, nw):
        return pos_embed
    D = grid.shape[-1]
    grid = grid.reshape(1, oh, ow, D).permute(0, 3, 1, 2)  # [1, D, oh, ow]
    grid = F.interpolate(grid.float(), size=(nh, nw), mode="bicubic", align_corners=False)  # [1, D, nh, nw]
    grid = grid.to(pe.dtype).permute(0, 2, 3, 1).reshape(1, nh * nw, D)  # [1, nh*nw, D]
    out = torch.cat([prefix, grid], dim=1)  # [1, p + nh*nw, D]
    return out.squeeze(0) if squeeze else out


def random_masking(
    x: Tensor,  # [B, N, D] patch tokens
    mask_ratio: float,
    noise: Tensor | None = None,  # [B, N] in [0, 1); default uniform
) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's per-sample random masking by argsort of noise: keep the ``round((1 - ratio) * N)``
    tokens with the smallest noise.

    Returns ``(kept [B, N', D], mask [B, N] (1 = removed, in the original patch order),
    ids_restore [B, N])``: ``torch.gather`` of ``cat(kept, mask tokens)`` along dim 1 with
    ``ids_restore`` puts every token back in its original place.
    """
    B, N, D = x.shape
    keep = max(1, int(round(N * (1.0 - mask_ratio))))
    if noise is None:
        noise = torch.rand(B, N, device=x.device)  # [B, N]
    ids_shuffle = noise.argsort(dim=1)  # [B, N] ascending: the first ones are kept
    ids_restore = ids_shuffle.argsort(dim=1)  # [B, N]
    kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, D))  # [B, N', D]
    mask = torch.ones(B, N, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # [B, N] in patch order
    return kept, mask, ids_restore


def conv_stem(patch_size: int, width: int) -> nn.Sequential:
    """log2(patch_size) 3x3 stride-2 convolutions (channels 32, 64, ... capped at ``width``), each
    followed by GroupNorm(1) and GELU, then a 1x1 projection to ``width``: [B, 3, H, W] -> [B, D, H/p, W/p]."""
    layers: list[nn.Module] = []
    c_in = 3
    for i in range(patch_size.bit_length() - 1):
        c_out = min(width, 32 * 2**i)
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.GroupNorm(1, c_out), nn.GELU()]
        c_in = c_out
    layers.append(nn.Conv2d(c_in, width, 1))
    return nn.Sequential(*layers)


class VisionTransformer(nn.Module):
    """ViT image encoder: strided-conv patchify, class token, learned positions, pre-LN transformer.

    Shape values left as None come from ``preset``; explicit values override it. With
    ``preset=None`` every shape value (image_size, patch_size, width, layers, heads, mlp_ratio)
    must be given.

    Initialisation (CLIP / open_clip): class and positional embeddings ~ N(0, width^-0.5); the
    patch conv keeps PyTorch's default (as in CLIP); transformer blocks use the CLIP scheme (see
    :mod:`lit_vlm.modules.transformer`: residual projections ~ N(0, width^-0.5 * (2*layers)^-0.5));
    LayerNorms 1/0.

    Args:
        preset: Named size from ``VISION_PRESETS`` ("tiny", "small", "B/32", "B/16", "L/14",
            "L/14-336"), or None to give every size explicitly.
        image_size: Training image resolution (square, pixels); the positional embedding is built
            for it and bicubically interpolated for other (patch-divisible) input sizes.
        patch_size: Patch side in pixels; must divide ``image_size``.
        width: Transformer width D (feature dim of tokens and pooled output).
        layers: Number of transformer blocks.
        heads: Attention heads; must divide ``width``.
        mlp_ratio: MLP hidden width as a multiple of ``width``.
        pool: How to pool the image embedding: "cls" (class token), "mean" (mean of patch tokens),
            or "attn" (learned-query attentional pooler).
        attn_pool_queries: Number of queries of the attentional pooler (pool="attn" only); with
            more than one query ``pooled`` is [B, Q, D].
        patch_dropout: Fraction of patch tokens randomly dropped per sample during training
            (FLIP); the class token is always kept. 0 disables it. Must be in [0, 1).
        ln_pre: Apply a LayerNorm to the embedded tokens before the transformer (as CLIP does).
        ln_post: Apply a LayerNorm to the pooled output and to the returned tokens (as CLIP does:
            OpenAI ``ln_post``, Hugging Face ``post_layernorm``); False leaves them unnormalised.
        act_layer: MLP activation of every block: "gelu" (exact GELU, the default; open_clip
            models trained from scratch, Hugging Face ``hidden_act="gelu"``), "quick_gelu"
            (OpenAI CLIP weights, open_clip ``*-quickgelu``) or "gelu_tanh".
        norm_eps: Epsilon of every LayerNorm in the tower (1e-5 as in CLIP; 1e-6 for SigLIP).
        ls_init: If set, scale both residual branches of every block by a learned per-channel
            LayerScale initialised to this value (open_clip ``ls_init_value``); None disables it.
        stem: How pixels become tokens: "patch" (one strided convolution with kernel = stride =
            ``patch_size``, as ViT and CLIP do) or "conv" (a stack of 3x3 stride-2 convolutions
            reaching the same stride, then a 1x1 projection: the early-convolution stem of Xiao et
            al., 2021, which trains faster from scratch on small data; ``patch_size`` must then be
            a power of two).
    """

    def __init__(
        self,
        preset: str | None = "tiny",
        image_size: int | None = None,
        patch_size: int | None = None,
        width: int | None = None,
        layers: int | None = None,
        heads: int | None = None,
        mlp_ratio: float | None = None,
        pool: str = "cls",
        attn_pool_queries: int = 1,
        patch_dropout: float = 0.0,
        ln_pre: bool = True,
        stem: str = "patch",
        ln_post: bool = True,
        act_layer: str = "gelu",
        norm_eps: float = 1e-5,
        ls_init: float | None = None,
    ) -> None:
        super().__init__()
        cfg = resolve_preset(
            VISION_PRESETS,
            preset,
            dict(image_size=image_size, patch_size=patch_size, width=width, layers=layers, heads=heads, mlp_ratio=mlp_ratio),
        )
        require(cfg, ["image_size", "patch_size", "width", "layers", "heads", "mlp_ratio"], preset, "VisionTransformer")
        image_size, patch_size = int(cfg["image_size"]), int(cfg["patch_size"])
        width, layers, heads = int(cfg["width"]), int(cfg["layers"]), int(cfg["heads"])
        if image_size % patch_size != 0:
            raise UserError(f"image_size {image_size} must be divisible by patch_size {patch_size}")
        if width % heads != 0:
            raise UserError(f"width {width} must be divisible by heads {heads}")
        if pool not in POOL_TYPES:
            raise UserError(f"pool must be one of {POOL_TYPES}, got {pool!r}")
        if attn_pool_queries < 1:
            raise UserError(f"attn_pool_queries must be >= 1, got {attn_pool_queries}")
        self._check_patch_dropout(patch_dropout)
        if stem not in ("patch", "conv"):
            raise UserError(f"stem must be 'patch' or 'conv', got {stem!r}")
        if stem == "conv" and (patch_size < 2 or patch_size & (patch_size - 1)):
            raise UserError(f"stem='conv' needs a power-of-two patch_size, got {patch_size}")

        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        self.layers = layers
        self.heads = heads
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        self.pool = pool
        self.patch_dropout = float(patch_dropout)

        self.stem = stem
        if stem == "patch":
            self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        else:
            self.conv1 = conv_stem(patch_size, width)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))  # [D]
        self.positional_embedding = nn.Parameter(scale * torch.randn(1 + self.num_patches, width))  # [1+N, D]
        self.act_layer = act_layer
        self.norm_eps = float(norm_eps)
        self.mlp_ratio = float(cfg["mlp_ratio"])
        self.ln_pre = nn.LayerNorm(width, eps=norm_eps) if ln_pre else nn.Identity()
        self.transformer = Transformer(
            width, layers, heads, mlp_ratio=self.mlp_ratio, act_layer=act_layer, norm_eps=norm_eps,
            ls_init=ls_init,
        )
        self.attn_pool = AttentionalPooler(width, attn_pool_queries, heads) if pool == "attn" else None
        self.ln_post = nn.LayerNorm(width, eps=norm_eps) if ln_post else nn.Identity()

    @staticmethod
    def _check_patch_dropout(p: float) -> None:
        if not 0.0 <= p < 1.0:
            raise UserError(f"patch_dropout must be in [0, 1), got {p}")

    def _pos_embed(self, gh: int, gw: int) -> Tensor:
        """Positional embedding for a gh x gw grid: [1 + gh*gw, D]."""
        return interpolate_pos_embed(self.positional_embedding, (gh, gw), old_grid=self.grid_size)  # [1+N, D]

    def _drop_patches(self, x: Tensor, p: float) -> Tensor:
        """Keep the class token and a random round((1-p)*N) patches per sample: [B, 1+N, D] -> [B, 1+N', D]."""
        B, T, D = x.shape
        n = T - 1
        keep = max(1, int(round((1.0 - p) * n)))
        if keep >= n:
            return x
        noise = torch.rand(B, n, device=x.device)  # [B, N]
        idx = noise.argsort(dim=1)[:, :keep].sort(dim=1).values  # [B, N'] (kept in raster order)
        patches = torch.gather(x[:, 1:], 1, idx.unsqueeze(-1).expand(-1, -1, D))  # [B, N', D]
        return torch.cat([x[:, :1], patches], dim=1)  # [B, 1+N', D]

    def forward_masked(
        self, images: Tensor, mask_ratio: float, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """MAE encoder pass: embed the patches, add positions, keep a random ``1 - mask_ratio`` of
        them per sample (:func:`random_masking`), prepend the class token, run the transformer on
        the visible tokens only.

        Returns ``(tokens [B, 1+N', D] after ln_post, mask [B, N], ids_restore [B, N])``.
        """
        B, _, h, w = images.shape
        if h % self.patch_size or w % self.patch_size:
            raise UserError(f"image size {h}x{w} must be divisible by patch_size {self.patch_size}")
        x = self.conv1(images)  # [B, D, gh, gw]
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [B, N, D]
        pos = self._pos_embed(gh, gw).to(x.dtype)  # [1+N, D]
        x = x + pos[1:]  # [B, N, D]
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)  # [B, N', D]
        cls = (self.class_embedding.to(x.dtype) + pos[0]).expand(B, 1, -1)  # [B, 1, D]
        x = self.ln_pre(torch.cat([cls, x], dim=1))  # [B, 1+N', D]
        x, _ = self.transformer(x)
        return self.ln_post(x), mask, ids_restore

    def forward(
        self,
        images: Tensor,
        output_hidden_states: bool = False,
        patch_dropout: float | None = None,
        replace_mask: Tensor | None = None,
        replace_token: Tensor | None = None,
    ) -> VisionOutput:
        """Encode ``images`` [B, 3, H, W] (H and W divisible by ``patch_size``).

        Args:
            images: Pixel batch [B, 3, H, W]. Sizes other than ``image_size`` use an interpolated
                positional embedding.
            output_hidden_states: Also return every layer's tokens (before ``ln_post``).
            patch_dropout: Override the module's patch-dropout ratio for this call. Patch dropout
                is only ever applied in training mode.
            replace_mask: [B, N] bool: patches whose embedding is replaced by ``replace_token``
                [D] before the positions are added (BEiT / FLAVA masked image modelling).
            replace_token: The learned mask token [D] (with ``replace_mask``).
        """
        B, _, h, w = images.shape
        if h % self.patch_size or w % self.patch_size:
            raise UserError(f"image size {h}x{w} must be divisible by patch_size {self.patch_size}")
        p = self.patch_dropout if patch_dropout is None else float(patch_dropout)
        self._check_patch_dropout(p)

        x = self.conv1(images)  # [B, D, gh, gw]
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [B, N, D]
        if replace_mask is not None:
            x = torch.where(replace_mask.bool()[:, :, None], replace_token.to(x.dtype), x)  # [B, N, D]
        cls = self.class_embedding.to(x.dtype).expand(B, 1, -1)  # [B, 1, D]
        x = torch.cat([cls, x], dim=1)  # [B, 1+N, D]
        x = x + self._pos_embed(gh, gw).to(x.dtype)  # [B, 1+N, D]
        if self.training and p > 0.0:
            x = self._drop_patches(x, p)  # [B, 1+N', D]
        x = self.ln_pre(x)  # [B, 1+N', D]
        x, hidden_states = self.transformer(x, output_hidden_states=output_hidden_states)  # [B, 1+N', D]

        if self.pool == "cls":
            pooled = x[:, 0]  # [B, D]
        elif self.pool == "mean":
            pooled = x[:, 1:].mean(dim=1)  # [B, D]
        else:
            pooled = self.attn_pool(x)  # [B, Q, D]
            if pooled.shape[1] == 1:
                pooled = pooled.squeeze(1)  # [B, D]
        pooled = self.ln_post(pooled)  # [B, D] or [B, Q, D]
        tokens = self.ln_post(x)  # [B, 1+N', D]
        return VisionOutput(pooled=pooled, tokens=tokens, hidden_states=hidden_states)
