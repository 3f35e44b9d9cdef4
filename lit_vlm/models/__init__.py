"""Families: one LightningModule per file."""

from lit_vlm.models.base import VLMModule
from lit_vlm.models.clip import CLIP

__all__ = ["VLMModule", "CLIP"]
