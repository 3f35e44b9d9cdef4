"""CLIP (Radford et al., 2021): a contrastive dual encoder.

image tower -> pooled [B, Wv] -> linear projection -> L2 norm -> image embedding [B, E]
text tower  -> pooled [B, Wt] (end-of-text token) -> linear projection -> L2 norm -> text embedding [B, E]
loss = symmetric InfoNCE on exp(t) * cosine similarities, t learnable (init log(1/0.07), exp(t) <= 100).

Under DDP each rank scores its local rows against the embeddings gathered from every rank (with
gradients), so the loss and gradients are those of one process holding the whole global batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lit_vlm.losses import clip_loss
from lit_vlm.models.base import VLMModule
from lit_vlm.modules import TextTransformer, VisionTransformer


class CLIP(VLMModule):
    """CLIP dual encoder trained with the symmetric contrastive (InfoNCE) loss.

    Args:
        vision: The image tower (its pooled output is projected). Its ``image_size`` is taken
            from the data when left unset.
        text: The text tower (pooled at the end-of-text token). Its ``vocab_size`` and
            ``context_length`` are taken from the data's tokenizer when left unset.
        embed_dim: Dimension of the joint embedding space.
        init_logit_scale: Initial value of the learnable log temperature t (logits are
            exp(t) * cosine similarity); log(1/0.07) as in the paper.
        max_logit_scale: Upper clamp of exp(t), applied after every optimiser step (100 in the paper).
        learn_logit_scale: Train t; False keeps it fixed at ``init_logit_scale``.
        lr: Peak learning rate of AdamW (reached after warmup).
        weight_decay: Decoupled weight decay on weight matrices.
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: Linear warmup in optimiser steps, or a fraction of all steps if in (0, 1).
        min_lr_ratio: Final learning rate of the cosine decay as a fraction of ``lr``.
    """

    def __init__(
        self,
        vision: VisionTransformer,
        text: TextTransformer,
        embed_dim: int = 512,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = 100.0,
        learn_logit_scale: bool = True,
        lr: float = 5e-4,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: float = 0.05,
        min_lr_ratio: float = 0.0,
    ) -> None:
        super().__init__(lr, weight_decay, betas, eps, warmup_steps, min_lr_ratio)
        self.save_config()
        self.vision = vision
        self.text = text
        self.image_projection = nn.Linear(vision.width, embed_dim, bias=False)
        self.text_projection = nn.Linear(text.width, embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=vision.width**-0.5)
        nn.init.normal_(self.text_projection.weight, std=text.width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)), requires_grad=learn_logit_scale)
        self.max_log_scale = math.log(max_logit_scale)

    # ---- capabilities used by the evaluation callbacks ---------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images [B, 3, H, W] -> embeddings [B, E] (L2-normalised unless ``normalize=False``)."""
        emb = self.image_projection(self.vision(images).pooled)  # [B, E]
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
        """ids [N, L], mask [N, L] -> embeddings [N, E] (L2-normalised unless ``normalize=False``).

        Padding columns after the longest sequence are dropped first: with right padding the
        pooled output is unchanged and the tower does less work on short captions.
        """
        if mask is not None and mask.shape[1] > 1:
            length = int(mask.any(dim=0).nonzero().max()) + 1 if bool(mask.any()) else 1
            ids, mask = ids[:, :length], mask[:, :length]  # [N, l]
        emb = self.text_projection(self.text(ids, mask).pooled)  # [N, E]
        return F.normalize(emb, dim=-1) if normalize else emb

    # ---- training --------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        image_emb = self.encode_image(batch["image"])  # [B, E]
        text_emb = self.encode_text(batch["text_ids"], batch["text_mask"])  # [B, E]
        # Gather across ranks only in training, where every rank has the same batch size.
        terms = clip_loss(image_emb, text_emb, self.logit_scale.exp(), gather=self.training)
        terms["logit_scale"] = self.logit_scale.exp().detach()
        return terms

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self(batch)
        self.log_terms("train", terms, batch_size=batch["image"].shape[0])
        return terms["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0, self.max_log_scale)  # exp(t) <= max_logit_scale

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        terms = self(batch)
        self.log_terms("val", {k: terms[k] for k in ("loss", "acc_i2t", "acc_t2i")}, batch["image"].shape[0], sync_dist=True)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        terms = self(batch)
        self.log_terms("test", {k: terms[k] for k in ("loss", "acc_i2t", "acc_t2i")}, batch["image"].shape[0], sync_dist=True)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Embeddings of the batch's images and (first) captions, keyed by sample id."""
        return {
            "sample_id": batch["sample_id"],
            "image_emb": self.encode_image(batch["image"]),
            "text_emb": self.encode_text(batch["text_ids"], batch["text_mask"]),
        }
