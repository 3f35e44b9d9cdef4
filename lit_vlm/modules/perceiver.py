"""Flamingo's Perceiver resampler and gated cross-attention, and the wrapper that puts the latter
into the decoder layers of a Hugging Face causal LM.

* :class:`PerceiverResampler` turns each image's many feature tokens into a few learned latents
  (queries from the latents; keys and values from the image tokens and the latents together).
* :class:`GatedCrossAttention` lets text tokens attend to image latents, behind ``tanh`` gates
  that start at 0, so an untouched model is its language model exactly.
* :func:`text_time` / :func:`media_attention_mask` say which image each token may see: with
  ``only_immediate`` the latest ``<image>`` at or before it (Flamingo), else every earlier one.
* :class:`FlamingoLayer` runs the gated block before an LM decoder layer; :func:`find_decoder_layers`
  finds the LM's list of decoder layers from its config, :func:`wrap_decoder_layers` wraps them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lit_vlm.errors import UserError
from lit_vlm.modules.transformer import MLP, CrossAttention

__all__ = [
    "FlamingoLayer",
    "GatedCrossAttention",
    "PerceiverResampler",
    "find_decoder_layers",
    "media_attention_mask",
    "text_time",
    "wrap_decoder_layers",
]


class PerceiverResampler(nn.Module):
    """Image tokens [B, N, S, Dm] -> latents [B, N, num_latents, Dm], per image (Alayrac et al., 2022).

    Args:
        width: Width of the image tokens (and of the latents).
        depth: Attention + feed-forward layers.
        heads: Attention heads.
        num_latents: Latents per image.
        ff_mult: Feed-forward hidden width as a multiple of ``width``.
    """

    def __init__(self, width: int, depth: int = 6, heads: int = 8, num_latents: int = 64, ff_mult: float = 4.0) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, width))  # [n, Dm]
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleDict({
                "norm_media": nn.LayerNorm(width),
                "norm_latents": nn.LayerNorm(width),
                "attn": CrossAttention(width, heads, bias=False),
                "norm_ff": nn.LayerNorm(width),
                "ff": MLP(width, ff_mult),
            }))
        self.norm = nn.LayerNorm(width)

    def forward(self, media: Tensor) -> Tensor:
        """``media`` [B, N, S, Dm] (N images of S tokens each) -> [B, N, n, Dm]."""
        B, N, S, D = media.shape
        x = media.reshape(B * N, S, D)  # [BN, S, Dm]
        latents = self.latents.expand(B * N, -1, -1)  # [BN, n, Dm]
        for layer in self.layers:
            q = layer["norm_latents"](latents)  # [BN, n, Dm]
            context = torch.cat([layer["norm_media"](x), q], dim=1)  # [BN, S + n, Dm]
            latents = latents + layer["attn"](q, context)  # [BN, n, Dm]
            latents = latents + layer["ff"](layer["norm_ff"](latents))  # [BN, n, Dm]
        return self.norm(latents).view(B, N, -1, D)  # [B, N, n, Dm]


def text_time(media_locations: Tensor) -> Tensor:
    """[B, T] bool (``<image>`` positions) -> [B, T] long: how many images up to and including each
    token (0 before the first; an ``<image>`` token counts its own image)."""
    return media_locations.long().cumsum(dim=1)


def media_attention_mask(times: Tensor, num_media: int, only_immediate: bool = True,
                         media_mask: Tensor | None = None) -> Tensor:
    """[B, T] :func:`text_time` -> [B, T, N] bool, True where token t may see image n (1-based n
    = times[t] with ``only_immediate``, n <= times[t] otherwise); images off ``media_mask`` [B, N]
    are never seen."""
    media = torch.arange(1, num_media + 1, device=times.device)  # [N]
    mask = times[..., None] == media if only_immediate else times[..., None] >= media  # [B, T, N]
    if media_mask is not None:
        mask = mask & media_mask[:, None, :].bool()
    return mask


class GatedCrossAttention(nn.Module):
    """Text [B, T, D] attends to image latents [B, N, n, Dm] behind ``tanh`` gates that start at 0:
    ``x + tanh(a) * attn(LN(x), media)``, then ``+ tanh(f) * FF(LN(x))``. A token that may see no
    image gets nothing from attention (the feed-forward applies to every token, as in Flamingo).

    Args:
        width: Width D of the LM's hidden states.
        media_width: Width Dm of the latents.
        heads: Attention heads (dividing ``width``).
        ff_mult: Feed-forward hidden width as a multiple of ``width``.
        only_immediate: Each token sees only the latest image at or before it (Flamingo), else all
            earlier images.
    """

    def __init__(self, width: int, media_width: int, heads: int = 8, ff_mult: float = 4.0, only_immediate: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = CrossAttention(width, heads, context_dim=media_width, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(()))
        self.norm_ff = nn.LayerNorm(width)
        self.ff = MLP(width, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(()))
        self.only_immediate = only_immediate

    def forward(self, x: Tensor, media: Tensor, times: Tensor, media_mask: Tensor | None = None) -> Tensor:
        """``x`` [B, T, D], ``media`` [B, N, n, Dm], ``times`` [B, T] (:func:`text_time`, for the
        tokens of ``x``) -> [B, T, D]."""
        B, N, n, _ = media.shape
        mask = media_attention_mask(times, N, self.only_immediate, media_mask)  # [B, T, N]
        seen = mask.any(dim=-1, keepdim=True)  # [B, T, 1]
        keys = (mask | ~seen).repeat_interleave(n, dim=-1)  # [B, T, N n]; unseen rows attend anywhere, then zeroed
        y = self.attn(self.norm(x), media.reshape(B, N * n, -1), attn_mask=keys[:, None])  # [B, T, D]
        x = x + self.attn_gate.tanh() * (y * seen)  # [B, T, D]
        return x + self.ff_gate.tanh() * self.ff(self.norm_ff(x))  # [B, T, D]


class FlamingoLayer(nn.Module):
    """An LM decoder layer with a gated cross-attention block before it (None: the layer alone).
    The media are set with :meth:`condition` before the LM's forward and cleared after it."""

    def __init__(self, decoder_layer: nn.Module, xattn: GatedCrossAttention | None) -> None:
        super().__init__()
        self.decoder_layer = decoder_layer
        self.xattn = xattn
        self.media: tuple[Tensor, Tensor, Tensor | None] | None = None

    def __getattr__(self, name: str) -> Any:  # the LM may read its layers' attributes (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("decoder_layer"), name)

    def condition(self, media: Tensor | None, times: Tensor | None = None, media_mask: Tensor | None = None) -> None:
        self.media = None if media is None else (media, times, media_mask)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.xattn is not None and self.media is not None:
            media, times, media_mask = self.media
            hidden_states = self.xattn(hidden_states, media, times[:, -hidden_states.shape[1]:], media_mask)
        return self.decoder_layer(hidden_states, *args, **kwargs)


