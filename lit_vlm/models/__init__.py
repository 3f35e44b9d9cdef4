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
- :class:`LLaVA` (``llava.py``): a frozen image tower's features projected into a frozen (or
  LoRA / fully tuned) Hugging Face LM at ``<image>``; stage 1 and 2 as configs. Its LM handling
  (dtype, LoRA, checkpoints of what trains) is :class:`~lit_vlm.models.bridge.Bridge`'s.
- :class:`BLIP2` (``blip2.py``): a Q-Former over a frozen image tower; stage 1 ITC, ITM, ITG,
  stage 2 a soft prompt to a frozen Hugging Face LM.
- :class:`ClipCap` (``clipcap.py``) and :class:`Frozen` (``frozen.py``): image embeddings mapped to
  a prefix of a frozen (ClipCap: or tuned) Hugging Face LM, trained on captions.
- :class:`Flamingo` (``flamingo.py``): a Perceiver resampler and gated cross-attention blocks
  inserted into a frozen Hugging Face LM, trained on interleaved documents.
- :class:`LanguageModel` (``lm.py``): a ``transformers`` causal LM trained from scratch on the
  world's text and written as a Hugging Face folder: the bridges' embedded frozen LM.
- :class:`VideoChat` (``videochat.py``): Video-ChatGPT: a frozen image tower's frame features pooled
  over time and over space, projected into a frozen LM (LLaVA's machinery).
- :class:`Binding` (``binding.py``): ImageBind / LanguageBind: audio and video towers bound to a
  frozen image-text model (image- or text-anchored InfoNCE).
"""

from lit_vlm.models.base import VLMModule
from lit_vlm.models.binding import Binding
from lit_vlm.models.blip import BLIP
from lit_vlm.models.blip2 import BLIP2
from lit_vlm.models.clip import CLIP
from lit_vlm.models.clipcap import ClipCap
from lit_vlm.models.coca import CoCa
from lit_vlm.models.filip import FILIP
from lit_vlm.models.flamingo import Flamingo
from lit_vlm.models.flava import FLAVA
from lit_vlm.models.frozen import Frozen
from lit_vlm.models.llava import LLaVA
from lit_vlm.models.lm import LanguageModel
from lit_vlm.models.mae import MAE
from lit_vlm.models.prefixlm import PrefixLM
from lit_vlm.models.videochat import VideoChat

__all__ = ["VLMModule", "BLIP", "Binding", "BLIP2", "CLIP", "ClipCap", "CoCa", "FILIP", "FLAVA", "Flamingo", "Frozen", "LLaVA", "LanguageModel", "MAE", "PrefixLM", "VideoChat"]
