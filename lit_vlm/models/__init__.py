"""Families: one LightningModule per file.

- :class:`CLIP` (``clip.py``): the contrastive dual encoder and its variants as options: SigLIP
  (``loss="siglip"``), focal contrastive (``loss="focal"``), LiT (``lock_image``), FLIP (patch
  dropout + ``unmasked_tuning_steps``); ``accum_freq`` for exact contrastive gradient accumulation.
- :class:`FILIP` (``filip.py``): CLIP with token-wise late interaction.
"""

from lit_vlm.models.base import VLMModule
from lit_vlm.models.clip import CLIP
from lit_vlm.models.filip import FILIP

__all__ = ["VLMModule", "CLIP", "FILIP"]
