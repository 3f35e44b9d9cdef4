"""Shared neural-network building blocks (plain ``torch.nn``, no Lightning)."""

from .convnet import ConvNet, GlobalBatchNorm2d
from .decoder import DecoderBlock, DecoderCache, DecoderOutput, TextDecoder
from .media import AudioOutput, AudioTransformer, TemporalHead
from .perceiver import FlamingoLayer, GatedCrossAttention, PerceiverResampler
from .presets import CLIP_PRESETS, TEXT_PRESETS, VISION_PRESETS, resolve_preset
from .qformer import QFormer
from .text import TextOutput, TextTransformer, trim_padding
from .transformer import (
    MLP,
    Attention,
    AttentionalPooler,
    Block,
    CrossAttention,
    LayerScale,
    QuickGELU,
    Transformer,
    make_activation,
)
from .vision import VisionOutput, VisionTransformer, interpolate_pos_embed, random_masking

__all__ = [
    "Attention",
    "AudioOutput",
    "AudioTransformer",
    "TemporalHead",
    "AttentionalPooler",
    "Block",
    "CLIP_PRESETS",
    "ConvNet",
    "CrossAttention",
    "DecoderBlock",
    "DecoderCache",
    "DecoderOutput",
    "FlamingoLayer",
    "GatedCrossAttention",
    "GlobalBatchNorm2d",
    "LayerScale",
    "MLP",
    "PerceiverResampler",
    "QFormer",
    "QuickGELU",
    "TEXT_PRESETS",
    "TextDecoder",
    "TextOutput",
    "TextTransformer",
    "Transformer",
    "VISION_PRESETS",
    "VisionOutput",
    "VisionTransformer",
    "interpolate_pos_embed",
    "random_masking",
    "make_activation",
    "resolve_preset",
    "trim_padding",
]
