"""Binding new modalities to a frozen image-text model: ImageBind (Girdhar et al., 2023) and
LanguageBind (Zhu et al., 2024).

frozen anchor (a lit-vlm CLIP run: image tower + projection, text tower + projection)
audio [B, A, 1, M, F] -> AudioTransformer -> audio projection -> L2 norm -> mean over the A clips -> L2 norm
video [B, C, T, 3, H, W] -> frozen image tower per frame ->
    anchor "image" (or video not bound): the anchor's image projection, L2 norm, mean over the real
        frames and clips (ImageBind: no new weights)
    video bound (anchor "text"): TemporalHead over the frames -> video projection -> L2 norm -> mean over clips -> L2 norm
loss = sum over the bound modalities of symmetric InfoNCE, each with its own learnable temperature:
    anchor "image" (ImageBind): audio against the anchor's embedding of the clip's frames;
    anchor "text" (LanguageBind): audio against its audio caption, video against its caption.
The anchor stays frozen, so everything bound to it lands in one space: audio can be compared with
text and images it never saw beside it (ImageBind's emergent retrieval and zero-shot audio).
The anchor's weights come from ``init_from`` (a CLIP run) with ``init_from_parts: [vision, text,
image_projection, text_projection]``.
LoRA (LanguageBind's tuning): ``frame_tuning: lora`` puts adapters on the image tower for the video
path only (the anchor's image embedding runs without them); ``audio_tuning: lora`` adapts a trained
audio tower (from ``init_from``, e.g. a binding run) instead of training all of it.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from lit_vlm.errors import UserError
from lit_vlm.losses import clip_loss
from lit_vlm.models.base import VLMModule
from lit_vlm.modules import AudioTransformer, ConvNet, TemporalHead, TextTransformer, VisionTransformer, trim_padding
from lit_vlm.modules.freeze import LORA_KEYS, adapters_off, add_tower_lora, lock

ANCHORS = ("image", "text")
MODALITIES = ("audio", "video")
AUDIO_TUNING = ("full", "lora")
FRAME_TUNING = ("frozen", "lora")


class Binding(VLMModule):
    """Audio and video bound to a frozen image-text model (see the module docstring).

    Args:
        vision: The anchor's image tower (frozen; weights from ``init_from``).
        text: The anchor's text tower (frozen; weights from ``init_from``).
        audio: The audio tower; None when audio is not bound.
        embed_dim: The anchor's embedding dimension.
        anchor: ``image`` (ImageBind) or ``text`` (LanguageBind).
        modalities: What is trained: ``audio``, and ``video`` with ``anchor: text`` (with
            ``anchor: image`` video is the anchor's image embedding of its frames, untrained).
        temporal: ``mean`` or ``transformer``: how the video head pools the frames (``anchor: text``).
        temporal_layers: Blocks of the temporal transformer.
        init_logit_scale: Initial log temperature of each bound modality (CLIP's log(1/0.07)).
        max_logit_scale: Upper clamp of each exp(t).
        audio_tuning: ``full`` (every weight of the audio tower trains) or ``lora`` (adapters on a
            tower loaded by ``init_from``; its own weights frozen).
        frame_tuning: ``frozen`` or ``lora``: adapters on the image tower, used by the video path
            only (``modalities`` with ``video``); the anchor's image embedding runs without them.
        lora: LoRA options: ``rank`` (8), ``alpha`` (16), ``dropout`` (0), ``target_modules``
            (default: every linear and convolution layer of the tower).

    Optimiser and ``init_from`` arguments are :class:`VLMModule`'s (lr 5e-4, weight decay 0.2).
    """

    couples_batch = True
    eval_terms = ("loss",)  # the per-modality terms are training diagnostics; evaluation is the callbacks'

    def __init__(self, vision: VisionTransformer | ConvNet, text: TextTransformer, audio: AudioTransformer | None = None,
                 embed_dim: int = 512, anchor: str = "image", modalities: list[str] = ["audio"],
                 temporal: str = "transformer", temporal_layers: int = 1, init_logit_scale: float = math.log(1 / 0.07),
                 max_logit_scale: float = 100.0, audio_tuning: str = "full", frame_tuning: str = "frozen",
                 lora: dict | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if anchor not in ANCHORS:
            raise UserError(f"model anchor must be one of {ANCHORS}, got {anchor!r}")
        modalities = list(modalities)
        if not modalities or set(modalities) - set(MODALITIES):
            raise UserError(f"model modalities must be among {MODALITIES}, got {modalities}")
        if "audio" in modalities and audio is None:
            raise UserError("model modalities has audio: give the model an audio tower (audio: AudioTransformer)")
        if "video" in modalities and anchor == "image":
            raise UserError("model modalities: video is bound with anchor: text (with anchor: image, video is the anchor's "
                            "image embedding of its frames, as in ImageBind; nothing to train)")
        self._check_tuning(audio_tuning, frame_tuning, lora, modalities)
        self.anchor, self.modalities = anchor, modalities
        self.audio_tuning, self.frame_tuning = audio_tuning, frame_tuning
        self.vision, self.text = vision, text
        self.image_projection = nn.Linear(vision.width, embed_dim, bias=False)
        self.text_projection = nn.Linear(text.width, embed_dim, bias=False)
        lock([self.vision, self.text, self.image_projection, self.text_projection], what="model anchor")
        self.audio = audio
        if audio is not None:
            self.audio_projection = nn.Linear(audio.width, embed_dim, bias=False)
            nn.init.normal_(self.audio_projection.weight, std=audio.width**-0.5)
            self.audio_logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        if "video" in modalities:
            self.video_temporal = TemporalHead(vision.width, temporal, layers=temporal_layers)
            self.video_projection = nn.Linear(vision.width, embed_dim, bias=False)
            nn.init.normal_(self.video_projection.weight, std=vision.width**-0.5)
            self.video_logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.max_log_scale = math.log(max_logit_scale)
        if frame_tuning == "lora":
            add_tower_lora(self.vision, **(lora or {}), what="model lora (frame_tuning)")
        if audio_tuning == "lora":
            add_tower_lora(self.audio, **(lora or {}), what="model lora (audio_tuning)")

    def _check_tuning(self, audio_tuning: str, frame_tuning: str, lora: dict | None, modalities: list[str]) -> None:
        if audio_tuning not in AUDIO_TUNING or frame_tuning not in FRAME_TUNING:
            raise UserError(f"model audio_tuning must be one of {AUDIO_TUNING} and frame_tuning one of {FRAME_TUNING}, "
                            f"got {audio_tuning!r} and {frame_tuning!r}")
        unknown = sorted(set(lora or {}) - set(LORA_KEYS))
        if unknown:
            raise UserError(f"model lora: unknown option(s) {unknown}; valid: {list(LORA_KEYS)}")
        if lora and "lora" not in (audio_tuning, frame_tuning):
            raise UserError("model lora options are set but neither audio_tuning nor frame_tuning is lora")
        if frame_tuning == "lora" and "video" not in modalities:
            raise UserError("model frame_tuning: lora adapts the image tower for the video path: bind video "
                            "(anchor: text, modalities: [audio, video] or [video])")
        if audio_tuning == "lora":
            parts = self.init_from_parts
            if "audio" not in modalities or self.init_from is None or (parts is not None and "audio" not in parts):
                raise UserError("model audio_tuning: lora adapts a trained audio tower: bind audio, set init_from to a "
                                "run that has one (a binding run) and include audio in init_from_parts; to train the "
                                "tower from scratch use audio_tuning: full")

    # ---- the anchor (frozen) --------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images [B, 3, H, W] -> the anchor's embeddings [B, E] (without the video path's adapters)."""
        with adapters_off(self.vision) if self.frame_tuning == "lora" else nullcontext():
            emb = self.image_projection(self.vision(images).pooled)  # [B, E]
        return F.normalize(emb, dim=-1) if normalize else emb

    @torch.no_grad()
    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
        """ids [N, L], mask [N, L] -> the anchor's embeddings [N, E]."""
        ids, mask = trim_padding(ids, mask)  # [N, l]
        emb = self.text_projection(self.text(ids, mask).pooled)  # [N, E]
        return F.normalize(emb, dim=-1) if normalize else emb

    # ---- the bound modalities -------------------------------------------------------------------
    def encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [B, A, 1, M, F] (A clips) -> [B, E]: each clip embedded, their mean re-normalised."""
        b, a = audio.shape[:2]
        emb = F.normalize(self.audio_projection(self.audio(audio.flatten(0, 1)).pooled), dim=-1)  # [B*A, E]
        return F.normalize(emb.view(b, a, -1).mean(1), dim=-1)  # [B, E]

    def encode_video(self, video: torch.Tensor, video_mask: torch.Tensor | None = None) -> torch.Tensor:
        """video [B, C, T, 3, H, W], video_mask [B, C, T] (real frames) -> [B, E]."""
        b, c, t = video.shape[:3]
        mask = video_mask if video_mask is not None else torch.ones(b, c, t, dtype=torch.bool, device=video.device)
        with torch.no_grad() if self.frame_tuning == "frozen" else nullcontext():  # LoRA: the adapters learn
            frames = self.vision(video.flatten(0, 2)).pooled.view(b * c, t, -1)  # [B*C, T, W]
        if "video" not in self.modalities:  # ImageBind (or video not bound): the anchor's embedding of the frames, averaged
            emb = F.normalize(self.image_projection(frames), dim=-1)  # [B*C, T, E]
            weights = mask.view(b * c, t, 1).float()
            clips = F.normalize((emb * weights).sum(1) / weights.sum(1).clamp_min(1), dim=-1)  # [B*C, E]
        else:
            clips = F.normalize(self.video_projection(self.video_temporal(frames, mask.view(b * c, t))), dim=-1)  # [B*C, E]
        return F.normalize(clips.view(b, c, -1).mean(1), dim=-1)  # [B, E]

    # ---- training -------------------------------------------------------------------------------
    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        """Each bound modality's embeddings and their anchors: {"audio", "audio_anchor", "video",
        "video_anchor"}, each [B, E] (only the bound ones)."""
        out = {}
        if "audio" in self.modalities:
            out["audio"] = self.encode_audio(batch["audio"])  # [B, E]
            out["audio_anchor"] = (self.encode_video(batch["video"], batch.get("video_mask")) if self.anchor == "image"
                                   else self.encode_text(batch["audio_text_ids"], batch["audio_text_mask"]))  # [B, E]
        if "video" in self.modalities:
            out["video"] = self.encode_video(batch["video"], batch.get("video_mask"))  # [B, E]
            out["video_anchor"] = self.encode_text(batch["text_ids"], batch["text_mask"])  # [B, E]
        return out

    def loss_from_features(self, features: dict[str, torch.Tensor], gather: bool = True,
                           detach_scalars: bool = False) -> dict[str, torch.Tensor]:
        """The sum of each bound modality's InfoNCE against its anchor; its terms as ``<modality>/*``."""
        terms, loss = {}, 0.0
        for name in self.modalities:
            scale = getattr(self, f"{name}_logit_scale").exp()  # []
            part = clip_loss(features[name], features[f"{name}_anchor"], scale.detach() if detach_scalars else scale,
                             gather=gather)
            terms.update({f"{name}/{k}": v for k, v in part.items()})
            terms[f"{name}/logit_scale"] = scale.detach()
            loss = loss + part["loss"]
        return {"loss": loss, **terms}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        # Gather across ranks only in training, where every rank has the same batch size.
        return self.loss_from_features(self.features(batch), gather=self.training)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        with torch.no_grad():
            for name in ("audio_logit_scale", "video_logit_scale"):
                if hasattr(self, name):
                    getattr(self, name).clamp_(0, self.max_log_scale)

    def on_train_start(self) -> None:
        self.train(True)  # the locked anchor back to eval mode

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        out = {"sample_id": batch["sample_id"]}
        if "audio" in batch and self.audio is not None:
            out["audio_emb"] = self.encode_audio(batch["audio"])
        if "video" in batch:
            out["video_emb"] = self.encode_video(batch["video"], batch.get("video_mask"))
        return out
