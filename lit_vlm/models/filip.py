"""FILIP (Yao et al., 2022, "FILIP: Fine-grained Interactive Language-Image Pre-Training").

The CLIP dual encoder, compared token by token instead of through one pooled vector:

image tower -> patch tokens [B, P, Wv] (class token dropped) -> image projection -> L2 norm per token
text tower  -> tokens [B, L, Wt] (padding and the start token dropped) -> text projection -> L2 norm per token
s_i2t(i, j) = mean over the patches of image i of the best cosine with any token of text j
s_t2i(i, j) = mean over the tokens of text j of the best cosine with any patch of image i
loss = InfoNCE over exp(t) * s_i2t (image -> text) and exp(t) * s_t2i (text -> image)  (paper eq. 4-5)

Token choices:
- Image: the patch tokens after ``ln_post``; the class token is left out (it summarises the image
  rather than describing a region, and is not trained by the token-wise loss). With FLIP patch
  dropout only the kept patches take part.
- Text: every real token except position 0 (``exclude_first_token``): with a causal tower the
  start token sees nothing but itself, so its feature is the same for every caption and would add
  a caption-independent score. The end-of-text token is kept: it is the only one that has read the
  whole caption. Padding never takes part.

Evaluation: retrieval ranks with the token-wise similarities (``similarity``: ``s_i2t`` for image ->
text, ``s_t2i`` for text -> image, as in training); the retrieval callback picks that capability up.
Zero-shot classification and ``predict`` use the pooled ``encode_image`` / ``encode_text``: the
mean of a sample's normalised token features, renormalised. That is a cheap global summary of the
same token space (the dot product of two means is the mean of all token-pair cosines), not the
late interaction itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lit_vlm.errors import UserError
from lit_vlm.metrics import in_batch_accuracy
from lit_vlm.models.clip import CLIP
from lit_vlm.modules import TextTransformer, VisionTransformer, trim_padding


class FILIP(CLIP):
    """FILIP: CLIP with token-wise late interaction (see the module docstring).

    Every option of :class:`CLIP` applies (LiT locking, FLIP patch dropout, ``accum_freq``,
    ``init_from``, ...) except ``loss``, which is FILIP's own.

    Args:
        vision: The image tower; its patch tokens are used (pool must not be "attn", whose
            pooler the token-wise loss would never train).
        text: The text tower; its per-position tokens are used.
        exclude_first_token: Leave position 0 (the tokenizer's start token) out of the text's
            tokens; set False for a tokenizer without a start token.
        **kwargs: The other arguments of :class:`CLIP` (embed_dim, lr, lock_image, ...).
    """

    def __init__(
        self,
        vision: VisionTransformer,
        text: TextTransformer,
        exclude_first_token: bool = True,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("loss", "clip") != "clip":
            raise UserError(f"model loss={kwargs['loss']!r}: FILIP trains with its own token-wise loss; leave loss unset")
        if getattr(vision, "pool", None) == "attn":
            raise UserError("FILIP uses the image tower's patch tokens: pool='attn' would leave its pooler untrained")
        super().__init__(vision, text, **kwargs)
        self.exclude_first_token = exclude_first_token

    # ---- token features ----------------------------------------------------------------------
    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images [B, 3, H, W] -> (normalised patch-token features [B, P, E], mask None: all valid)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._image_needs_grad):
            patches = self._vision(images).tokens[:, 1:]  # [B, P, Wv] (class token dropped)
            tokens = self.image_projection(patches)  # [B, P, E]
        return F.normalize(tokens, dim=-1), None

    def encode_text_tokens(
        self, ids: torch.Tensor, mask: torch.Tensor | None = None, trim: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [N, L], mask [N, L] -> (normalised token features [N, l, E], mask [N, l] of the
        tokens that take part); ``l`` is the longest caption's length with ``trim``, else L."""
        if mask is None:
            mask = ids != getattr(self.text, "pad_id", 0)  # [N, L]
        mask = mask.bool()
        if trim:
            ids, mask = trim_padding(ids, mask)  # [N, l]
        tokens = F.normalize(self.text_projection(self.text(ids, mask).tokens), dim=-1)  # [N, l, E]
        keep = mask.clone()  # [N, l]
        if self.exclude_first_token and keep.shape[1] > 1:
            keep[:, 0] = False
            alone = ~keep.any(dim=1)  # [N] rows whose only real token was the first
            keep[:, 0] = mask[:, 0] & alone
        return tokens, keep

    def similarity(
        self,
        image_tokens: torch.Tensor,  # [I, P, E]
        image_mask: torch.Tensor | None,  # [I, P] or None
        text_tokens: torch.Tensor,  # [T, L, E]
        text_mask: torch.Tensor,  # [T, L]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-wise late interaction: (s_i2t [I, T] for image -> text, s_t2i [I, T] for text -> image)."""
        from lit_vlm.losses import filip_similarity

        return filip_similarity(image_tokens, text_tokens, text_mask, image_mask)

    # ---- pooled embeddings (zero-shot, predict) ---------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images -> [B, E]: the mean of the normalised patch-token features (renormalised)."""
        tokens, _ = self.encode_image_tokens(images)  # [B, P, E]
        emb = tokens.mean(dim=1)  # [B, E]
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
        """ids, mask -> [N, E]: the mean of the normalised features of the tokens that take part."""
        tokens, keep = self.encode_text_tokens(ids, mask)  # [N, l, E], [N, l]
        w = keep.unsqueeze(-1).to(tokens.dtype)  # [N, l, 1]
        emb = (tokens * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)  # [N, E]
        return F.normalize(emb, dim=-1) if normalize else emb

    # ---- training ------------------------------------------------------------------------------
    def features(self, batch: dict) -> dict[str, torch.Tensor | None]:
        """{"image_tokens": [B, P, E], "text_tokens": [B, L, E], "text_mask": [B, L]}; texts keep the
        batch's (fixed) length L, which ``filip_loss`` needs equal on every rank under DDP."""
        image_tokens, _ = self.encode_image_tokens(batch["image"])
        text_tokens, text_mask = self.encode_text_tokens(batch["text_ids"], batch["text_mask"], trim=False)
        out = {"image_tokens": image_tokens, "text_tokens": text_tokens, "text_mask": text_mask}
        if "negative_ids" in batch:  # the data's hard_negatives = K
            b, k, length = batch["negative_ids"].shape
            tokens, mask = self.encode_text_tokens(batch["negative_ids"].reshape(b * k, length),
                                                   batch["negative_mask"].reshape(b * k, length), trim=False)  # [B*K, L, E]
            out["negative_tokens"] = tokens.view(b, k, length, -1)  # [B, K, L, E]
            out["negative_token_mask"] = mask.view(b, k, length)  # [B, K, L]
            out["negative_valid"] = batch["negative_valid"]  # [B, K]
        return out

    def loss_from_features(
        self, features: dict[str, torch.Tensor | None], gather: bool = True, detach_scalars: bool = False
    ) -> dict[str, torch.Tensor]:
        """FILIP's loss (``lit_vlm.losses.filip_loss``) of token features (see :meth:`features`)."""
        from lit_vlm.losses import filip_loss, filip_similarity

        scale, _ = self._scalars(detach_scalars)
        image_tokens, text_tokens, text_mask = features["image_tokens"], features["text_tokens"], features["text_mask"]
        terms = filip_loss(image_tokens, text_tokens, text_mask, scale, gather=gather,
                           negative_tokens=features.get("negative_tokens"), negative_mask=features.get("negative_token_mask"),
                           negative_valid=features.get("negative_valid"))
        if "acc_i2t" not in terms or "acc_t2i" not in terms:
            with torch.no_grad():
                sim_i2t, sim_t2i = filip_similarity(image_tokens, text_tokens, text_mask)  # [B, B] each
                terms["acc_i2t"] = in_batch_accuracy(sim_i2t)["acc_i2t"]
                terms["acc_t2i"] = in_batch_accuracy(sim_t2i)["acc_t2i"]
        terms["logit_scale"] = scale.detach()
        return terms
