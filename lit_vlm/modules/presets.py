"""Named tower sizes, from tiny (unit tests) to the published CLIP shapes.

A preset is a plain dict of constructor values. ``resolve_preset`` merges a preset with explicit
overrides (an override of None means "keep the preset value").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lit_vlm.errors import UserError

VISION_PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: 4x4 grid of 8px patches
    "tiny": dict(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=4.0),
    # laptop-CPU quickstart: 8x8 grid
    "small": dict(image_size=64, patch_size=8, width=192, layers=6, heads=6, mlp_ratio=4.0),
    # published CLIP / ViT shapes
    "B/32": dict(image_size=224, patch_size=32, width=768, layers=12, heads=12, mlp_ratio=4.0),
    "B/16": dict(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_ratio=4.0),
    "L/14": dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16, mlp_ratio=4.0),
    "L/14-336": dict(image_size=336, patch_size=14, width=1024, layers=24, heads=16, mlp_ratio=4.0),
}

TEXT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=1000, context_length=16, width=32, layers=2, heads=2, mlp_ratio=4.0),
    # vocab_size None: taken from the tokenizer, the caller must pass it
    "small": dict(vocab_size=None, context_length=32, width=192, layers=4, heads=6, mlp_ratio=4.0),
    # CLIP text towers (ViT-B/* and ViT-L/14 CLIP models)
    "clip-B": dict(vocab_size=49408, context_length=77, width=512, layers=12, heads=8, mlp_ratio=4.0),
    "clip-L": dict(vocab_size=49408, context_length=77, width=768, layers=12, heads=12, mlp_ratio=4.0),
}

# Whole published CLIP models: the tower presets, the joint embedding width and the MLP
# activation. Shapes as in OpenAI's model card / open_clip's model configs: ViT-B/32 and B/16 pair a
# 768-wide 12-layer image tower with the 512-wide 12-layer, 8-head text tower (embed 512);
# ViT-L/14 (224 or 336 px) pairs a 1024-wide 24-layer 16-head image tower with the 768-wide
# 12-layer 12-head text tower (embed 768); heads = width // 64 throughout; context 77,
# vocabulary 49408. Names follow their owners: OpenAI's spellings ("ViT-B/32") are OpenAI's
# QuickGELU releases; open_clip's ("ViT-B-32") are open_clip's configs, which use exact GELU
# (e.g. the LAION-2B ViT-B-32), and its "-quickgelu" names the QuickGELU variants.
_SHAPES = {
    "B/32": dict(vision="B/32", text="clip-B", embed_dim=512),
    "B/16": dict(vision="B/16", text="clip-B", embed_dim=512),
    "L/14": dict(vision="L/14", text="clip-L", embed_dim=768),
    "L/14-336": dict(vision="L/14-336", text="clip-L", embed_dim=768),
}
_NAMES = {  # shape: (OpenAI name, open_clip name)
    "B/32": ("ViT-B/32", "ViT-B-32"), "B/16": ("ViT-B/16", "ViT-B-16"),
    "L/14": ("ViT-L/14", "ViT-L-14"), "L/14-336": ("ViT-L/14@336px", "ViT-L-14-336"),
}
CLIP_PRESETS: dict[str, dict[str, Any]] = {}
for _shape, (_openai, _open_clip) in _NAMES.items():
    CLIP_PRESETS[_openai] = {**_SHAPES[_shape], "act_layer": "quick_gelu"}
    CLIP_PRESETS[_open_clip] = {**_SHAPES[_shape], "act_layer": "gelu"}
    CLIP_PRESETS[f"{_open_clip}-quickgelu"] = {**_SHAPES[_shape], "act_layer": "quick_gelu"}


def resolve_preset(presets: Mapping[str, Mapping[str, Any]], name: str | None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Return the preset ``name`` updated with the non-None entries of ``overrides``.

    Args:
        presets: Table of named presets (e.g. ``VISION_PRESETS``).
        name: Preset name, or None to start from an empty dict (every value then comes from
            ``overrides``).
        overrides: Explicit values; None entries are ignored so that unset constructor arguments
            keep the preset value.

    Raises:
        ValueError: if ``name`` is not a key of ``presets`` (the message lists the valid names).
    """
    if name is None:
        config: dict[str, Any] = {}
    elif name in presets:
        config = dict(presets[name])
    else:
        valid = ", ".join(repr(k) for k in presets)
        raise UserError(f"unknown preset {name!r}; valid presets: {valid} (or None to give every size explicitly)")
    for key, value in (overrides or {}).items():
        if value is not None:
            config[key] = value
    return config


def require(config: Mapping[str, Any], keys: list[str], preset: str | None, what: str) -> None:
    """Raise a ValueError naming every key of ``keys`` that is missing or None in ``config``."""
    missing = [k for k in keys if config.get(k) is None]
    if missing:
        source = f"preset {preset!r} does not set them" if preset is not None else "no preset was given"
        raise UserError(f"{what}: {', '.join(missing)} must be given ({source})")
