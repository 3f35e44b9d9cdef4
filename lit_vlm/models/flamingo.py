"""Flamingo (Alayrac et al., 2022; OpenFlamingo, Awadalla et al., 2023): a frozen language model that
reads documents of interleaved images and text.

Each image's tokens from a frozen image tower are resampled into a few latents (Perceiver
resampler); every ``cross_attn_every`` decoder layers of the frozen LM get a gated cross-attention
block before them, through which each text token sees the latest image at or before it. The gates
start at 0, so the untrained model is its LM exactly. What trains: the resampler, the
cross-attention blocks and the rows of ``<image>`` and ``<|endofchunk|>`` that are added to the
LM's input and output embeddings (OpenFlamingo trains the input rows; the output rows train here
too, so that a frozen LM can learn to end a chunk). The loss is the LM's next-token loss on the
documents' labels (:mod:`lit_vlm.datamodules.interleaved`)::

    ids     [bos] text <image>a red circle<|endofchunk|><image>a blue square<|endofchunk|>[eos]
    sees     -     -      1  1   1    1        1          2     2   2     2      2
    loss               ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^       ^^^^^^^^^^^^^^^^^^^^^^^
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lit_vlm import generation
from lit_vlm.datamodules.interleaved import END_OF_CHUNK, IMAGE_TOKEN, with_media_tokens
from lit_vlm.errors import UserError
from lit_vlm.losses import global_token_mean, token_cross_entropy
from lit_vlm.models.bridge import Bridge
from lit_vlm.modules import ConvNet, VisionTransformer, trim_padding
from lit_vlm.modules.decoder import DecoderOutput
from lit_vlm.modules.freeze import lock
from lit_vlm.modules.language_model import IGNORE_INDEX
from lit_vlm.modules.perceiver import (
    FlamingoLayer,
    GatedCrossAttention,
    PerceiverResampler,
    find_decoder_layers,
    text_time,
    wrap_decoder_layers,
)


class Flamingo(Bridge):
    """Flamingo over a lit-vlm image tower and a local Hugging Face causal LM (see the module docstring).

    Args:
        vision: The frozen image tower (a ViT or a :class:`ConvNet`), usually from a CLIP run
            through ``init_from``; its patch tokens (``vision_layer`` of a ViT) are the media.
        vision_layer: Which ViT layer's tokens are used (-1 the last; a ConvNet has only -1).
        num_latents: Latents per image (Flamingo: 64).
        resampler_depth: Perceiver resampler layers (Flamingo: 6).
        heads: Attention heads of the resampler and the cross-attention blocks.
        cross_attn_every: A gated cross-attention block before every n-th decoder layer (layers
            n-1, 2n-1, ...; OpenFlamingo: 1 to 4 by model size).
        only_immediate: Each token sees only the latest image at or before it (Flamingo); False:
            every earlier image.
        decoder_layers: Dotted name of the LM's decoder-layer list (``model.layers``, ``transformer.h``);
            default: found from the LM's config.
        **kwargs: :class:`~lit_vlm.models.bridge.Bridge`'s (``language_model``, ``lm_dtype``, ...) and
            :class:`~lit_vlm.models.base.VLMModule`'s arguments.

    This family's optimiser defaults: lr=1e-4 (OpenFlamingo), weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8.
    """

    optim_defaults = dict(lr=1e-4, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)

    def __init__(
        self,
        vision: VisionTransformer | ConvNet,
        vision_layer: int = -1,
        num_latents: int = 64,
        resampler_depth: int = 6,
        heads: int = 8,
        cross_attn_every: int = 1,
        only_immediate: bool = True,
        decoder_layers: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if self.lm is None or self.lm.is_encoder_decoder:
            raise UserError("Flamingo needs a decoder-only language model: set model language_model to a causal LM folder")
        if self.train_lm != "frozen":
            raise UserError(f"Flamingo keeps its language model frozen (only the new layers train); got train_lm={self.train_lm!r}")
        if isinstance(vision, ConvNet) and vision_layer != -1:
            raise UserError(f"model vision_layer={vision_layer}: a ConvNet image tower has one feature map; set vision_layer: -1")
        if self.generate_with != "suite":
            raise UserError("Flamingo generates with the suite's decoder (its media ride in the key/value cache); set generate_with: suite")
        if cross_attn_every < 1:
            raise UserError(f"model cross_attn_every must be >= 1, got {cross_attn_every}")
        self.vision = vision
        lock(self.vision)
        self.vision_layer = int(vision_layer)
        self.resampler = PerceiverResampler(vision.width, resampler_depth, heads, num_latents)
        self._add_media_tokens()
        self.decoder_layers = find_decoder_layers(self.lm.model, decoder_layers)
        wrap_decoder_layers(self.lm.model, self.decoder_layers, lambda i: GatedCrossAttention(
            self.lm.width, vision.width, heads, only_immediate=only_immediate) if (i + 1) % cross_attn_every == 0 else None)

    @property
    def flamingo_layers(self) -> list[FlamingoLayer]:
        """The LM's wrapped decoder layers (kept inside the LM only, so checkpoints hold them once)."""
        return list(self.lm.model.get_submodule(self.decoder_layers))

    @property
    def end_id(self) -> int:
        """Generation ends a chunk: ``<|endofchunk|>``."""
        return self.chunk_end_id

    def _add_media_tokens(self) -> None:
        """``<image>`` and ``<|endofchunk|>`` in the tokenizer, and their rows in the LM's input and
        output embeddings; only those rows train (a gradient hook zeroes the rest)."""
        tok = with_media_tokens(self.text_tokenizer)
        self.image_id, self.chunk_end_id = tok.token_to_id(IMAGE_TOKEN), tok.token_to_id(END_OF_CHUNK)
        model = self.lm.model
        old = model.get_input_embeddings().weight.shape[0]
        if tok.vocab_size > old:
            model.resize_token_embeddings(tok.vocab_size, mean_resizing=False)
        new_rows = torch.zeros(model.get_input_embeddings().weight.shape[0], 1, dtype=torch.bool)
        new_rows[[self.image_id, self.chunk_end_id]] = True
        self.register_buffer("new_token_rows", new_rows, persistent=False)  # [V, 1]
        for emb in {model.get_input_embeddings(), model.get_output_embeddings()}:
            emb.weight.requires_grad_(True)
            emb.weight.no_weight_decay = True  # decay would move the frozen rows (see lit_vlm.optim)
            emb.weight.register_hook(lambda grad: grad * self.new_token_rows.to(grad.dtype))

    # ---- images into latents ---------------------------------------------------------------------
    def media(self, images: Tensor) -> Tensor:
        """Latents [B, N, n, Dv] of images [B, N, 3, H, W] (each image resampled on its own)."""
        B, N = images.shape[:2]
        with torch.no_grad():
            flat = images.flatten(0, 1)  # [B N, 3, H, W]
            if isinstance(self.vision, ConvNet):
                tokens = self.vision(flat).tokens[:, 1:]  # [B N, h w, Dv]: the map, without its mean
            else:
                tokens = self.vision(flat, output_hidden_states=True).hidden_states[self.vision_layer][:, 1:]  # [B N, P, Dv]
        return self.resampler(tokens.view(B, N, *tokens.shape[1:]))  # [B, N, n, Dv]

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """L2-normalised pooled features [B, Dv] of the frozen image tower, images [B, 3, H, W]
        (what few-shot evaluation ranks demonstrations by: RICES)."""
        pooled = self.vision(images).pooled  # [B, Dv]
        return torch.nn.functional.normalize(pooled.float(), dim=-1)

    def condition(self, media: Tensor | None, times: Tensor | None = None, media_mask: Tensor | None = None) -> None:
        """Give the cross-attention blocks the media [B, N, n, Dv] of the next LM call, each token's
        :func:`text_time` [B, T] and the real images [B, N] (None: clear them)."""
        for layer in self.flamingo_layers:
            layer.condition(media, times, media_mask)

    def logits(self, ids: Tensor, mask: Tensor, images: Tensor, media_mask: Tensor) -> Tensor:
        """Next-token logits [B, T, V] of documents ``ids`` [B, T] with their images [B, N, 3, H, W]."""
        self.condition(self.media(images), text_time(ids == self.image_id), media_mask)
        try:
            return self.lm.model(input_ids=ids, attention_mask=mask).logits  # [B, T, V]
        finally:
            self.condition(None)

    # ---- training --------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict[str, Tensor]:
        ids, mask = trim_padding(batch["input_ids"], batch["attention_mask"])  # [B, T]
        labels = batch["labels"][:, : ids.shape[1]]  # [B, T]
        logits = self.logits(ids, mask, batch["images"], batch["media_mask"])  # [B, T, V]
        targets = labels[:, 1:]  # [B, T-1]: position t predicts token t + 1
        sums, counts = token_cross_entropy(logits[:, :-1], targets.clamp_min(0), targets != IGNORE_INDEX)
        loss = global_token_mean(sums, counts, gather=self.training)
        gates = torch.stack([layer.xattn.attn_gate for layer in self.flamingo_layers if layer.xattn is not None])
        return {"loss": loss, "target_tokens": counts.sum() / len(counts), "attn_gate_mean": gates.tanh().abs().mean().detach()}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Each block's tanh(gate) values to TensorBoard (attention and feed-forward), as the run goes."""
        if self.logger is None or (self.global_step % max(1, self.trainer.log_every_n_steps)):
            return
        for i, layer in enumerate(self.flamingo_layers):
            if layer.xattn is not None:
                self.log(f"gates/layer{i}_attn", layer.xattn.attn_gate.detach().tanh().mean(), rank_zero_only=True)
                self.log(f"gates/layer{i}_ff", layer.xattn.ff_gate.detach().tanh().mean(), rank_zero_only=True)

    # ---- interleaved prompts: generation and scoring ---------------------------------------------
    def interleaved_ids(self, prompts: list[str], media_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Right-padded ids and mask [B, L] of ``prompts`` (the start token first), each with as many
        ``<image>`` tokens as its row's images in ``media_mask`` [B, N]."""
        ids, mask = self.encode_prompts(prompts, len(prompts), media_mask.device)  # [B, L]
        for b, prompt in enumerate(prompts):
            found, want = int((ids[b] == self.image_id).sum()), int(media_mask[b].sum())
            if found != want:
                raise UserError(f"prompt {b} has {found} {IMAGE_TOKEN} tokens for {want} images: {prompt[:80]!r}")
        return ids, mask

    @torch.no_grad()
    def generate_interleaved(self, images: Tensor, media_mask: Tensor, prompts: list[str],
                             max_new_tokens: int | None = None, **options: Any) -> list[str]:
        """Continue each interleaved prompt (``<image>`` marks where its images [B, N, 3, H, W] go;
        ``media_mask`` [B, N] the real ones) until ``<|endofchunk|>``: the media are resampled once,
        the text is decoded with the LM's key/value cache."""
        merged = self.call_options(options, max_new_tokens, "generate_interleaved")
        tok = self.text_tokenizer
        was_training = self.training
        self.eval()
        try:
            ids, mask = self.interleaved_ids(prompts, media_mask)  # [B, L]
            new = generation.generate(_MediaDecoder(self), ids, mask, self.media(images), media_mask.bool(),
                                      eos_id=self.end_id, pad_id=tok.pad_id, **merged)  # [B, <= max_new_tokens]
        finally:
            self.train(was_training)
        rows = generation.decode_tokens(new, self.end_id, tok.pad_id)
        return [tok.backend.decode(r, skip_special_tokens=True).strip() for r in rows]

    caption_prompt = "Output:"  # OpenFlamingo's captioning prompt

    def generate(self, images: Tensor, prompts: list[str] | None = None, max_new_tokens: int | None = None,
                 **options: Any) -> list[str]:
        """images [B, 3, H, W], B prompts -> B texts: each prompt after its image (``<image>prompt``)."""
        prompts = [self.caption_prompt] * images.shape[0] if prompts is None else list(prompts)
        media_mask = torch.ones(images.shape[0], 1, dtype=torch.bool, device=images.device)
        return self.generate_interleaved(images[:, None], media_mask, [IMAGE_TOKEN + p for p in prompts], max_new_tokens, **options)

    @torch.no_grad()
    def continuation_log_likelihood(self, images: Tensor, media_mask: Tensor, context: str, continuations: list[str]) -> Tensor:
        """Mean per-token log-likelihood [C] of each continuation after one interleaved ``context``
        (its images [1, N, 3, H, W]); the context runs once and its key/value cache is shared."""
        tok = self.text_tokenizer
        was_training = self.training
        self.eval()
        try:
            ids, mask = self.interleaved_ids([context], media_mask)  # [1, L]
            decoder = _MediaDecoder(self)
            out = decoder(ids, mask, self.media(images), media_mask.bool(), use_cache=True)
            rows = [tok.backend.encode(c, add_special_tokens=False).ids for c in continuations]
            C, L = len(rows), max(map(len, rows))
            cont = torch.full((C, L), tok.pad_id, dtype=torch.long, device=ids.device)  # [C, L]
            cmask = torch.zeros(C, L, dtype=torch.bool, device=ids.device)
            for c, row in enumerate(rows):
                cont[c, : len(row)], cmask[c, : len(row)] = torch.tensor(row, device=ids.device), True
            cache = out.cache.reorder(torch.zeros(C, dtype=torch.long, device=ids.device))
            logits = torch.cat([out.logits[:, -1:].expand(C, -1, -1), decoder(cont, cmask, cache=cache).logits[:, :-1]], 1)  # [C, L, V]
        finally:
            self.train(was_training)
        logp = logits.float().log_softmax(-1).gather(-1, cont[..., None])[..., 0]  # [C, L]
        return (logp * cmask).sum(1) / cmask.sum(1)  # [C]


@dataclass
class _MediaCache:
    """The LM's cache plus what the next tokens' cross-attention needs: the media, the real images
    and how many images each row has seen."""

    lm: Any
    media: Tensor  # [B, N, n, Dv]
    media_mask: Tensor  # [B, N]
    seen: Tensor  # [B]

    def reorder(self, index: Tensor) -> _MediaCache:
        return _MediaCache(self.lm.reorder(index), self.media[index], self.media_mask[index], self.seen[index])


class _MediaDecoder(torch.nn.Module):
    """Flamingo's LM as a :class:`~lit_vlm.generation.StepDecoder`: ``context`` is the media
    [B, N, n, Dv] and ``context_mask`` the real images [B, N]; a cached step's tokens see the
    latest image of their row."""

    def __init__(self, flamingo: Flamingo) -> None:
        super().__init__()
        self.flamingo = flamingo

    def forward(self, ids: Tensor, mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, cache: _MediaCache | None = None, use_cache: bool = False) -> DecoderOutput:
        f = self.flamingo
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        media, media_mask = (context, context_mask) if cache is None else (cache.media, cache.media_mask)
        seen = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device) if cache is None else cache.seen
        times = seen[:, None] + text_time((ids == f.image_id) & mask)  # [B, L]
        f.condition(media, times, media_mask)
        try:
            out = f.lm(ids, mask, cache=None if cache is None else cache.lm, use_cache=use_cache)
        finally:
            f.condition(None)
        kept = _MediaCache(out.cache, media, media_mask, times[:, -1]) if use_cache else None
        return DecoderOutput(logits=out.logits, hidden=None, cache=kept)


__all__ = ["Flamingo"]
