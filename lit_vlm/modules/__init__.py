"""Shared neural-network building blocks (plain ``torch.nn``, no Lightning)."""

from .presets import TEXT_PRESETS, VISION_PRESETS, resolve_preset
from .text import TextOutput, TextTransformer
from .transformer import MLP, Attention, AttentionalPooler, Block, CrossAttention, LayerScale, Transformer
from .vision import VisionOutput, VisionTransformer, interpolate_pos_embed

__all__ = [
    "Attention",
    "AttentionalPooler",
    "Block",
    "CrossAttention",
    "LayerScale",
    "MLP",
    "TEXT_PRESETS",
    "TextOutput",
    "TextTransformer",
    "Transformer",
    "VISION_PRESETS",
    "VisionOutput",
    "VisionTransformer",
    "interpolate_pos_embed",
    "resolve_preset",
]
