"""CLIP (Radford et al., 2021) and the contrastive variants that share its dual encoder.

image tower -> pooled [B, Wv] -> linear projection -> L2 norm -> image embedding [B, E]
text tower  -> pooled [B, Wt] (end-of-text token) -> linear projection -> L2 norm -> text embedding [B, E]
loss = symmetric InfoNCE on exp(t) * cosine similarities, t learnable (init log(1/0.07), exp(t) <= 100).

Under DDP each rank scores its local rows against the embeddings gathered from every rank (with
gradients), so the loss and gradients are those of one process holding the whole global batch.

The variants are options of this one class, as in open_clip (where ``ViT-B-16-SigLIP`` is a model
config plus ``--siglip``, and LiT is ``--lock-image``), so a checkpoint of any of them loads the same
way and every option combines with the others:

- **SigLIP** (Zhai et al., 2023): ``loss="siglip"``, a pairwise sigmoid loss with a learnable bias
  ``logit_bias`` (init -10) and logit scale init log(10); ``siglip_mode`` "gather" or "ring" for
  DDP, ``loss_chunk_size`` bounds its memory. ``configs/siglip/``.
- **Focal contrastive** (RO-ViT, MaMMUT): ``loss="focal"``, the focal modulation (1 - p)^gamma
  on every pair's probability (``focal_gamma``, ``focal_form``); the sigmoid form has SigLIP's
  bias (``focal_bias``). ``configs/focal/``.
- **LiT** (Zhai et al., 2022): ``lock_image=True`` freezes the image tower and projection (no
  gradients, not in the optimiser, run in eval mode), ``lock_image_unlocked_groups`` leaves the last
  groups trainable as open_clip's ``lock_image_tower`` does, ``lock_image_unlock_norms`` keeps the
  LayerNorms trainable; the tower's weights come from ``init_from``. ``configs/lit/``.
- **FLIP** (Li et al., 2023): the image tower's ``patch_dropout`` (0.5 or 0.75 in the paper) drops
  patches during training; ``unmasked_tuning_steps`` trains the last steps on whole images.
  Evaluation always sees whole images. ``configs/flip/``.
- **FILIP** (Yao et al., 2022) adds token-level late interaction: :class:`lit_vlm.models.FILIP`.

``accum_freq`` (exact contrastive gradient accumulation) and ``grad_checkpointing`` work with all.
A dedicated ``SigLIP`` class would add a second checkpoint format for the same network and a second
place to document the same options, so the variants are configs; FILIP is a class because it adds
capabilities (token features, its own similarity), not just a loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lit_vlm.errors import UserError
from lit_vlm.metrics import in_batch_accuracy
from lit_vlm.models.base import VLMModule
from lit_vlm.modules import ConvNet, TextTransformer, VisionTransformer, trim_padding
from lit_vlm.modules.freeze import lock, vit_groups

#: Loss names accepted by ``CLIP(loss=...)`` (looked up with ``lit_vlm.losses.get_loss``).
LOSSES = ("clip", "siglip", "focal")
#: Terms logged on the validation and test splits.
EVAL_TERMS = ("loss", "acc_i2t", "acc_t2i")
#: Initial log logit scale per loss when ``init_logit_scale`` is left unset (the pairwise sigmoid
#: losses, SigLIP and the sigmoid focal form, start at SigLIP's log 10).
DEFAULT_INIT_LOGIT_SCALE = {"clip": math.log(1 / 0.07), "focal": math.log(1 / 0.07), "siglip": math.log(10.0)}
#: Initial logit bias of the sigmoid losses when ``init_logit_bias`` is left unset (the SigLIP
#: paper's -10; -log(N - 1), where the loss of a model that scores every pair alike is lowest, was
#: slower here at N = 128: ``benchmarks/README.md``).
DEFAULT_INIT_LOGIT_BIAS = -10.0


class CLIP(VLMModule):
    """CLIP dual encoder trained with a contrastive loss (InfoNCE, SigLIP's sigmoid, or focal).

    Args:
        vision: The image tower, a ViT or a :class:`ConvNet` (its pooled output is projected). Its
            ``image_size`` is taken from the data when left unset.
        text: The text tower (pooled at the end-of-text token). Its ``vocab_size`` and
            ``context_length`` are taken from the data's tokenizer when left unset.
        embed_dim: Dimension of the joint embedding space.
        init_logit_scale: Initial value of the learnable log temperature t (logits are
            exp(t) * cosine similarity). Unset: log(1/0.07) as in CLIP, log(10) for ``loss="siglip"``.
        max_logit_scale: Upper clamp of exp(t), applied after every optimiser step (100 in the paper).
        learn_logit_scale: Train t; False keeps it fixed at ``init_logit_scale``.
        loss: "clip" (symmetric InfoNCE), "siglip" (pairwise sigmoid loss with a learnable bias) or
            "focal" (focal contrastive loss).
        init_logit_bias: Initial learnable logit bias b of the sigmoid losses (``loss="siglip"``, and
            ``loss="focal"`` with ``focal_form="sigmoid"``; logits are exp(t) * cos + b); unset: -10
            as in the SigLIP paper.
        siglip_mode: How ``loss="siglip"`` meets the other ranks' samples under DDP: "gather"
            (all-gather the embeddings) or "ring" (pass text chunks around the ranks, as in the paper).
        loss_chunk_size: ``loss="siglip"`` only: score this many negative columns at a time to bound
            memory (None: all at once).
        focal_gamma: Focusing exponent gamma of ``loss="focal"``.
        focal_form: ``loss="focal"`` only: "softmax" (default: the focal term on the softmax
            probability of the positive; gamma=0 is CLIP's InfoNCE) or "sigmoid" (every image-text
            pair a binary problem, the RO-ViT/MaMMUT definition; gamma=0 is SigLIP). The default is
            the form that learns at a small batch and budget: at batch 128 for 42k samples the
            softmax form reached CLIP's recall while the sigmoid form stayed near chance without a
            bias and learned as slowly as SigLIP with one (``benchmarks/README.md``).
        focal_bias: ``focal_form="sigmoid"`` only: add SigLIP's learnable logit bias and its scale
            init (default). The papers write the loss without one; then the N - 1 negatives of each
            image can only lower their loss by negative cosines, which N vectors cannot all have.
            False gives the bias-free form as published.
        lock_image: LiT: freeze the image tower and the image projection (requires_grad=False, not
            in the optimiser, eval mode even while training). Pair it with ``init_from``.
        lock_image_unlocked_groups: With ``lock_image``, leave the last n layer groups trainable,
            as open_clip's ``lock_image_tower``: the groups are [stem: patch embedding, class and
            positional embeddings, ln_pre], one per transformer block except the last, [last block,
            pooler, ln_post], [image projection]. 0 locks everything.
        lock_image_unlock_norms: With ``lock_image``, keep every normalisation layer of the image
            tower trainable (their statistics, for batch norms, stay frozen: eval mode).
        unmasked_tuning_steps: FLIP: train the last N optimiser steps (or this fraction of all
            steps, if in (0, 1)) with the image tower's patch dropout off. 0: patch dropout to the end.
        grad_checkpointing: Recompute the towers' block activations in the backward pass (less
            memory, about a third more compute; gradients are unchanged).

    Optimiser, schedule, accumulation and ``init_from`` arguments are :class:`VLMModule`'s; this
    family uses their defaults (lr=5e-4, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6).
    """

    couples_batch = True
    eval_terms = EVAL_TERMS

    def __init__(
        self,
        vision: VisionTransformer | ConvNet,
        text: TextTransformer,
        embed_dim: int = 512,
        init_logit_scale: float | None = None,
        max_logit_scale: float = 100.0,
        learn_logit_scale: bool = True,
        loss: str = "clip",
        init_logit_bias: float | None = None,
        siglip_mode: str = "gather",
        loss_chunk_size: int | None = None,
        focal_gamma: float = 2.0,
        focal_form: str = "softmax",
        focal_bias: bool = True,
        lock_image: bool = False,
        lock_image_unlocked_groups: int = 0,
        lock_image_unlock_norms: bool = False,
        unmasked_tuning_steps: int | float = 0,
        grad_checkpointing: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if loss not in LOSSES:
            raise UserError(f"model loss must be one of {LOSSES}, got {loss!r}")
        sigmoid = loss == "siglip" or (loss == "focal" and focal_form == "sigmoid" and focal_bias)
        if init_logit_bias is not None and not sigmoid:
            raise UserError(f"model init_logit_bias is only used by the sigmoid losses (loss='siglip', or 'focal' with "
                            f"focal_form='sigmoid' and focal_bias true); here loss={loss!r}")
        if siglip_mode not in ("gather", "ring"):
            raise UserError(f"model siglip_mode must be 'gather' or 'ring', got {siglip_mode!r}")
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise UserError(f"model loss_chunk_size must be >= 1 or None, got {loss_chunk_size}")
        if focal_gamma < 0:
            raise UserError(f"model focal_gamma must be >= 0, got {focal_gamma}")
        if focal_form not in ("sigmoid", "softmax"):
            raise UserError(f"model focal_form must be 'sigmoid' or 'softmax', got {focal_form!r}")
        if unmasked_tuning_steps < 0:
            raise UserError(f"model unmasked_tuning_steps must be >= 0, got {unmasked_tuning_steps}")
        if not lock_image and (lock_image_unlocked_groups or lock_image_unlock_norms):
            raise UserError("model lock_image_unlocked_groups / lock_image_unlock_norms need lock_image=True")
        self.vision = vision
        self.text = text
        self.image_projection = nn.Linear(vision.width, embed_dim, bias=False)
        self.text_projection = nn.Linear(text.width, embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=vision.width**-0.5)
        nn.init.normal_(self.text_projection.weight, std=text.width**-0.5)
        if init_logit_scale is None:
            init_logit_scale = DEFAULT_INIT_LOGIT_SCALE["siglip" if sigmoid else loss]
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)), requires_grad=learn_logit_scale)
        if sigmoid:
            bias = DEFAULT_INIT_LOGIT_BIAS if init_logit_bias is None else float(init_logit_bias)
            self.logit_bias = nn.Parameter(torch.tensor(bias))
        else:
            self.logit_bias = None
        self.max_log_scale = math.log(max_logit_scale)
        self.loss = loss
        self.siglip_mode = siglip_mode
        self.loss_chunk_size = loss_chunk_size
        self.focal_gamma = float(focal_gamma)
        self.focal_form = focal_form
        self.unmasked_tuning_steps = unmasked_tuning_steps
        self._patch_dropout_now: float | None = None  # set per step by the FLIP schedule
        self._unmasked_from: int | None = None
        self._image_needs_grad = True
        if lock_image:
            self.lock_image_tower(lock_image_unlocked_groups, lock_image_unlock_norms)
        if grad_checkpointing:
            self.set_grad_checkpointing(True)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A sigmoid focal checkpoint from before ``focal_bias`` loads with b = 0: the same logits."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict")
        if isinstance(state, dict) and self.logit_bias is not None and self.loss == "focal" and "logit_bias" not in state:
            state["logit_bias"] = torch.zeros(())

    # ---- LiT -----------------------------------------------------------------------------------
    def lock_image_tower(self, unlocked_groups: int = 0, unlock_norms: bool = False) -> None:
        """LiT: freeze the image tower and projection (:func:`lit_vlm.modules.freeze.lock`) except
        the last ``unlocked_groups`` of its groups (:func:`~lit_vlm.modules.freeze.vit_groups` +
        [image projection]) and, with ``unlock_norms``, its normalisation layers."""
        image_side = [self.vision, self.image_projection]
        groups = [*vit_groups(self.vision), [self.image_projection]] if unlocked_groups else None
        lock(image_side, groups, unlocked_groups, unlock_norms, what="model lock_image")
        self._image_needs_grad = any(p.requires_grad for m in image_side for p in m.parameters())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation checkpointing of both towers' transformer blocks on or off."""
        for name, tower in (("vision", self.vision), ("text", self.text)):
            setter = getattr(tower, "set_grad_checkpointing", None) or getattr(
                getattr(tower, "transformer", None), "set_grad_checkpointing", None
            )
            if setter is None:
                raise UserError(f"model grad_checkpointing: the {name} tower {type(tower).__name__} cannot checkpoint")
            setter(enable)

    # ---- capabilities used by the evaluation callbacks ---------------------------------------
    def _vision(self, images: torch.Tensor):
        """The image tower's output, with the FLIP schedule's patch-dropout override if any."""
        if self._patch_dropout_now is None:
            return self.vision(images)
        return self.vision(images, patch_dropout=self._patch_dropout_now)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images [B, 3, H, W] -> embeddings [B, E] (L2-normalised unless ``normalize=False``)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._image_needs_grad):
            emb = self.image_projection(self._vision(images).pooled)  # [B, E]
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
        """ids [N, L], mask [N, L] -> embeddings [N, E] (L2-normalised unless ``normalize=False``).

        Padding columns after the longest sequence are dropped first: with right padding the
        pooled output is unchanged and the tower does less work on short captions.
        """
        ids, mask = trim_padding(ids, mask)  # [N, l]
        emb = self.text_projection(self.text(ids, mask).pooled)  # [N, E]
        return F.normalize(emb, dim=-1) if normalize else emb

    # ---- training --------------------------------------------------------------------------
    def features(self, batch: dict) -> dict[str, torch.Tensor | None]:
        """{"image": [B, E], "text": [B, E]}: the normalised embeddings the loss compares, and with
        the data's ``hard_negatives`` = K, {"negatives": [B, K, E], "negative_valid": [B, K]}."""
        out = {
            "image": self.encode_image(batch["image"]),  # [B, E]
            "text": self.encode_text(batch["text_ids"], batch["text_mask"]),  # [B, E]
        }
        if "negative_ids" in batch:
            b, k, length = batch["negative_ids"].shape
            flat = self.encode_text(batch["negative_ids"].reshape(b * k, length), batch["negative_mask"].reshape(b * k, length))
            out["negatives"] = flat.view(b, k, -1)  # [B, K, E]
            out["negative_valid"] = batch["negative_valid"]  # [B, K]
        return out

    def _scalars(self, detach: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        scale = self.logit_scale.exp()  # []
        bias = self.logit_bias
        if detach:
            scale = scale.detach()
            bias = bias.detach() if bias is not None else None
        return scale, bias

    def loss_from_features(
        self, features: dict[str, torch.Tensor | None], gather: bool = True, detach_scalars: bool = False
    ) -> dict[str, torch.Tensor]:
        """The configured loss of ``features`` (see :meth:`features`); ``gather`` scores the local
        rows against the global batch under DDP."""
        from lit_vlm.losses import get_loss

        image_emb, text_emb = features["image"], features["text"]  # [B, E], [B, E]
        scale, bias = self._scalars(detach_scalars)
        fn = get_loss(self.loss)
        hard = {"negative_emb": features.get("negatives"), "negative_valid": features.get("negative_valid")}
        if self.loss == "siglip":
            terms = fn(image_emb, text_emb, scale, bias, gather=gather, mode=self.siglip_mode, chunk_size=self.loss_chunk_size,
                       **hard)
        elif self.loss == "focal":
            terms = fn(image_emb, text_emb, scale, gamma=self.focal_gamma, gather=gather, form=self.focal_form,
                       logit_bias=bias, **hard)
        else:
            terms = fn(image_emb, text_emb, scale, gather=gather, **hard)
        if "acc_i2t" not in terms or "acc_t2i" not in terms:
            with torch.no_grad():
                terms.update(in_batch_accuracy(image_emb @ text_emb.T))
        terms["logit_scale"] = scale.detach()
        if bias is not None:
            terms["logit_bias"] = bias.detach()
        return terms

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        # Gather across ranks only in training, where every rank has the same batch size.
        return self.loss_from_features(self.features(batch), gather=self.training)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0, self.max_log_scale)  # exp(t) <= max_logit_scale

    # ---- FLIP: patch dropout schedule -------------------------------------------------------
    def patch_dropout_ratio(self) -> float:
        """The patch-dropout ratio the image tower applies in a training step now."""
        ratio = float(getattr(self.vision, "patch_dropout", 0.0) or 0.0)
        if not self.vision.training:
            return 0.0
        return ratio if self._patch_dropout_now is None else self._patch_dropout_now

    def on_train_start(self) -> None:
        self.train(True)  # locked modules back to eval, whatever mode the trainer found
        u = self.unmasked_tuning_steps
        if u and float(getattr(self.vision, "patch_dropout", 0.0) or 0.0) > 0:
            total = self.num_optimizer_steps()
            tuning = int(round(u * total)) if 0 < u < 1 else int(u)
            self._unmasked_from = max(0, total - tuning)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._unmasked_from is not None:
            self._patch_dropout_now = 0.0 if self.global_step >= self._unmasked_from else None
        if float(getattr(self.vision, "patch_dropout", 0.0) or 0.0) > 0:
            self.log("train/patch_dropout", self.patch_dropout_ratio(), on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self) -> None:
        self._patch_dropout_now = None

    # ---- evaluation ------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Embeddings of the batch's images and (first) captions, keyed by sample id."""
        return {
            "sample_id": batch["sample_id"],
            "image_emb": self.encode_image(batch["image"]),
            "text_emb": self.encode_text(batch["text_ids"], batch["text_mask"]),
        }
