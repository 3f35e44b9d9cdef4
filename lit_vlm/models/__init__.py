"""Families: one LightningModule per file.

- :class:`CLIP` (``clip.py``): the contrastive dual encoder and its variants as options: SigLIP
  (``loss="siglip"``), focal contrastive (``loss="focal"``), LiT (``lock_image``), FLIP (patch
  dropout + ``unmasked_tuning_steps``); ``accum_freq`` for exact contrastive gradient accumulation.
- :class:`FILIP` (``filip.py``): CLIP with token-wise late interaction.
- :class:`FLAVA` (``flava.py``): image, text and multimodal encoders with global contrastive, MIM,
  MLM, multimodal masked modelling and ITM losses, each weighted and switchable.
- :class:`MAE` (``mae.py``): masked-autoencoder pre-training of the shared ViT image tower.
- :class:`PrefixLM` (``prefixlm.py``): SimVLM prefix language modelling over image tokens and text.
- :class:`BLIP` (``blip.py``): multimodal mixture of encoder-decoder with ITC (momentum encoders,
  queues, momentum distillation), ITM on hard negatives and LM; ``score_pairs`` for ITM re-ranking.
- :class:`CoCa` (``coca.py``): contrastive captioner (attentional poolers, unimodal + multimodal
  decoder layers, contrastive + captioning loss); ``generate`` for captioning and VQA.
"""

from lit_vlm.models.base import VLMModule
from lit_vlm.models.blip import BLIP
from lit_vlm.models.clip import CLIP
from lit_vlm.models.coca import CoCa
from lit_vlm.models.filip import FILIP
from lit_vlm.models.flava import FLAVA
from lit_vlm.models.mae import MAE
from lit_vlm.models.prefixlm import PrefixLM

__all__ = ["VLMModule", "BLIP", "CLIP", "CoCa", "FILIP", "FLAVA", "MAE", "PrefixLM"]
