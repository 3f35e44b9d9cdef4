"""FLAVA: A Foundational Language And Vision Alignment Model (Singh et al., 2022).

image tower (ViT)        -> image tokens [B, 1+N, Dv] --+--> global contrastive (class token)
text tower (bidirectional) -> text tokens [B, L, Dt] ---+--> multimodal encoder over
                                                              [CLS_mm, image tokens, text tokens] -> ITM

Five losses, each with its own weight; a weight of 0 switches the loss (and its computation) off:

- **global contrastive**: InfoNCE between the image and text towers' pooled outputs, features
  gathered across ranks with gradients (FLAVA's "global" back-propagation);
- **MIM** (masked image modelling): ``mim_ratio`` of the patches replaced by a learned mask token
  at the input of the image tower, predicted from its outputs;
- **MLM** (masked language modelling): BERT masking (15%: 80% ``[MASK]``, 10% a random token,
  10% unchanged) of the text tower's input, predicted from its outputs;
- **MMM** (multimodal masked modelling): the masked image and masked text encodings go through the
  multimodal encoder, which predicts both the masked patches and the masked tokens;
- **ITM**: the multimodal encoder on the unmasked pair or, for half the images, on another
  sample's caption, and a binary head on its CLS token.

Masked-image targets: FLAVA predicts the DALL-E dVAE's visual tokens, a pretrained tokenizer that
cannot be downloaded here. lit-vlm predicts the masked patches' pixels instead, normalised per
patch (MAE's ``norm_pix_loss`` target, also what SimMIM regresses), for MIM and MMM alike.

Mixing unimodal and paired data: a batch may mark rows with ``has_image`` / ``has_text`` (bool
[B]; both True by default, as in the image-text DataModule). MIM counts the rows with an image,
MLM the rows with a text, and the paired losses (contrastive, ITM, MMM) the rows with both; a
batch whose rows are not all paired computes its contrastive loss on this rank's pairs only.

Capabilities: ``encode_image`` / ``encode_text`` (retrieval, zero-shot) and ``pair_features`` +
``score_pairs`` (the ITM head, for re-ranking in :class:`~lit_vlm.callbacks.RetrievalEvaluation`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_vlm.errors import UserError
from lit_vlm.losses import bert_mask, clip_loss, mae_loss
from lit_vlm.models.base import VLMModule
from lit_vlm.models.mae import patchify
from lit_vlm.modules import TextTransformer, Transformer, VisionTransformer, trim_padding

LOSSES = ("contrastive", "mim", "mlm", "mmm_image", "mmm_text", "itm")


class FLAVA(VLMModule):
    """FLAVA: image, text and multimodal encoders with MIM, MLM, MMM, ITM and global contrastive
    losses (see the module docstring).

    Args:
        vision: The image encoder (a ViT; its pooled output gives the contrastive feature).
        text: The text encoder; bidirectional (``causal: false``) with ``pool: first`` as in
            FLAVA. ``vocab_size``, ``context_length`` and ``pad_id`` come from the data.
        mm_width: Width of the multimodal encoder.
        mm_layers: Blocks of the multimodal encoder.
        mm_heads: Attention heads of the multimodal encoder.
        embed_dim: Width of the contrastive embedding space.
        mask_id: Id of the ``[MASK]`` token (None: taken from the data's tokenizer when training).
        mlm_probability: Fraction of text tokens selected for MLM / MMM (15%).
        mim_ratio: Fraction of image patches masked for MIM / MMM (40% in FLAVA).
        contrastive_weight: Weight of the global contrastive loss.
        mim_weight: Weight of MIM.
        mlm_weight: Weight of MLM.
        mmm_image_weight: Weight of MMM's image part.
        mmm_text_weight: Weight of MMM's text part.
        itm_weight: Weight of ITM.
        init_logit_scale: Initial log temperature of the contrastive loss (log(1/0.07)).

    Optimiser, schedule, accumulation and ``init_from`` arguments are :class:`VLMModule`'s; this
    family's optimiser defaults: lr=5e-4, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8.
    """

    optim_defaults = dict(lr=5e-4, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)

    eval_terms = ("loss", *(f"{name}_loss" for name in LOSSES), "itm_acc")

    def __init__(
        self,
        vision: VisionTransformer,
        text: TextTransformer,
        mm_width: int = 768,
        mm_layers: int = 6,
        mm_heads: int = 12,
        embed_dim: int = 768,
        mask_id: int | None = None,
        mlm_probability: float = 0.15,
        mim_ratio: float = 0.4,
        contrastive_weight: float = 1.0,
        mim_weight: float = 1.0,
        mlm_weight: float = 1.0,
        mmm_image_weight: float = 1.0,
        mmm_text_weight: float = 1.0,
        itm_weight: float = 1.0,
        init_logit_scale: float = math.log(1 / 0.07),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        weights = dict(contrastive=contrastive_weight, mim=mim_weight, mlm=mlm_weight, mmm_image=mmm_image_weight,
                       mmm_text=mmm_text_weight, itm=itm_weight)
        if any(w < 0 for w in weights.values()) or not any(weights.values()):
            raise UserError(f"model loss weights must be >= 0 and not all 0, got {weights}")
        if getattr(text, "causal", False):
            raise UserError("model text: FLAVA's text encoder is bidirectional; set the tower's causal: false")
        if not 0 < mlm_probability < 1 or not 0 < mim_ratio < 1:
            raise UserError(f"model mlm_probability and mim_ratio must be in (0, 1), got {mlm_probability}, {mim_ratio}")
        self.vision = vision
        self.text = text
        self.loss_weights = weights
        self.mask_id = mask_id
        self.mlm_probability = float(mlm_probability)
        self.mim_ratio = float(mim_ratio)
        patch_dim = vision.patch_size**2 * 3
        vocab = text.vocab_size
        self.image_projection = nn.Linear(vision.width, embed_dim, bias=False)
        self.text_projection = nn.Linear(text.width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.image_mask_token = nn.Parameter(torch.zeros(vision.width))
        self.image_to_mm = nn.Linear(vision.width, mm_width)
        self.text_to_mm = nn.Linear(text.width, mm_width)
        self.mm_cls = nn.Parameter(torch.zeros(mm_width))
        self.mm_encoder = Transformer(mm_width, mm_layers, mm_heads)
        self.mm_ln = nn.LayerNorm(mm_width)
        self.mim_head = nn.Linear(vision.width, patch_dim)
        self.mlm_head = nn.Linear(text.width, vocab)
        self.mmm_image_head = nn.Linear(mm_width, patch_dim)
        self.mmm_text_head = nn.Linear(mm_width, vocab)
        self.itm_head = nn.Linear(mm_width, 2)
        for p in (self.image_mask_token, self.mm_cls):
            nn.init.normal_(p, std=0.02)

    # ---- encoders --------------------------------------------------------------------------------
    def multimodal(self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
        """[CLS_mm, image tokens, text tokens] through the multimodal encoder: [B, 1+P+L, Dm]."""
        B, P = image_tokens.shape[:2]
        x = torch.cat([self.mm_cls.expand(B, 1, -1), self.image_to_mm(image_tokens), self.text_to_mm(text_tokens)], 1)
        keys = torch.cat([torch.ones(B, 1 + P, dtype=torch.bool, device=x.device), text_mask.bool()], 1)  # [B, T]
        x, _ = self.mm_encoder(x, attn_mask=keys[:, None, None, :])
        return self.mm_ln(x)

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        emb = self.image_projection(self.vision(images).pooled)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, ids: Tensor, mask: Tensor | None = None, normalize: bool = True) -> Tensor:
        ids, mask = trim_padding(ids, mask)
        emb = self.text_projection(self.text(ids, mask).pooled)
        return F.normalize(emb, dim=-1) if normalize else emb

    def pair_features(self, images: Tensor) -> Tensor:
        """images -> the image tower's tokens [B, 1+N, Dv] (what ``score_pairs`` reads)."""
        return self.vision(images).tokens

    def score_pairs(self, image_features: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """ITM log-odds of N pairs: image tokens [N, S, Dv], caption ids/mask [N, L] -> [N]."""
        ids, mask = trim_padding(ids, mask)
        logits = self.itm_head(self.multimodal(image_features, self.text(ids, mask).tokens, mask)[:, 0]).float()
        return logits[:, 1] - logits[:, 0]

    # ---- losses ------------------------------------------------------------------------------------
    def _mask_id(self) -> int:
        if self.mask_id is not None:
            return self.mask_id
        tok = getattr(getattr(self._trainer, "datamodule", None), "tokenizer", None)
        if tok is None or tok.mask_id is None:
            raise UserError("model mask_id: FLAVA's MLM needs the [MASK] token id (set mask_id, or use a tokenizer that has one)")
        self.mask_id = int(tok.mask_id)
        return self.mask_id

    def forward(self, batch: dict) -> dict[str, Tensor]:
        w = self.loss_weights
        images = batch["image"]
        ids, mask = trim_padding(batch["text_ids"], batch["text_mask"])
        mask = mask.bool()
        B = ids.shape[0]
        ones = torch.ones(B, dtype=torch.bool, device=ids.device)
        has_image = batch.get("has_image", ones).bool()
        has_text = batch.get("has_text", ones).bool()
        paired = has_image & has_text
        all_paired = bool(paired.all())
        terms: dict[str, Tensor] = {}
        p = self.vision.patch_size
        need_clean = w["contrastive"] or w["itm"]
        if need_clean:
            v = self.vision(images)
            t = self.text(ids, mask)
        if w["contrastive"] and paired.any():
            img = F.normalize(self.image_projection(v.pooled[paired]), dim=-1)
            txt = F.normalize(self.text_projection(t.pooled[paired]), dim=-1)
            con = clip_loss(img, txt, self.logit_scale.exp(), gather=self.training and all_paired)
            terms.update(contrastive_loss=con["loss"], acc_i2t=con["acc_i2t"], acc_t2i=con["acc_t2i"])
        if w["itm"] and int(paired.sum()) > 1:
            rows = paired.nonzero().squeeze(1)
            n = rows.shape[0]
            swap = torch.rand(n, device=ids.device) < 0.5  # half the images get another sample's caption
            other = (torch.arange(n, device=ids.device) + torch.randint(1, n, (n,), device=ids.device)) % n
            text_rows = torch.where(swap, rows[other], rows)
            same = (ids[text_rows] == ids[rows]).all(1) & (mask[text_rows] == mask[rows]).all(1)
            labels = (~swap | same).long()  # an identical caption is a match
            logits = self.itm_head(self.multimodal(v.tokens[rows], t.tokens[text_rows], mask[text_rows])[:, 0])
            terms["itm_loss"] = F.cross_entropy(logits.float(), labels)
            terms["itm_acc"] = (logits.argmax(1) == labels).float().mean().detach()
        need_masked = w["mim"] or w["mlm"] or w["mmm_image"] or w["mmm_text"]
        if need_masked:
            N = self.vision.num_patches
            image_sel = torch.rand(B, N, device=images.device).argsort(1) < int(round(self.mim_ratio * N))  # [B, N]
            vm = self.vision(images, replace_mask=image_sel, replace_token=self.image_mask_token)
            tok = getattr(getattr(self._trainer, "datamodule", None), "tokenizer", None)
            special = tuple(i for i in (getattr(tok, "bos_id", None), getattr(tok, "eos_id", None)) if i is not None)
            masked_ids, text_sel = bert_mask(ids, mask, self._mask_id(), self.text.vocab_size, self.mlm_probability, special)
            tm = self.text(masked_ids, mask)
            target = patchify(images, p)  # [B, N, P]
            if w["mim"] and has_image.any():
                sel = image_sel & has_image[:, None]
                terms["mim_loss"] = mae_loss(self.mim_head(vm.tokens[:, 1:]), target, sel.float())
            if w["mlm"] and has_text.any():
                sel = text_sel & has_text[:, None]
                terms["mlm_loss"] = F.cross_entropy(self.mlm_head(tm.tokens[sel]).float(), ids[sel])
            if (w["mmm_image"] or w["mmm_text"]) and paired.any():
                mm = self.multimodal(vm.tokens[paired], tm.tokens[paired], mask[paired])  # [b, 1+1+N+L, Dm]
                P = vm.tokens.shape[1]
                if w["mmm_image"]:
                    terms["mmm_image_loss"] = mae_loss(self.mmm_image_head(mm[:, 2 : 1 + P]), target[paired], image_sel[paired].float())
                if w["mmm_text"]:
                    sel = text_sel[paired]
                    terms["mmm_text_loss"] = F.cross_entropy(self.mmm_text_head(mm[:, 1 + P :][sel]).float(), ids[paired][sel])
        terms["loss"] = sum(w[name] * terms[f"{name}_loss"] for name in LOSSES if f"{name}_loss" in terms)
        return terms

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0, math.log(100.0))



__all__ = ["FLAVA", "bert_mask"]
