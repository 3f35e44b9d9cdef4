"""Transformer text tower (CLIP layout: causal by default, pooled at the end-of-text token).

With ``causal=True`` and ``act_layer`` / ``norm_eps`` / ``pool`` set as the checkpoint was
trained, the tower holds OpenAI CLIP, open_clip and Hugging Face ``CLIPTextModel`` weights exactly:
token + learned positional embedding, causal pre-LN blocks with a fused qkv projection,
``ln_final``, pooling at the end-of-text token (OpenAI: ``pool="argmax"``; Hugging Face:
``pool="eos"`` with ``eos_id``, or ``"argmax"`` for legacy configs with ``eos_token_id == 2``).
The text projection lives in the family. See :mod:`lit_vlm.interop`.

Shape letters: B batch, L sequence length (<= context_length), D width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_vlm.errors import UserError

from .presets import TEXT_PRESETS, require, resolve_preset
from .transformer import Transformer

POOL_TYPES = ("eot", "argmax", "eos", "first", "mean")


@dataclass
class TextOutput:
    """Output of :class:`TextTransformer`.

    Attributes:
        pooled: Sequence embedding [B, D] (after the final LayerNorm).
        tokens: Every position after the final LayerNorm [B, L, D].
        hidden_states: If requested, ``layers + 1`` tensors [B, L, D] before the final LayerNorm
            (``hidden_states[0]`` is the embedded input, ``hidden_states[i]`` the output of block
            ``i - 1``); None otherwise.
    """

    pooled: Tensor
    tokens: Tensor
    hidden_states: tuple[Tensor, ...] | None = None


class TextTransformer(nn.Module):
    """Token + learned position embedding, pre-LN transformer, final LayerNorm.

    Shape values left as None come from ``preset``; explicit values override it. ``vocab_size``
    must end up set (the "small" preset leaves it to the tokenizer).

    Initialisation (CLIP): token embedding ~ N(0, 0.02), positional embedding ~ N(0, 0.01),
    transformer blocks as in :mod:`lit_vlm.modules.transformer`.

    Masking: with ``causal=True`` each position only sees earlier ones; with right padding no
    key-padding mask is needed (real tokens never see padding), exactly as in CLIP. With
    ``causal=False`` (BERT-like) padding keys are masked out using ``mask``.

    Args:
        preset: Named size from ``TEXT_PRESETS`` ("tiny", "small", "clip-B", "clip-L"), or None to
            give every size explicitly.
        vocab_size: Number of token ids (size of the embedding table).
        context_length: Maximum sequence length (number of learned positions).
        width: Transformer width D.
        layers: Number of transformer blocks.
        heads: Attention heads; must divide ``width``.
        mlp_ratio: MLP hidden width as a multiple of ``width``.
        causal: Use a causal (autoregressive) attention mask, as CLIP's text tower does.
        pool: How to pool the sequence: "eot" (token at the last non-padding position, where the
            tokenizer puts end-of-text), "argmax" (position of the largest token id in each row,
            the first one on ties: OpenAI CLIP, whose end-of-text id 49407 is the largest),
            "eos" (first position holding ``eos_id``, as Hugging Face ``CLIPTextModel`` does; a
            row without it pools position 0), "first" (position 0, BERT-style [CLS]), or "mean"
            (mean over non-padding positions).
        pad_id: Padding token id, used to derive the padding mask when ``forward`` gets no mask.
        eos_id: End-of-text token id; required by ``pool="eos"``, unused otherwise.
        act_layer: MLP activation of every block: "gelu" (default), "quick_gelu" (OpenAI CLIP
            weights) or "gelu_tanh".
        norm_eps: Epsilon of every LayerNorm in the tower (1e-5 as in CLIP).
        ls_init: If set, scale both residual branches of every block by a learned per-channel
            LayerScale initialised to this value (open_clip ``ls_init_value``); None disables it.
        token_init_std: Standard deviation of the token embedding's initialisation (0.02 as in
            CLIP). With ``layers=0`` and ``pool="mean"`` the tower is a bag of words; 1.0 then
            starts its words far apart next to the positions (std 0.01), which is what lets the
            quickstarts learn shape words (``benchmarks/README.md``).
    """

    def __init__(
        self,
        preset: str | None = "tiny",
        vocab_size: int | None = None,
        context_length: int | None = None,
        width: int | None = None,
        layers: int | None = None,
        heads: int | None = None,
        mlp_ratio: float | None = None,
        causal: bool = True,
        pool: str = "eot",
        pad_id: int = 0,
        eos_id: int | None = None,
        act_layer: str = "gelu",
        norm_eps: float = 1e-5,
        ls_init: float | None = None,
        token_init_std: float = 0.02,
    ) -> None:
        super().__init__()
        cfg = resolve_preset(
            TEXT_PRESETS,
            preset,
            dict(vocab_size=vocab_size, context_length=context_length, width=width, layers=layers, heads=heads, mlp_ratio=mlp_ratio),
        )
        require(cfg, ["vocab_size", "context_length", "width", "layers", "heads", "mlp_ratio"], preset, "TextTransformer")
        width, heads = int(cfg["width"]), int(cfg["heads"])
        if int(cfg["layers"]) and width % heads != 0:  # heads are unused by a bag of words (layers=0)
            raise UserError(f"width {width} must be divisible by heads {heads}")
        if pool not in POOL_TYPES:
            raise UserError(f"pool must be one of {POOL_TYPES}, got {pool!r}")
        if token_init_std <= 0:
            raise UserError(f"token_init_std must be > 0, got {token_init_std}")
        if pool == "eos" and eos_id is None:
            raise UserError("pool='eos' needs eos_id (the end-of-text token id)")

        self.vocab_size = int(cfg["vocab_size"])
        self.context_length = int(cfg["context_length"])
        self.width = width
        self.layers = int(cfg["layers"])
        self.heads = heads
        self.causal = causal
        self.pool = pool
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.act_layer = act_layer
        self.norm_eps = float(norm_eps)
        self.mlp_ratio = float(cfg["mlp_ratio"])

        self.token_embedding = nn.Embedding(self.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(self.context_length, width))  # [ctx, D]
        self.transformer = Transformer(
            width, self.layers, heads, mlp_ratio=self.mlp_ratio, act_layer=act_layer, norm_eps=norm_eps,
            ls_init=ls_init,
        )
        self.ln_final = nn.LayerNorm(width, eps=norm_eps)
        nn.init.normal_(self.token_embedding.weight, std=float(token_init_std))
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, ids: Tensor, mask: Tensor | None = None, output_hidden_states: bool = False) -> TextOutput:
        """Encode token ids.

        Args:
            ids: Token ids [B, L] (long), right-padded, L <= ``context_length``.
            mask: [B, L] bool, True at real tokens. If None it is derived as ``ids != pad_id``.
            output_hidden_states: Also return every layer's tokens (before the final LayerNorm).
        """
        B, L = ids.shape
        if L > self.context_length:
            raise UserError(f"sequence length {L} exceeds context_length {self.context_length}")
        if mask is None:
            mask = ids != self.pad_id  # [B, L]
        mask = mask.bool()  # [B, L]

        x = self.token_embedding(ids)  # [B, L, D]
        x = x + self.positional_embedding[:L].to(x.dtype)  # [B, L, D]
        if self.causal:
            x, hidden_states = self.transformer(x, is_causal=True, output_hidden_states=output_hidden_states)  # [B, L, D]
        else:
            # a row with no real token would make every key masked (NaN); let it see position 0
            key_mask = mask | ~mask.any(dim=1, keepdim=True)  # [B, L]
            attn_mask = key_mask[:, None, None, :]  # [B, 1, 1, L]
            x, hidden_states = self.transformer(x, attn_mask=attn_mask, output_hidden_states=output_hidden_states)  # [B, L, D]
        tokens = self.ln_final(x)  # [B, L, D]

        if self.pool == "eot":
            # last real position (== mask.sum(1) - 1 for right padding); 0 for an empty row
            positions = torch.arange(L, device=ids.device).expand(B, L)  # [B, L]
            last = torch.where(mask, positions, torch.zeros_like(positions)).amax(dim=1)  # [B]
            pooled = tokens[torch.arange(B, device=ids.device), last]  # [B, D]
        elif self.pool == "argmax":
            # torch.argmax returns the first maximal index, like numpy (and OpenAI CLIP)
            pooled = tokens[torch.arange(B, device=ids.device), ids.argmax(dim=-1)]  # [B, D]
        elif self.pool == "eos":
            first_eos = (ids == self.eos_id).int().argmax(dim=-1)  # [B]; 0 when a row has none
            pooled = tokens[torch.arange(B, device=ids.device), first_eos]  # [B, D]
        elif self.pool == "first":
            pooled = tokens[:, 0]  # [B, D]
        else:
            m = mask.unsqueeze(-1).to(tokens.dtype)  # [B, L, 1]
            pooled = (tokens * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # [B, D]
        return TextOutput(pooled=pooled, tokens=tokens, hidden_states=hidden_states)


def trim_padding(ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop the columns after the last real token of any row: ids, mask [N, L] -> [N, l]."""
    if mask is not None and mask.shape[1] > 1:
        length = int(mask.any(dim=0).nonzero().max()) + 1 if bool(mask.any()) else 1
        ids, mask = ids[:, :length], mask[:, :length]  # [N, l]
    return ids, mask
