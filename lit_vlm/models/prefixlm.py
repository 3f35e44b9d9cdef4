"""PrefixLM: SimVLM's prefix language modelling (Wang et al., 2022).

One transformer reads [image tokens, text]: the image tokens (the image tower's tokens, projected
to the text width) and a text prefix attend to each other bidirectionally; the rest of the text is
causal and is the only part the loss is computed on:

    sequence   [img_1 .. img_S | bos t_1 .. t_k | t_k+1 .. eos]
    attention  <---- bidirectional prefix ----> | causal suffix
    loss                                          ^ on the suffix tokens only

In training the split point k is drawn per caption (``prefix_sampling="random"``: uniform over the
caption, the start token always in the prefix; ``"none"``: prefix = image + start token, plain
captioning). Generation feeds the image and the prompt as the prefix and decodes the suffix with a
key/value cache, so ``generate(images, prompts)`` (captioning, VQA) works as in every family.

Text-only data mixes in through the same path: a row whose image is absent (batch key
``has_image`` False) attends to no image token and is trained as a text-only prefix LM, as SimVLM
mixes in C4. ``text_only_ratio`` turns that fraction of the training pairs into text-only rows (their
captions without the image), for experiments without a separate text corpus.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lit_vlm.errors import UserError
from lit_vlm.losses import caption_loss, global_token_mean
from lit_vlm.models.base import VLMModule
from lit_vlm.models.generating import GeneratingMixin, check_generation_options
from lit_vlm.modules import ConvNet, TextDecoder, VisionTransformer, trim_padding
from lit_vlm.modules.decoder import DecoderCache, DecoderOutput


class PrefixDecoder(nn.Module):
    """A :class:`TextDecoder` without cross-attention run as a prefix LM over [image tokens, text].

    Same call contract as ``TextDecoder`` (so :func:`lit_vlm.generation.generate` steps it): the
    first call (no cache) takes the image tokens as ``context`` and makes everything it is given
    (image and prompt) a bidirectional prefix; later calls append causal tokens.
    """

    def __init__(self, decoder: TextDecoder, image_width: int) -> None:
        super().__init__()
        if decoder.has_cross_attention:
            raise UserError("PrefixLM's decoder reads the image tokens in its own sequence: set cross_attention_layers: 0")
        self.decoder = decoder
        self.image_proj = nn.Linear(image_width, decoder.width)
        self.image_ln = nn.LayerNorm(decoder.width)

    def sequence(
        self,
        ids: Tensor,  # [B, L] text ids
        mask: Tensor,  # [B, L] bool
        context: Tensor,  # [B, S, Dv] image tokens
        context_mask: Tensor | None,  # [B, S] bool, False for absent images
        prefix_len: Tensor,  # [B] text tokens in the prefix (the start token counts)
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Embeddings [B, S+L, D], real-token mask [B, S+L] and attention mask [B, 1, S+L, S+L]."""
        dec = self.decoder
        B, S = context.shape[:2]
        L = ids.shape[1]
        image = self.image_ln(self.image_proj(context))  # [B, S, D]
        cmask = torch.ones(B, S, dtype=torch.bool, device=ids.device) if context_mask is None else context_mask.bool()
        x = torch.cat([image, dec.embed(ids, mask)], dim=1)  # [B, S+L, D] (text positions count text only)
        full = torch.cat([cmask, mask.bool()], dim=1)  # [B, S+L]
        T = S + L
        q = torch.arange(T, device=ids.device)[:, None]
        k = torch.arange(T, device=ids.device)[None, :]
        in_prefix = k[None] < (S + prefix_len)[:, None, None]  # [B, 1, T] keys inside each row's prefix
        allowed = ((k <= q)[None] | in_prefix) & full[:, None, :]  # [B, T, T]
        allowed = allowed | (k == q)[None]  # a padded query sees itself (finite, never used)
        return x, full, allowed[:, None]

    def forward(
        self,
        ids: Tensor,
        mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        cache: DecoderCache | None = None,
        use_cache: bool = False,
        prefix_length: int | None = None,
    ) -> DecoderOutput:
        """``prefix_length``: text columns of ``ids`` in the prefix on a call without cache (default
        all of them: the prompt); the generation loop passes the prompt's length when it recomputes
        prompt + generated tokens without cache."""
        dec = self.decoder
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        no_cross = [None] * len(dec.blocks)
        if cache is None:  # the prefix: image + prompt, bidirectional
            if context is None:
                raise ValueError("PrefixLM needs the image tokens as context on its first call")
            S = context.shape[1]
            plen = ids.shape[1] if prefix_length is None else prefix_length
            x, full, allowed = self.sequence(ids, mask, context, context_mask, torch.full((ids.shape[0],), plen, device=ids.device))
            x, kvs = dec.run_blocks(x, allowed, no_cross)
            hidden, logits = dec.head(x[:, S:])
        else:  # causal continuation: text positions count the text tokens only
            past_text = cache.mask[:, cache.context_mask.shape[1]:] if cache.context_mask is not None else cache.mask
            x = dec.embed(ids, torch.cat([past_text, mask], dim=1))
            full = torch.cat([cache.mask, mask], dim=1)
            allowed = dec.attention_mask(full, ids.shape[1])
            x, kvs = dec.run_blocks(x, allowed, no_cross, past=cache.self_kv)
            hidden, logits = dec.head(x)
        out_cache = None
        if use_cache:
            ctx_mask = cache.context_mask if cache is not None else full[:, : context.shape[1]]
            out_cache = DecoderCache(self_kv=kvs, cross_kv=[], mask=full, context_mask=ctx_mask)
        return DecoderOutput(logits=logits, hidden=hidden, cache=out_cache)


