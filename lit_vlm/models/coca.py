"""CoCa: Contrastive Captioners (Yu et al., 2022).

image tower -> tokens [B, 1+N, Wv] --+-- contrastive pooler (1 query)  -> LN -> proj -> image embedding [B, E]
                                     +-- captioning pooler (n queries) -> image context [B, n, Dc]
caption [bos, w1 .. eos] + CLS ------> unimodal decoder layers (causal, text only)
                                         +-- CLS (last position) -> LN -> proj -> text embedding [B, E]
                                         +-- tokens -> multimodal layers (causal self-attention +
                                                       cross-attention to the image context) -> logits
loss = contrastive_weight * InfoNCE(image, text) + caption_weight * caption cross-entropy

As in the paper, the decoder's first layers omit cross-attention and encode the text alone; a
learned CLS token appended after each caption's last real token gives the contrastive text
embedding (it sees every real token and itself, never padding, and nothing sees it). The
remaining layers cross-attend to the captioning pooler's queries. Both poolers read the image
tower's tokens in parallel (the paper's "task-specific attentional pooling"). Defaults follow
open_clip's CoCa training recipe: contrastive weight 1, caption weight 2.

The decoder is one :class:`~lit_vlm.modules.TextDecoder` whose last ``cross_attention_layers``
blocks cross-attend: captioning runs it as is, with a key/value cache (the CLS token is only
appended in training and in ``encode_text``; causal attention makes it invisible to the other
positions, so generation needs no change).

Implements ``encode_image`` / ``encode_text`` (retrieval, zero-shot) and ``generate`` (captioning,
VQA). ``accum_freq`` accumulates exactly: the caption loss travels as per-sample sums and token
counts, so the accumulated loss is the token mean over the whole group; under DDP the caption loss
is the token mean over the global batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lit_vlm.errors import UserError
from lit_vlm.losses import caption_loss, clip_loss, global_token_mean
from lit_vlm.models.base import VLMModule
from lit_vlm.models.generating import GeneratingMixin, check_generation_options
from lit_vlm.modules import AttentionalPooler, ConvNet, TextDecoder, VisionTransformer, trim_padding

EVAL_TERMS = ("loss", "contrastive_loss", "caption_loss", "vqa_loss", "acc_i2t", "acc_t2i")


class CoCa(GeneratingMixin, VLMModule):
    """CoCa: a contrastive dual encoder whose text tower is also an image-conditioned captioner.

    Args:
        vision: The image tower, a ViT or a :class:`ConvNet`; its tokens (a ViT's after ``ln_post``, a
            ConvNet's spatial mean then its map) feed both attentional poolers.
            ``image_size`` is taken from the data when left unset.
        decoder: The text decoder. Its first ``layers - cross_attention_layers`` blocks are the
            unimodal text encoder, the rest the multimodal decoder (``cross_attention_layers``
            must be in [1, layers - 1]). ``vocab_size`` and ``context_length`` come from the data;
            its ``context_dim`` (default: its width) is the width of the image context.
        embed_dim: Width of the joint contrastive embedding space.
        caption_queries: Queries of the captioning pooler: the number of image tokens the
            multimodal layers attend to (256 in the paper).
        pooler_heads: Attention heads of both poolers (must divide the image tower's width and
            the decoder's ``context_dim``).
        contrastive_weight: Weight of the contrastive loss (lambda_con; 1 in open_clip's recipe).
        caption_weight: Weight of the captioning loss (lambda_cap; 2 in open_clip's recipe).
        label_smoothing: Label smoothing of the captioning cross-entropy.
        vqa_weight: Weight of the question-answering loss on batches that carry questions (the
            DataModule's ``train_vqa``): the decoder continues ``[bos] question`` with the answer,
            the loss on the answer tokens only, so ``generate(images, questions)`` answers.
        init_logit_scale: Initial log temperature t (logits are exp(t) * cosine); log(1/0.07).
        max_logit_scale: Upper clamp of exp(t) after every step.
        tokenizer: Tokenizer of the captions (``"synth"`` or a ``tokenizer.json`` path), used by
            ``generate`` to read prompts and write text; filled from the data by ``lit-vlm``.
        generation: Default decoding options of ``generate`` (``num_beams``, ``length_penalty``,
            ``repetition_penalty``, ``no_repeat_ngram_size``, ``min_new_tokens``, ``do_sample``,
            ``top_k``, ``top_p``, ``temperature``, ``max_new_tokens``, ``use_cache``; see
            :func:`lit_vlm.generation.generate`). Evaluation callbacks set ``max_new_tokens``.

    Optimiser, schedule, accumulation and ``init_from`` arguments are :class:`VLMModule`'s; this
    family's optimiser defaults: lr=5e-4, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6.
    """

    optim_defaults = dict(lr=5e-4, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)

    couples_batch = True
    eval_terms = EVAL_TERMS

    def __init__(
        self,
        vision: VisionTransformer | ConvNet,
        decoder: TextDecoder,
        embed_dim: int = 512,
        caption_queries: int = 256,
        pooler_heads: int = 8,
        contrastive_weight: float = 1.0,
        caption_weight: float = 2.0,
        label_smoothing: float = 0.0,
        vqa_weight: float = 1.0,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = 100.0,
        tokenizer: str | None = None,
        generation: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        n_uni = decoder.num_unimodal_layers
        if not 0 < n_uni < len(decoder.blocks) or not all(b.xattn is not None for b in decoder.blocks[n_uni:]):
            raise UserError(
                f"model decoder: CoCa needs unimodal layers followed by cross-attending ones; set the decoder's "
                f"cross_attention_layers in [1, layers - 1] (layers={len(decoder.blocks)}, unimodal={n_uni})"
            )
        if caption_queries < 1:
            raise UserError(f"model caption_queries must be >= 1, got {caption_queries}")
        if contrastive_weight < 0 or caption_weight < 0 or contrastive_weight + caption_weight == 0:
            raise UserError(
                f"model contrastive_weight and caption_weight must be >= 0 and not both 0, got "
                f"{contrastive_weight}, {caption_weight}"
            )
        context_dim = decoder.blocks[-1].xattn.context_dim
        for name, width in (("image tower width", vision.width), ("decoder context_dim", context_dim)):
            if width % pooler_heads:
                raise UserError(f"model pooler_heads={pooler_heads} must divide the {name} ({width})")
        self.vision = vision
        self.decoder = decoder
        self.contrast_pool = AttentionalPooler(vision.width, 1, pooler_heads)
        self.caption_pool = AttentionalPooler(context_dim, caption_queries, pooler_heads, context_dim=vision.width)
        self.image_ln = nn.LayerNorm(vision.width)
        self.image_projection = nn.Linear(vision.width, embed_dim, bias=False)
        self.cls_embedding = nn.Parameter(torch.randn(decoder.width) * 0.02)  # [D]
        self.text_ln = nn.LayerNorm(decoder.width)
        self.text_projection = nn.Linear(decoder.width, embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=vision.width**-0.5)
        nn.init.normal_(self.text_projection.weight, std=decoder.width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.max_log_scale = math.log(max_logit_scale)
        self.contrastive_weight = float(contrastive_weight)
        self.caption_weight = float(caption_weight)
        self.label_smoothing = float(label_smoothing)
        if vqa_weight < 0:
            raise UserError(f"model vqa_weight must be >= 0, got {vqa_weight}")
        self.vqa_weight = float(vqa_weight)
        self.tokenizer_spec = tokenizer
        self.generation_options = check_generation_options(generation)

    # ---- image side ------------------------------------------------------------------------------
    def _image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> (unnormalised embedding [B, E], captioning context [B, n, Dc])."""
        tokens = self.vision(images).tokens  # [B, 1+N, Wv]
        return self._contrastive(tokens), self.caption_pool(tokens)  # [B, E], [B, n, Dc]

    def _contrastive(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens [B, 1+N, Wv] -> unnormalised contrastive embedding [B, E]."""
        return self.image_projection(self.image_ln(self.contrast_pool(tokens).squeeze(1)))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """images [B, 3, H, W] -> embeddings [B, E] (L2-normalised unless ``normalize=False``)."""
        emb = self._contrastive(self.vision(images).tokens)  # [B, E]
        return F.normalize(emb, dim=-1) if normalize else emb

    def generation_context(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        tokens = self.vision(images).tokens  # [B, 1+N, Wv]
        return self.caption_pool(tokens), None  # [B, n, Dc]

    def generation_decoder(self) -> TextDecoder:
        return self.decoder

    # ---- text side -------------------------------------------------------------------------------
    def _unimodal(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unimodal layers over the caption plus the CLS token.

        ids, mask [B, L] -> (text embedding [B, E] unnormalised, token states [B, L, D],
        self-attention mask of the caption positions [B, 1, L, L])."""
        dec = self.decoder
        B, L = ids.shape
        mask = mask.bool()
        full = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # [B, L+1]: CLS is real
        x = torch.cat([dec.embed(ids, mask), self.cls_embedding.to(dec.token_embedding.weight.dtype).expand(B, 1, -1)], 1)
        attn = dec.attention_mask(full, L + 1)  # [B, 1, L+1, L+1]
        x, _ = dec.run_blocks(x, attn, [None] * len(dec.blocks), start=0, stop=dec.num_unimodal_layers)  # [B, L+1, D]
        text_emb = self.text_projection(self.text_ln(x[:, -1]))  # [B, E]
        return text_emb, x[:, :-1], attn[:, :, :L, :L]

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
        """ids [N, L], mask [N, L] -> embeddings [N, E] from the CLS token of the unimodal layers."""
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        ids, mask = trim_padding(ids, mask)
        emb, _, _ = self._unimodal(ids, mask)
        return F.normalize(emb, dim=-1) if normalize else emb

    # ---- training --------------------------------------------------------------------------------
    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        """Per-sample features of the loss: normalised embeddings [B, E] and the caption loss's
        per-sample sums and token counts [B]."""
        image_emb, context = self._image(batch["image"])  # [B, E], [B, n, Dc]
        ids, mask = trim_padding(batch["text_ids"], batch["text_mask"])  # [B, L]
        text_emb, states, attn = self._unimodal(ids, mask)  # [B, E], [B, L, D], [B, 1, L, L]
        dec = self.decoder
        x, _ = dec.run_blocks(states, attn, dec.context_kv(context), start=dec.num_unimodal_layers)  # [B, L, D]
        _, logits = dec.head(x)  # [B, L, V]
        sums, counts = caption_loss(logits, ids, mask, self.label_smoothing)  # [B], [B]
        out = {
            "image": F.normalize(image_emb, dim=-1),
            "text": F.normalize(text_emb, dim=-1),
            "caption_sum": sums,
            "caption_count": counts,
        }
        if self.vqa_weight and "qa_ids" in batch:
            qa_ids, qa_mask = trim_padding(batch["qa_ids"], batch["qa_mask"])  # [Q, l]
            rows = batch["qa_owner"]  # [Q] image row of each question
            qa_logits = dec(qa_ids, qa_mask, context=context[rows]).logits  # [Q, l, V]
            out["vqa_sum"], out["vqa_count"] = caption_loss(
                qa_logits, qa_ids, qa_mask.bool(), self.label_smoothing, loss_mask=batch["qa_answer_mask"][:, : qa_ids.shape[1]]
            )  # [Q], [Q]
        return out

    def loss_from_features(
        self, features: dict[str, torch.Tensor], gather: bool = True, detach_scalars: bool = False
    ) -> dict[str, torch.Tensor]:
        scale = self.logit_scale.exp()
        if detach_scalars:
            scale = scale.detach()
        con = clip_loss(features["image"], features["text"], scale, gather=gather)
        cap = global_token_mean(features["caption_sum"], features["caption_count"], gather=gather)
        loss = self.contrastive_weight * con["loss"] + self.caption_weight * cap
        extra = {}
        if "vqa_sum" in features:
            vqa = global_token_mean(features["vqa_sum"], features["vqa_count"], gather=gather)
            loss = loss + self.vqa_weight * vqa
            extra["vqa_loss"] = vqa.detach()
        return {
            **extra,
            "loss": loss,
            "contrastive_loss": con["loss"].detach(),
            "caption_loss": cap.detach(),
            "acc_i2t": con["acc_i2t"],
            "acc_t2i": con["acc_t2i"],
            "logit_scale": scale.detach(),
        }

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.loss_from_features(self.features(batch), gather=self.training)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0, self.max_log_scale)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Generated captions and embeddings of the batch's images, keyed by sample id."""
        return {
            "sample_id": batch["sample_id"],
            "caption": self.generate(batch["image"]),
            "image_emb": self.encode_image(batch["image"]),
        }


__all__ = ["CoCa"]