def find_decoder_layers(model: nn.Module, name: str | None = None) -> str:
    """Dotted name of the LM's decoder-layer list: ``name`` (such as ``model.layers``) when given and
    valid, else the one :class:`torch.nn.ModuleList` as long as the config's number of layers
    (``num_hidden_layers``, ``n_layer`` or ``num_layers``)."""
    if name is not None:
        try:
            found = model.get_submodule(name)
        except AttributeError as exc:
            raise UserError(f"decoder_layers={name!r}: the language model has no such module ({exc})") from None
        if not isinstance(found, nn.ModuleList):
            raise UserError(f"decoder_layers={name!r} is a {type(found).__name__}, not a list of decoder layers")
        return name
    config = getattr(model, "config", None)
    count = next((getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if getattr(config, k, None)), None)
    lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and count and len(m) == count]
    if len(lists) != 1:
        raise UserError(
            f"cannot tell the language model's decoder layers from its config ({len(lists)} lists of {count} "
            "modules); give them by name, e.g. decoder_layers: model.layers (Llama), model.decoder.layers (OPT), "
            "transformer.h (GPT-2)"
        )
    return lists[0]


def wrap_decoder_layers(model: nn.Module, name: str, make_block: Any) -> nn.ModuleList:
    """Replace the decoder-layer list ``name`` of ``model`` by :class:`FlamingoLayer` s, layer i with
    the block ``make_block(i)`` (or None) before it; returns the new list."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    wrapped = nn.ModuleList(FlamingoLayer(layer, make_block(i)) for i, layer in enumerate(getattr(parent, attr)))
    setattr(parent, attr, wrapped)
    return wrapped