class PrefixLM(GeneratingMixin, VLMModule):
    """SimVLM-style prefix language model over image tokens and text (see the module docstring).

    Args:
        vision: The image tower, a ViT or a :class:`ConvNet`; its tokens (a ViT's after ``ln_post``, a
            ConvNet's spatial mean then its map) are projected into the sequence.
        decoder: The text transformer, without cross-attention (``cross_attention_layers: 0``);
            ``vocab_size`` and ``context_length`` come from the data.
        prefix_sampling: ``"random"`` (a split point drawn per caption; the loss covers what
            follows it) or ``"none"`` (prefix = image + start token: the whole caption is the target).
        caption_ratio: With ``"random"``, the fraction of training captions whose split is the start
            token, so the whole caption is the target (what captioning asks at generation time; a
            uniform split does it for one caption in L only).
        text_only_ratio: Fraction of training pairs turned into text-only rows (image dropped).
        label_smoothing: Label smoothing of the LM loss.
        vqa_weight: Weight of the question-answering loss on batches that carry questions (the
            DataModule's ``train_vqa``): image + ``[bos] question`` is the prefix, the answer the
            suffix, as prefix LM does VQA.
        tokenizer: Tokenizer of the captions, for ``generate``; filled from the data by ``lit-vlm``.
        generation: Default decoding options of ``generate`` (see :func:`lit_vlm.generation.generate`).

    Optimiser, schedule, accumulation and ``init_from`` arguments are :class:`VLMModule`'s; this
    family's optimiser defaults: lr=5e-4, weight_decay=0.05, betas=(0.9, 0.98), eps=1e-6.
    """

    optim_defaults = dict(lr=5e-4, weight_decay=0.05, betas=(0.9, 0.98), eps=1e-6)

    eval_terms = ("loss", "caption_loss", "vqa_loss")

    def __init__(
        self,
        vision: VisionTransformer | ConvNet,
        decoder: TextDecoder,
        prefix_sampling: str = "random",
        caption_ratio: float = 0.0,
        text_only_ratio: float = 0.0,
        label_smoothing: float = 0.0,
        vqa_weight: float = 1.0,
        tokenizer: str | None = None,
        generation: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if prefix_sampling not in ("random", "none"):
            raise UserError(f"model prefix_sampling must be 'random' or 'none', got {prefix_sampling!r}")
        if not 0.0 <= caption_ratio <= 1.0:
            raise UserError(f"model caption_ratio must be in [0, 1], got {caption_ratio}")
        if not 0.0 <= text_only_ratio < 1.0:
            raise UserError(f"model text_only_ratio must be in [0, 1), got {text_only_ratio}")
        self.vision = vision
        self.lm = PrefixDecoder(decoder, vision.width)
        self.prefix_sampling = prefix_sampling
        self.caption_ratio = float(caption_ratio)
        self.text_only_ratio = float(text_only_ratio)
        self.label_smoothing = float(label_smoothing)
        if vqa_weight < 0:
            raise UserError(f"model vqa_weight must be >= 0, got {vqa_weight}")
        self.vqa_weight = float(vqa_weight)
        self.tokenizer_spec = tokenizer
        self.generation_options = check_generation_options(generation)

    def generation_context(self, images: Tensor) -> tuple[Tensor, None]:
        return self.vision(images).tokens, None

    def generation_decoder(self) -> PrefixDecoder:
        return self.lm

    def _suffix_loss(self, tokens: Tensor, has_image: Tensor, ids: Tensor, mask: Tensor, prefix: Tensor) -> Tensor:
        """Token-mean loss of the text after ``prefix`` [B] text tokens, image tokens [B, S, Dv] first."""
        B, L = ids.shape
        S = tokens.shape[1]
        x, _, allowed = self.lm.sequence(ids, mask, tokens, has_image[:, None].expand(B, S), prefix)
        dec = self.lm.decoder
        x, _ = dec.run_blocks(x, allowed, [None] * len(dec.blocks))
        _, logits = dec.head(x[:, S:])  # [B, L, V]
        targets = torch.arange(L, device=ids.device)[None] >= prefix[:, None]  # [B, L] text positions in the suffix
        sums, counts = caption_loss(logits, ids, mask, self.label_smoothing, loss_mask=targets)
        return global_token_mean(sums, counts, gather=self.training)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        ids, mask = trim_padding(batch["text_ids"], batch["text_mask"])  # [B, L]
        mask = mask.bool()
        B, L = ids.shape
        tokens = self.vision(batch["image"]).tokens  # [B, S, Dv]
        has_image = batch.get("has_image")
        has_image = torch.ones(B, dtype=torch.bool, device=ids.device) if has_image is None else has_image.bool()
        if self.training and self.text_only_ratio > 0:
            has_image = has_image & (torch.rand(B, device=ids.device) >= self.text_only_ratio)
        length = mask.sum(1)  # [B]
        if self.training and self.prefix_sampling == "random":
            # prefix of k text tokens, k uniform in [1, length - 1]: at least one target remains
            k = 1 + (torch.rand(B, device=ids.device) * (length - 1).clamp_min(1)).long()
            prefix = torch.minimum(k, (length - 1).clamp_min(1))
            if self.caption_ratio > 0:
                whole = torch.rand(B, device=ids.device) < self.caption_ratio  # [B]: caption from the start token
                prefix = torch.where(whole, torch.ones_like(prefix), prefix)
        else:
            prefix = torch.ones(B, dtype=torch.long, device=ids.device)
        terms = {"caption_loss": self._suffix_loss(tokens, has_image, ids, mask, prefix)}
        if self.vqa_weight and "qa_ids" in batch and batch["qa_ids"].shape[0] > 0:
            qa_ids, qa_mask = trim_padding(batch["qa_ids"], batch["qa_mask"])
            answer = batch["qa_answer_mask"][:, : qa_ids.shape[1]].bool()
            rows = batch["qa_owner"]
            # prefix = image + [bos] question: the text tokens before the answer's first token
            qa_prefix = answer.long().argmax(1)  # [Q]
            terms["vqa_loss"] = self._suffix_loss(tokens[rows], torch.ones_like(rows, dtype=torch.bool), qa_ids, qa_mask.bool(), qa_prefix)
        loss = terms["caption_loss"] + self.vqa_weight * terms.get("vqa_loss", 0.0)
        return {"loss": loss, **terms, "text_only_fraction": (~has_image).float().mean()}

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"sample_id": batch["sample_id"], "caption": self.generate(batch["image"])}


__all__ = ["PrefixDecoder", "PrefixLM"]
