"""BLIP: Bootstrapping Language-Image Pre-training (Li et al., 2022), the multimodal mixture of
encoder-decoder (MED) with its three losses.

image tower -> tokens [B, 1+N, Dv], pooled [B, Dv] -> proj -> image feature [B, E]
caption ---> text encoder (bidirectional, text only)           -> [CLS] -> proj -> text feature [B, E]   ITC
caption ---> image-grounded text encoder ([ENC] first token;     -> [ENC] -> ITM head (match / no match)  ITM
             cross-attention between self-attention and MLP)
caption ---> image-grounded text decoder ([DEC] = start token;   -> next-token logits                     LM
             causal self-attention, all else shared)

- **ITC**: InfoNCE between image and text features with a learned temperature (init 0.07, clamped
  to [0.001, 0.5]). With ``momentum`` set (BLIP's default) momentum copies of the image tower, the
  text encoder and both projections (EMA of the online weights) fill feature queues of
  ``queue_size`` entries, the negatives come from the current momentum batch plus the queue, and
  the targets are softened by momentum distillation: ``alpha * softmax(momentum similarities) +
  (1 - alpha) * one-hot`` (alpha ramps up over the first epoch, as in BLIP). ``momentum: null``
  gives plain in-batch InfoNCE over the global batch (features gathered across ranks).
- **ITM**: for every pair, one hard negative image per text and one hard negative text per image,
  drawn with probability proportional to ``softmax`` of the contrastive similarity over the
  **global** batch (features, image tokens and caption ids gathered across ranks; the pair itself
  and captions identical to the positive's are never drawn); binary cross-entropy over
  [positives, negative images, negative texts] through the image-grounded encoder and a linear head.
- **LM**: the image-grounded decoder predicts each caption token from the previous ones, with label
  smoothing 0.1 as in BLIP; the token mean over the global batch. When the batch carries
  question-answer sequences (the DataModule's ``train_vqa``), the decoder also learns to continue a
  question with its answer (loss on the answer tokens only), so ``generate(images, questions)``
  answers VQA.

The encoder and the decoder share the token and position embeddings, every cross-attention, MLP
and LayerNorm but the self-attention's: the decoder is a :class:`~lit_vlm.modules.TextDecoder`
whose blocks all cross-attend, and the encoder adds its own (bidirectional) self-attention and
LayerNorm per block, as BLIP shares all but the self-attention layers.

Capabilities: ``encode_image`` / ``encode_text`` (ITC retrieval, zero-shot), ``pair_features`` +
``score_pairs`` (ITM re-ranking in :class:`~lit_vlm.callbacks.RetrievalEvaluation`, CapFilt's
filter), ``generate`` and ``score_answers`` (captioning; VQA by generation or by ranking a
candidate answer list).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lit_vlm.distributed import gather_no_grad, gather_with_grad, rank_and_world
from lit_vlm.errors import UserError
from lit_vlm.losses import caption_loss, clip_loss, global_token_mean, itm_hard_negatives, momentum_itc_loss
from lit_vlm.models.base import VLMModule
from lit_vlm.models.generating import GeneratingMixin, check_generation_options
from lit_vlm.modules import Attention, ConvNet, TextDecoder, VisionTransformer, trim_padding

EVAL_TERMS = ("loss", "itc_loss", "itm_loss", "lm_loss", "vqa_loss", "itm_acc")


class MixtureTextModel(nn.Module):
    """BLIP's text side: an image-grounded causal decoder plus, sharing all its weights but the
    self-attention (and its LayerNorm), a bidirectional encoder usable with or without the image.

    Args:
        decoder: A :class:`TextDecoder` whose every block cross-attends to the image tokens.
    """

    def __init__(self, decoder: TextDecoder) -> None:
        super().__init__()
        if not all(b.xattn is not None for b in decoder.blocks):
            raise UserError("BLIP's decoder must cross-attend in every block: leave cross_attention_layers unset (null)")
        self.decoder = decoder
        width, heads = decoder.width, decoder.heads
        self.enc_ln = nn.ModuleList(nn.LayerNorm(width, eps=b.ln_1.eps) for b in decoder.blocks)
        self.enc_attn = nn.ModuleList(Attention(width, heads) for _ in decoder.blocks)
        self.enc_token = nn.Parameter(torch.randn(width) * 0.02)  # [ENC], replaces the first token
        proj_std = width**-0.5 * (2 * len(decoder.blocks)) ** -0.5
        for attn in self.enc_attn:
            attn.init_weights(proj_std=proj_std)

    def encode(
        self,
        ids: torch.Tensor,  # [B, L] right-padded, first token the start token ([CLS])
        mask: torch.Tensor,  # [B, L] bool
        image: torch.Tensor | None = None,  # [B, S, Dc] image tokens: image-grounded mode
        image_mask: torch.Tensor | None = None,  # [B, S] bool
    ) -> torch.Tensor:
        """Encoder states [B, L, D] (after the final LayerNorm). With ``image`` the first token is
        replaced by [ENC] and every block cross-attends (ITM); without, text only (ITC)."""
        dec = self.decoder
        mask = mask.bool()
        x = dec.embed(ids, mask)  # [B, L, D]
        if image is not None:
            x = torch.cat([x[:, :1] - dec.token_embedding(ids[:, :1]) + self.enc_token, x[:, 1:]], dim=1)
        keys = (mask | ~mask.any(1, keepdim=True))[:, None, None, :]  # [B, 1, 1, L]
        cross_mask = None if image_mask is None else image_mask.bool()[:, None, None, :]
        for i, block in enumerate(dec.blocks):
            x = x + self.enc_attn[i](self.enc_ln[i](x), attn_mask=keys)
            if image is not None:
                x = x + block.xattn(block.ln_x(x), image, attn_mask=cross_mask)
            x = x + block.mlp(block.ln_2(x))
        return dec.ln_final(x)  # [B, L, D]


class BLIP(GeneratingMixin, VLMModule):
    """BLIP pre-training: ITC + ITM + LM over a shared-weight encoder-decoder.

    Args:
        vision: The image tower, a ViT or a :class:`ConvNet` (its pooled output gives the ITC feature,
            its tokens the context of the image-grounded encoder and decoder). ``image_size`` comes
            from the data.
        decoder: The image-grounded text decoder; every block must cross-attend (leave its
            ``cross_attention_layers`` unset); ``context_dim`` must be the image tower's width
            (default: set from it). ``vocab_size`` and ``context_length`` come from the data.
        embed_dim: Width of the ITC embedding space (256 in BLIP).
        momentum: EMA coefficient of the momentum encoders (0.995 in BLIP); null disables the
            momentum encoders, the queues and momentum distillation (plain in-batch InfoNCE).
        queue_size: Momentum features kept as extra ITC negatives (57600 in BLIP); with momentum.
        alpha: Weight of the momentum model's soft targets in the ITC loss (0.4 in BLIP); ramped
            from 0 over the first epoch.
        itc_weight: Weight of the ITC loss.
        itm_weight: Weight of the ITM loss.
        lm_weight: Weight of the captioning LM loss.
        vqa_weight: Weight of the question-answering LM loss on batches that carry questions.
        label_smoothing: Label smoothing of the LM losses (0.1 in BLIP).
        init_temperature: Initial ITC temperature (0.07); learned, clamped to [0.001, 0.5].
        tokenizer: Tokenizer of the captions (``"synth"`` or a ``tokenizer.json`` path), for
            ``generate`` / ``score_answers``; filled from the data by ``lit-vlm``.
        generation: Default decoding options of ``generate`` (see :func:`lit_vlm.generation.generate`).

    Optimiser, schedule, accumulation and ``init_from`` arguments are :class:`VLMModule`'s; this
    family's optimiser defaults: lr=3e-4, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8.
    """

    optim_defaults = dict(lr=3e-4, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8)
    # the names every family uses; checkpoints of release 0.1 used BLIP's (LAVIS's) own
    renamed_keys = {"vision_proj.": "image_projection.", "text_proj.": "text_projection.",
                    "vision_proj_m.": "image_projection_m.", "text_proj_m.": "text_projection_m."}

    couples_batch = True
    eval_terms = EVAL_TERMS

    def __init__(
        self,
        vision: VisionTransformer | ConvNet,
        decoder: TextDecoder,
        embed_dim: int = 256,
        momentum: float | None = 0.995,
        queue_size: int = 57600,
        alpha: float = 0.4,
        itc_weight: float = 1.0,
        itm_weight: float = 1.0,
        lm_weight: float = 1.0,
        vqa_weight: float = 1.0,
        label_smoothing: float = 0.1,
        init_temperature: float = 0.07,
        tokenizer: str | None = None,
        generation: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if momentum is not None and not 0.0 <= momentum < 1.0:
            raise UserError(f"model momentum must be in [0, 1) or null, got {momentum}")
        if momentum is not None and queue_size < 1:
            raise UserError(f"model queue_size must be >= 1 with momentum, got {queue_size}")
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"model alpha must be in [0, 1], got {alpha}")
        weights = dict(itc_weight=itc_weight, itm_weight=itm_weight, lm_weight=lm_weight, vqa_weight=vqa_weight)
        if any(w < 0 for w in weights.values()) or not any(weights.values()):
            raise UserError(f"model loss weights must be >= 0 and not all 0, got {weights}")
        context_dim = decoder.blocks[0].xattn.context_dim if decoder.blocks and decoder.blocks[0].xattn else None
        if context_dim is not None and context_dim != vision.width:
            raise UserError(
                f"model decoder context_dim={context_dim} must equal the image tower's width {vision.width} "
                "(the text attends to the image tokens directly, as in BLIP)"
            )
        self.vision = vision
        self.text = MixtureTextModel(decoder)
        self.image_projection = nn.Linear(vision.width, embed_dim)
        self.text_projection = nn.Linear(decoder.width, embed_dim)
        self.itm_head = nn.Linear(decoder.width, 2)
        self.temp = nn.Parameter(torch.tensor(float(init_temperature)))
        self.momentum = momentum
        self.queue_size = queue_size
        self.alpha = float(alpha)
        self.loss_weights = weights
        self.label_smoothing = float(label_smoothing)
        self.tokenizer_spec = tokenizer
        self.generation_options = check_generation_options(generation)
        if momentum is not None:
            self.vision_m = copy.deepcopy(vision)
            self.text_m = copy.deepcopy(self.text)
            self.image_projection_m = copy.deepcopy(self.image_projection)
            self.text_projection_m = copy.deepcopy(self.text_projection)
            for m in self._momentum_pairs():
                m[1].requires_grad_(False)
            self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
            self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
            self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    # ---- momentum encoders -----------------------------------------------------------------------
    def _momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.vision, self.vision_m), (self.text, self.text_m), (self.image_projection, self.image_projection_m),
                (self.text_projection, self.text_projection_m)]

    @torch.no_grad()
    def copy_to_momentum(self) -> None:
        """Set every momentum encoder to its online encoder's weights."""
        for online, m in self._momentum_pairs():
            for p, q in zip(online.parameters(), m.parameters()):
                q.copy_(p.detach())

    @torch.no_grad()
    def _momentum_update(self) -> None:
        for online, m in self._momentum_pairs():
            for p, q in zip(online.parameters(), m.parameters()):
                q.mul_(self.momentum).add_(p.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def _enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor) -> None:
        """Write the global batch's momentum features [W*B, E] into the ring queues."""
        image_feat, text_feat = gather_no_grad(image_feat), gather_no_grad(text_feat)
        n = image_feat.shape[0]
        idx = (self.queue_ptr + torch.arange(n, device=image_feat.device)) % self.queue_size  # [n]
        if n > self.queue_size:  # keep only the newest queue_size entries
            image_feat, text_feat, idx = image_feat[-self.queue_size :], text_feat[-self.queue_size :], idx[-self.queue_size :]
        self.image_queue[:, idx] = image_feat.T.to(self.image_queue.dtype)
        self.text_queue[:, idx] = text_feat.T.to(self.text_queue.dtype)
        self.queue_ptr.fill_(int((self.queue_ptr + n) % self.queue_size))
        self.queue_filled.fill_(min(self.queue_size, int(self.queue_filled) + n))

    def load_initial_weights(self) -> list[str]:
        loaded = super().load_initial_weights()
        if self.momentum is not None:
            self.copy_to_momentum()  # the momentum encoders start from the loaded weights
        return loaded

    # ---- capabilities ------------------------------------------------------------------------------
    def _vision(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.vision(images)
        return out.pooled, out.tokens  # [B, Dv], [B, 1+N, Dv]

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images [B, 3, H, W] -> ITC features [B, E]."""
        emb = self.image_projection(self.vision(images).pooled)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
        """ids [N, L], mask [N, L] -> ITC features [N, E] (the unimodal encoder's [CLS] state)."""
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
        ids, mask = trim_padding(ids, mask)
        emb = self.text_projection(self.text.encode(ids, mask)[:, 0])
        return F.normalize(emb, dim=-1) if normalize else emb

    def pair_features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> what ``score_pairs`` needs of each image: its tokens [B, 1+N, Dv]."""
        return self.vision(images).tokens

    def score_pairs(self, image_features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ITM score of N image-text pairs: image tokens [N, S, Dv] (``pair_features``), caption
        ids/mask [N, L] -> [N], the log-odds log p(match) - log p(no match)."""
        ids, mask = trim_padding(ids, mask)
        logits = self.itm_head(self.text.encode(ids, mask, image_features)[:, 0]).float()  # [N, 2]
        return logits[:, 1] - logits[:, 0]

    def generation_context(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.vision(images).tokens, None

    def generation_decoder(self) -> TextDecoder:
        return self.text.decoder

    # ---- losses --------------------------------------------------------------------------------------
    def _alpha(self) -> float:
        trainer = self._trainer
        if trainer is None or not self.training:
            return self.alpha
        per_epoch = trainer.num_training_batches
        if trainer.current_epoch > 0 or not isinstance(per_epoch, (int, float)) or not math.isfinite(per_epoch) or per_epoch <= 0:
            return self.alpha
        return self.alpha * min(1.0, self.global_step / per_epoch)

    def _itc(self, image_feat, text_feat, images, ids, mask, gather: bool) -> dict[str, torch.Tensor]:
        temp = self.temp
        if self.momentum is None:
            terms = clip_loss(image_feat, text_feat, 1.0 / temp, gather=gather)
            return {"itc_loss": terms["loss"], "acc_i2t": terms["acc_i2t"], "acc_t2i": terms["acc_t2i"]}
        with torch.no_grad():
            if self.training:
                self._momentum_update()
            image_m = F.normalize(self.image_projection_m(self.vision_m(images).pooled), dim=-1)  # [B, E]
            text_m = F.normalize(self.text_projection_m(self.text_m.encode(ids, mask)[:, 0]), dim=-1)  # [B, E]
            filled = int(self.queue_filled)
            queue_i = self.image_queue[:, :filled].T if filled < self.queue_size else self.image_queue.T  # [Q, E]
            queue_t = self.text_queue[:, :filled].T if filled < self.queue_size else self.text_queue.T
            image_all = torch.cat([image_m, queue_i.to(image_m.dtype)])  # [B+Q, E]
            text_all = torch.cat([text_m, queue_t.to(text_m.dtype)])
            alpha = self._alpha()
            target = torch.zeros(image_m.shape[0], text_all.shape[0], device=image_m.device)
            target.fill_diagonal_(1.0)  # [B, B+Q]
            t_i2t = alpha * (image_m @ text_all.T / temp).softmax(1) + (1 - alpha) * target
            t_t2i = alpha * (text_m @ image_all.T / temp).softmax(1) + (1 - alpha) * target
        terms = momentum_itc_loss(image_feat, text_feat, image_all, text_all, t_i2t, t_t2i, temp)
        if self.training:
            self._enqueue(image_m, text_m)
        return terms

    def _itm(self, image_feat, text_feat, image_tokens, ids, mask, gather: bool) -> dict[str, torch.Tensor]:
        """ITM on the positives and one hard negative image per text and text per image, drawn in
        proportion to softmax(similarity / temperature) over the global batch."""
        B = ids.shape[0]
        world = rank_and_world()[1] if gather else 1
        neg_image_idx, neg_text_idx, ids_world, mask_world = itm_hard_negatives(image_feat, text_feat, ids, mask, self.temp, gather)
        image_tokens_world = gather_with_grad(image_tokens) if world > 1 else image_tokens  # [W*B, S, Dv]
        neg_images = image_tokens_world[neg_image_idx]  # [B, S, Dv]
        neg_ids, neg_mask = ids_world[neg_text_idx], mask_world[neg_text_idx]  # [B, L]
        all_ids = torch.cat([ids, ids, neg_ids])  # [3B, L]: (text, image) = (pos, pos), (pos, neg), (neg, pos)
        all_mask = torch.cat([mask, mask, neg_mask])
        all_images = torch.cat([image_tokens, neg_images, image_tokens])  # [3B, S, Dv]
        logits = self.itm_head(self.text.encode(all_ids, all_mask, all_images)[:, 0])  # [3B, 2]
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(ids.device)
        return {
            "itm_loss": F.cross_entropy(logits.float(), labels),
            "itm_acc": (logits.argmax(1) == labels).float().mean().detach(),
        }

    def _lm(self, image_tokens, ids, mask, gather: bool, answer_mask=None) -> torch.Tensor:
        dec = self.text.decoder
        logits = dec(ids, mask, context=image_tokens).logits  # [B, L, V]
        sums, counts = caption_loss(logits, ids, mask, self.label_smoothing, loss_mask=answer_mask)
        return global_token_mean(sums, counts, gather=gather)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        gather = self.training
        if self.training:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
        images = batch["image"]
        ids, mask = batch["text_ids"], batch["text_mask"].bool()  # [B, L]
        if not (gather and rank_and_world()[1] > 1):  # ranks gather ids for ITM: keep their common length
            ids, mask = trim_padding(ids, mask)
        pooled, tokens = self._vision(images)  # [B, Dv], [B, S, Dv]
        terms: dict[str, torch.Tensor] = {}
        w = self.loss_weights
        if w["itc_weight"] or w["itm_weight"]:  # a captioning fine-tune (both 0) skips the text encoder
            image_feat = F.normalize(self.image_projection(pooled), dim=-1)  # [B, E]
            text_feat = F.normalize(self.text_projection(self.text.encode(ids, mask)[:, 0]), dim=-1)  # [B, E]
        if w["itc_weight"]:
            terms.update(self._itc(image_feat, text_feat, images, ids, mask, gather))
        if w["itm_weight"]:
            terms.update(self._itm(image_feat, text_feat, tokens, ids, mask, gather))
        if w["lm_weight"]:
            terms["lm_loss"] = self._lm(tokens, ids, mask, gather)
        if w["vqa_weight"] and "qa_ids" in batch and batch["qa_ids"].shape[0] > 0:
            qa_ids, qa_mask = trim_padding(batch["qa_ids"], batch["qa_mask"])
            answer = batch["qa_answer_mask"][:, : qa_ids.shape[1]]
            rows = batch["qa_owner"]  # [Q] image row of each question
            terms["vqa_loss"] = self._lm(tokens[rows], qa_ids, qa_mask.bool(), gather, answer_mask=answer)
        loss = sum(w[name.replace("_loss", "_weight")] * terms[name] for name in ("itc_loss", "itm_loss", "lm_loss", "vqa_loss") if name in terms)
        terms["loss"] = loss
        terms["logit_scale"] = (1.0 / self.temp).detach()  # what every contrastive family logs: the cosine multiplier
        return terms

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Generated captions and ITC embeddings of the batch's images, keyed by sample id."""
        return {"sample_id": batch["sample_id"], "caption": self.generate(batch["image"]), "image_emb": self.encode_image(batch["image"])}


__all__ = ["BLIP", "MixtureTextModel"]
