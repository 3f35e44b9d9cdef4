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

from typing import Any

import torch
from torch import Tensor

from lit_vlm.datamodules.interleaved import END_OF_CHUNK, IMAGE_TOKEN, with_media_tokens
from lit_vlm.errors import UserError
from lit_vlm.losses import global_token_mean, token_cross_entropy
from lit_vlm.models.bridge import Bridge
from lit_vlm.modules import ConvNet, VisionTransformer, trim_padding
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

    def condition(self, media: Tensor | None, media_locations: Tensor | None = None, media_mask: Tensor | None = None) -> None:
        """Give the cross-attention blocks the media of the next LM call (None: clear them)."""
        times = None if media is None else text_time(media_locations)  # [B, T]
        for layer in self.flamingo_layers:
            layer.condition(media, times, media_mask)

    def logits(self, ids: Tensor, mask: Tensor, images: Tensor, media_mask: Tensor) -> Tensor:
        """Next-token logits [B, T, V] of documents ``ids`` [B, T] with their images [B, N, 3, H, W]."""
        self.condition(self.media(images), ids == self.image_id, media_mask)
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


__all__ = ["Flamingo"]
