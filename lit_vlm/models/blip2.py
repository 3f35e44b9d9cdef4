"""BLIP-2 (Li et al., 2023): a Querying Transformer between a frozen image tower and a frozen LM.

Stage 1 (``stage: 1``, representation learning, no LM): the Q-Former's learned queries read the
frozen image tokens and learn three tasks at once, each with its own attention mask
(:mod:`lit_vlm.modules.qformer`):

- ITC: image-text similarity = the best of the queries' similarities to the text's first token,
  in-batch negatives over every rank (:func:`lit_vlm.losses.blip2_itc_loss`);
- ITM: match / no match of (image, text) from the queries read bidirectionally with the text,
  logits averaged over the queries; one hard negative text per image and image per text, drawn
  from the ITC similarities;
- ITG: the text generated from the queries (queries never see text; text sees the queries and
  its own past).

Stage 2 (``stage: 2``, generative learning, from a stage-1 run through ``init_from``): the query
outputs, linearly projected to the LM's width, are a soft prompt to a frozen LM, trained on
captions. A decoder-only LM (OPT's variant) reads the prompt before the caption; an encoder-decoder
LM (FlanT5's) reads it, and the caption's first part, in its encoder, and its decoder predicts the
rest (the caption split at a random token; ``caption_ratio`` of them at the start).

Capabilities: token-level retrieval (``encode_image_tokens``, ``encode_text_tokens``,
``similarity``: the max over queries), ITM re-ranking (``pair_features``, ``score_pairs``) in
stage 1; ``generate`` in both (stage 1 through the Q-Former's ITG head, stage 2 through the LM).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_vlm.distributed import gather_no_grad, rank_and_world
from lit_vlm.errors import UserError
from lit_vlm.losses import blip2_itc_loss, caption_loss, global_token_mean, itm_hard_negatives
from lit_vlm.models.bridge import Bridge
from lit_vlm.modules import ConvNet, VisionTransformer, trim_padding
from lit_vlm.modules.decoder import DecoderOutput
from lit_vlm.modules.freeze import lock
from lit_vlm.modules.language_model import left_pad
from lit_vlm.modules.qformer import QFormer


class QFormerDecoder(nn.Module):
    """The Q-Former's ITG head behind the decoder contract :func:`lit_vlm.generation.generate`
    steps (no cache: every step reads the queries and the whole text again)."""

    def __init__(self, owner: BLIP2) -> None:
        super().__init__()
        self.owner = owner

    def forward(self, ids: Tensor, mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, cache: Any = None, use_cache: bool = False) -> DecoderOutput:
        if use_cache or cache is not None:
            raise ValueError("the Q-Former generates without a cache: set generation use_cache: false")
        _, text = self.owner.qformer(context, ids, mask, task="itg")  # [B, L, D]
        return DecoderOutput(logits=self.owner.itg_logits(text), hidden=None, cache=None)


class BLIP2(Bridge):
    """BLIP-2 over a lit-vlm image tower and, in stage 2, a local Hugging Face causal LM.

    Args:
        vision: The image tower (frozen; usually a CLIP run's, through ``init_from``). Its tokens
            (after ``ln_post``) are what the queries read.
        qformer: The Querying Transformer (:class:`~lit_vlm.modules.qformer.QFormer`).
        stage: 1 (ITC, ITM, ITG; no LM) or 2 (soft prompt to ``language_model``).
        embed_dim: Width of the ITC space.
        itc_weight: Weight of the ITC loss (stage 1).
        itm_weight: Weight of the ITM loss (stage 1).
        itg_weight: Weight of the ITG loss (stage 1).
        caption_ratio: Stage 2 with an encoder-decoder LM: the fraction of captions whose split is
            at the start (the whole caption is the decoder's target, as captioning asks); the
            others split at a uniformly random token.
        **kwargs: :class:`~lit_vlm.models.bridge.Bridge`'s (``language_model`` in stage 2, ...) and
            :class:`~lit_vlm.models.base.VLMModule`'s arguments.

    This family's optimiser defaults (the paper's stage 1): lr=1e-4, weight_decay=0.05,
    betas=(0.9, 0.98), eps=1e-8.
    """

    optim_defaults = dict(lr=1e-4, weight_decay=0.05, betas=(0.9, 0.98), eps=1e-8)
    eval_terms = ("loss", "itc_loss", "itm_loss", "itg_loss", "lm_loss")

    def __init__(
        self,
        vision: VisionTransformer | ConvNet,
        qformer: QFormer,
        stage: int = 1,
        embed_dim: int = 256,
        itc_weight: float = 1.0,
        itm_weight: float = 1.0,
        itg_weight: float = 1.0,
        caption_ratio: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if stage not in (1, 2):
            raise UserError(f"model stage must be 1 or 2, got {stage!r}")
        if stage == 2 and self.lm is None:
            raise UserError("BLIP-2 stage 2 needs language_model: a local Hugging Face LM folder (decoder-only or encoder-decoder)")
        if not 0.0 <= caption_ratio <= 1.0:
            raise UserError(f"model caption_ratio must be in [0, 1], got {caption_ratio}")
        if stage == 1 and self.lm is not None:
            raise UserError("BLIP-2 stage 1 trains without a language model: leave language_model unset (stage 2 uses it)")
        self.stage = stage
        self.caption_ratio = float(caption_ratio)
        self.vision = vision
        lock(self.vision)
        self.qformer = qformer
        width = qformer.width
        self.vision_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Linear(width, embed_dim)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.itm_head = nn.Linear(width, 2)
        self.itg_ln = nn.LayerNorm(width)
        self.itg_bias = nn.Parameter(torch.zeros(qformer.token_embedding.num_embeddings))
        self.llm_proj = nn.Linear(width, self.lm.width) if stage == 2 else None
        self.weights = {"itc": float(itc_weight), "itm": float(itm_weight), "itg": float(itg_weight)}
        if stage == 1:
            self.generation_options = {"use_cache": False, **self.generation_options}

    # ---- the pieces -----------------------------------------------------------------------------
    def image_tokens(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.vision(images).tokens  # [B, S, Dv]

    def itg_logits(self, text: Tensor) -> Tensor:
        """Next-token logits [B, L, V] of the Q-Former's text outputs (tied to its word embeddings)."""
        return self.itg_ln(text) @ self.qformer.token_embedding.weight.T + self.itg_bias

    def query_features(self, image: Tensor) -> Tensor:
        queries, _ = self.qformer(image, task="itc")  # [B, Q, D]
        return F.normalize(self.vision_proj(queries), dim=-1)  # [B, Q, E]

    def text_features(self, ids: Tensor, mask: Tensor) -> Tensor:
        _, text = self.qformer(None, ids, mask, task="itc", with_queries=False)  # [N, L, D]
        return F.normalize(self.text_proj(text[:, 0]), dim=-1)  # [N, E]

    def itm_logits(self, image: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        queries, _ = self.qformer(image, ids, mask, task="itm")  # [N, Q, D]
        return self.itm_head(queries).mean(1)  # [N, 2]: averaged over the queries

    def prefix(self, images: Tensor) -> tuple[Tensor, None]:
        queries, _ = self.qformer(self.image_tokens(images), task="itc")  # [B, Q, D]
        return self.llm_proj(queries), None  # [B, Q, D_lm]

    # ---- training -------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict[str, Tensor]:
        ids, mask = trim_padding(batch["text_ids"], batch["text_mask"])  # [B, L]
        mask = mask.bool()
        if self.stage == 2:
            prefix, _ = self.prefix(batch["image"])  # [B, Q, D_lm]
            if self.lm.is_encoder_decoder:
                loss = self.split_caption_loss(prefix, ids, mask)
            else:
                loss = self.prefix_caption_loss(prefix, None, ids, mask)
            return {"loss": loss, "lm_loss": loss}
        image = self.image_tokens(batch["image"])  # [B, S, Dv]
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        terms: dict[str, Tensor] = {}
        itc = blip2_itc_loss(self.query_features(image), self.text_features(ids, mask), self.temp, gather=self.training)
        terms.update(itc_loss=itc["itc_loss"], acc_i2t=itc["acc_i2t"], acc_t2i=itc["acc_t2i"])
        if self.weights["itm"]:
            terms["itm_loss"] = self._itm_loss(image, ids, mask, itc)
        if self.weights["itg"]:
            _, text = self.qformer(image, ids, mask, task="itg")  # [B, L, D]
            sums, counts = caption_loss(self.itg_logits(text), ids, mask)
            terms["itg_loss"] = global_token_mean(sums, counts, gather=self.training)
        terms["loss"] = sum(self.weights[k] * terms[f"{k}_loss"] for k in ("itc", "itm", "itg") if f"{k}_loss" in terms)
        return terms

    def split_caption_loss(self, prefix: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """Stage 2, encoder-decoder LM: encoder = soft prompt + the caption's first k tokens, decoder
        target = the rest and the end token; k = 0 for ``caption_ratio`` of the captions (and in
        evaluation), else uniform in [1, n - 1]. Token mean, exact under DDP."""
        tok = self.text_tokenizer
        encoder_rows, decoder_rows = [], []
        for b in range(ids.shape[0]):
            text = ids[b, mask[b]]  # [n_b]: [bos] tokens [eos] as the data tokenised them
            if tok.bos_id is not None and len(text) and text[0] == tok.bos_id:
                text = text[1:]
            if tok.eos_id is not None and len(text) and text[-1] == tok.eos_id:
                text = text[:-1]
            k = 0
            if self.training and len(text) > 1 and float(torch.rand(())) >= self.caption_ratio:
                k = int(torch.randint(1, len(text), ()))
            encoder_rows.append(torch.cat([prefix[b], self.lm.embed(text[:k]).to(prefix.dtype)]))  # [Q + k, D]
            end = [] if tok.eos_id is None else [tok.eos_id]
            decoder_rows.append(torch.cat([text.new_tensor([self.lm.decoder_start_id]), text[k:], text.new_tensor(end)]))
        encoder_in, encoder_mask = left_pad(encoder_rows)  # [B, S, D]
        length = max(len(r) for r in decoder_rows)
        dec = ids.new_full((len(decoder_rows), length), tok.pad_id)  # [B, L]: start, suffix, end, pad
        dec_mask = torch.zeros(dec.shape, dtype=torch.bool, device=ids.device)
        for b, r in enumerate(decoder_rows):
            dec[b, : len(r)], dec_mask[b, : len(r)] = r, True
        logits = self.lm(dec, dec_mask, context=encoder_in, context_mask=encoder_mask).logits  # [B, L, V]
        sums, counts = caption_loss(logits, dec, dec_mask)
        return global_token_mean(sums, counts, gather=self.training)

    def _itm_loss(self, image: Tensor, ids: Tensor, mask: Tensor, itc: dict[str, Tensor]) -> Tensor:
        """Positives, a hard negative image per text and a hard negative text per image (3B pairs)."""
        B = ids.shape[0]
        _, world = rank_and_world() if self.training else (0, 1)
        neg_image, neg_text, ids_all, mask_all = itm_hard_negatives(
            None, None, ids, mask, 1.0, gather=self.training, similarities=(itc["sim_i2t"], itc["sim_t2i"]),
        )  # fmt: skip
        images_all = gather_no_grad(image) if world > 1 else image  # [W*B, S, Dv]
        pair_image = torch.cat([image, images_all[neg_image], image])  # [3B, S, Dv]
        pair_ids = torch.cat([ids, ids, ids_all[neg_text]])  # [3B, L]
        pair_mask = torch.cat([mask, mask, mask_all[neg_text]])
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(ids.device)  # [3B]
        return F.cross_entropy(self.itm_logits(pair_image, pair_ids, pair_mask).float(), labels)

    # ---- capabilities ---------------------------------------------------------------------------
    def encode_image_tokens(self, images: Tensor) -> tuple[Tensor, None]:
        """Normalised query features [B, Q, E] (retrieval by the best query)."""
        return self.query_features(self.image_tokens(images)), None

    def encode_text_tokens(self, ids: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        ids, mask = trim_padding(ids, mask)
        feat = self.text_features(ids, mask)[:, None]  # [N, 1, E]
        return feat, torch.ones(feat.shape[:2], dtype=torch.bool, device=feat.device)

    def similarity(self, image_tokens: Tensor, image_mask: Tensor | None, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
        """[I, T]: the best query's similarity to each text (both directions alike)."""
        return torch.einsum("iqe,te->iqt", image_tokens, text_tokens[:, 0]).amax(1)

    def pair_features(self, images: Tensor) -> Tensor:
        return self.image_tokens(images)  # [B, S, Dv]

    def score_pairs(self, image_features: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """ITM log-odds [N] of N (image tokens, text) pairs."""
        ids, mask = trim_padding(ids, mask)
        logits = self.itm_logits(image_features, ids, mask.bool()).float()  # [N, 2]
        return logits[:, 1] - logits[:, 0]

    def generation_context(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.prefix(images) if self.stage == 2 else (self.image_tokens(images), None)

    def generation_decoder(self) -> nn.Module:
        return self.lm if self.stage == 2 else QFormerDecoder(self)


__all__ = ["BLIP2", "QFormerDecoder"]
