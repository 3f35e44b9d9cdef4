"""LLaVA (Liu et al., 2023; LLaVA-1.5, 2024): visual instruction tuning of a language model.

A frozen image tower's features (by default the penultimate layer's patch tokens) go through a
projector (``linear`` or ``mlp{N}x_gelu``) into the language model's embedding space and replace
the ``<image>`` placeholder of the conversation; the loss is the LM's next-token loss on the
assistant's answers only (the data's labels):

    ids      [bos, system, USER:, <image>, question, ASSISTANT:, answer, </s>, USER: ...]
    embeds   [ e    e       e     P(f_1 .. f_S)  e      e           e       e  ...]
    loss                                                           ^^^^^^^^^^^^ answers only

Stage 1 (feature alignment) trains the projector only, on caption pairs in the ``plain`` template;
stage 2 (instruction tuning) starts from stage 1 and trains the projector and the LM (``train_lm:
full`` or ``lora``) on multi-turn conversations in the ``chat`` template. Each stage is a config
(``configs/llava/``). ``generate(images, prompts)`` asks each prompt as the first human turn, so
captioning, VQA and POPE evaluate it as every family.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_vlm.datamodules.templates import IMAGE, get_template, prompt_ids
from lit_vlm.errors import UserError
from lit_vlm.losses import global_token_mean, token_cross_entropy
from lit_vlm.models.bridge import Bridge
from lit_vlm.modules import ConvNet, VisionTransformer, trim_padding
from lit_vlm.modules.freeze import lock
from lit_vlm.modules.language_model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, left_pad, splice_images

FEATURES = ("patch", "cls_patch")


def build_projector(kind: str, in_width: int, out_width: int) -> nn.Module:
    """LLaVA's projectors: ``linear`` or ``mlp{N}x_gelu`` (N linear layers with GELU between)."""
    if kind == "linear":
        return nn.Linear(in_width, out_width)
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not match or int(match.group(1)) < 1:
        raise UserError(f"model projector must be 'linear' or 'mlp<N>x_gelu' (e.g. mlp2x_gelu), got {kind!r}")
    layers: list[nn.Module] = [nn.Linear(in_width, out_width)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_width, out_width)]
    return nn.Sequential(*layers)


class LLaVA(Bridge):
    """LLaVA over a lit-vlm image tower and a local Hugging Face causal LM (see the module docstring).

    Args:
        vision: The image tower (a ViT, or a :class:`ConvNet`, whose one feature map is its only
            layer); its weights usually come from a CLIP run through ``init_from``.
        vision_layer: Which layer's tokens feed the projector (ViT: an index into its hidden states,
            -1 the last block, -2 the penultimate, LLaVA's choice; ConvNet: -1 only).
        vision_features: ``patch`` (the patch tokens) or ``cls_patch`` (class token first).
        pool_grid: Average-pool the patch grid to ``pool_grid`` x ``pool_grid`` tokens before the
            projector (the spatial pooling MobileVLM and Video-ChatGPT use to shorten the visual
            prompt); None keeps every patch, as LLaVA.
        projector: ``linear`` (LLaVA) or ``mlp{N}x_gelu`` (LLaVA-1.5: ``mlp2x_gelu``).
        template: The conversation template the data is written in (``plain``, ``chat``, ``chatml``),
            used to ask ``generate``'s prompts the same way; filled from the data by ``lit-vlm``.
        train_vision: Also train the image tower (LLaVA keeps it frozen).
        caption_prompt: What ``generate`` asks when given no prompt (captioning).
        **kwargs: :class:`~lit_vlm.models.bridge.Bridge`'s (``language_model``, ``train_lm``,
            ``lora``, ``lm_dtype``, ...) and :class:`~lit_vlm.models.base.VLMModule`'s arguments.

    This family's optimiser defaults: lr=1e-3 (LLaVA's stage 1), weight_decay=0, betas=(0.9, 0.999), eps=1e-8.
    """

    optim_defaults = dict(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)

    def __init__(
        self,
        vision: VisionTransformer | ConvNet,
        vision_layer: int = -2,
        vision_features: str = "patch",
        pool_grid: int | None = None,
        projector: str = "mlp2x_gelu",
        template: str | None = None,
        train_vision: bool = False,
        caption_prompt: str = "Describe the image concisely.",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if vision_features not in FEATURES:
            raise UserError(f"model vision_features must be one of {FEATURES}, got {vision_features!r}")
        if isinstance(vision, ConvNet) and vision_layer != -1:
            raise UserError(f"model vision_layer={vision_layer}: a ConvNet image tower has one feature map; set vision_layer: -1")
        self.template = get_template(template or "chat").name
        self.vision = vision
        self.vision_layer = int(vision_layer)
        self.vision_features = vision_features
        if pool_grid is not None and pool_grid < 1:
            raise UserError(f"model pool_grid must be None or >= 1, got {pool_grid}")
        self.pool_grid = pool_grid
        self.train_vision = bool(train_vision)
        if not self.train_vision:
            lock(self.vision)
        self.projector = build_projector(projector, vision.width, self.lm.width)
        self.caption_prompt = caption_prompt

    # ---- images into the LM's space -------------------------------------------------------------
    def vision_tokens(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The image tower's first token [N, 1, Dv] and patch tokens [N, P, Dv] (pooled to
        ``pool_grid`` x ``pool_grid`` when set) of images [N, 3, H, W]."""
        if isinstance(self.vision, ConvNet):
            tokens = self.vision(images).tokens  # [N, 1 + h*w, Dv]: mean first, then the map
        else:
            tokens = self.vision(images, output_hidden_states=True).hidden_states[self.vision_layer]  # [N, 1 + P, Dv]
        first, patches = tokens[:, :1], tokens[:, 1:]  # [N, 1, Dv], [N, P, Dv]
        if self.pool_grid is not None:
            N, P, D = patches.shape
            side = math.isqrt(P)
            if side * side != P:
                raise UserError(f"model pool_grid needs a square patch grid; the image tower gives {P} patches")
            grid = patches.transpose(1, 2).reshape(N, D, side, side)  # [N, Dv, g, g]
            patches = F.adaptive_avg_pool2d(grid, self.pool_grid).flatten(2).transpose(1, 2)  # [N, p*p, Dv]
        return first, patches

    def image_tokens(self, images: Tensor) -> Tensor:
        """Projected image tokens [N, S, D_lm] of images [N, 3, H, W]."""
        with torch.set_grad_enabled(self.train_vision and torch.is_grad_enabled()):
            first, patches = self.vision_tokens(images)
            tokens = patches if self.vision_features == "patch" else torch.cat([first, patches], dim=1)
        return self.projector(tokens)  # [N, S, D_lm]

    # ---- training -------------------------------------------------------------------------------
    def media_tokens(self, batch: dict, has_image: Tensor) -> Tensor:
        """The projected tokens of the batch's samples that have media [N, S, D_lm]."""
        return self.image_tokens(batch["image"][has_image])

    def forward(self, batch: dict) -> dict[str, Tensor]:
        ids, mask = trim_padding(batch["chat_ids"], batch["chat_mask"])  # [B, L]
        labels = batch["chat_labels"][:, : ids.shape[1]]  # [B, L]
        has_image = batch["has_image"].bool()  # [B]
        images = self.media_tokens(batch, has_image)  # [N, S, D]
        embeds, emask, labels = splice_images(self.lm.embed, ids, mask, labels, images, self.lm_max_positions)  # [B, T, ...]
        logits = self.lm.forward_embeds(embeds, emask).logits  # [B, T, V]
        targets = labels[:, 1:]  # [B, T-1]: position t predicts token t + 1
        sums, counts = token_cross_entropy(logits[:, :-1], targets.clamp_min(0), targets != IGNORE_INDEX)
        loss = global_token_mean(sums, counts, gather=self.training)
        return {"loss": loss, "answer_tokens": counts.sum() / len(counts), "image_fraction": has_image.float().mean()}

    @property
    def lm_max_positions(self) -> int | None:
        config = self.lm.model.config
        return next((getattr(config, k) for k in ("max_position_embeddings", "n_positions") if getattr(config, k, None)), None)

    def evaluation_step(self, stage: str, batch: dict) -> dict[str, Tensor]:
        """Evaluation batches are image-text ones: the callbacks (captioning, VQA, POPE) generate."""
        if "chat_ids" not in batch:
            return {}
        return super().evaluation_step(stage, batch)

    # ---- generation -----------------------------------------------------------------------------
    def generation_prompt(self, images: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Each prompt asked as the first human turn (``<image>`` then the prompt) in the model's
        template, the image's tokens spliced in: embeddings [B, T, D], left-padded (mask [B, T])."""
        tok = self.text_tokenizer
        rows = [prompt_ids(f"{IMAGE}\n{p}", tok, self.template) for p in prompts]
        ids = torch.full((len(rows), max(map(len, rows))), tok.pad_id, dtype=torch.long, device=images.device)
        mask = torch.zeros(ids.shape, dtype=torch.bool, device=images.device)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r, device=images.device)
            mask[b, : len(r)] = True
        embeds, emask, _ = splice_images(self.lm.embed, ids, mask, None, self.image_tokens(images))  # [B, T, D]
        return left_pad([embeds[b, emask[b]] for b in range(len(rows))])


__all__ = ["LLaVA", "build_projector", "IMAGE_TOKEN_INDEX"]
