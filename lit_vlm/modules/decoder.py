"""A causal text decoder with optional cross-attention to image tokens and a key/value cache.

The generating families (CoCa's multimodal text decoder, BLIP's image-grounded decoder, PrefixLM,
captioners) share it, and :mod:`lit_vlm.generation` decodes with it.

- Pre-LN blocks: ``x + self_attn(ln_1(x))`` (causal), then, in blocks with cross-attention,
  ``x + cross_attn(ln_x(x), context)``, then ``x + mlp(ln_2(x))``.
- ``cross_attention_layers``: how many of the *last* blocks attend to the context (CoCa splits its
  decoder into unimodal layers without and multimodal layers with cross-attention); ``None`` means
  every block, ``0`` none (a plain language model).
- Padding: ``mask`` [B, L] marks real tokens. Positions count real tokens only, so left-padded and
  right-padded prompts give the same result; padded keys are never attended to (a padded query
  attends to itself only, so its output stays finite; it is never used).
- ``prefix_length``: :mod:`lit_vlm.generation` passes the prompt's length to decoders whose
  forward takes it, when it recomputes a whole sequence without cache (a prefix LM needs to know
  where its bidirectional prompt ends); a causal decoder ignores it.
- Cache: with ``use_cache=True`` the forward returns a :class:`DecoderCache` holding every
  block's keys and values (and the cross-attention keys and values of the context, computed once);
  passing it back with only the new tokens costs one token's work per step. Cached and uncached
  decoding give the same logits (tests/test_generation.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lit_vlm.errors import UserError
from lit_vlm.modules.transformer import MLP, Attention, CrossAttention


@dataclass
class DecoderCache:
    """Keys/values of everything decoded so far.

    Attributes:
        self_kv: Per block, (keys, values) of the self-attention, each [B, H, T, Dh].
        cross_kv: Per block, (keys, values) of the context, each [B, H, S, Dh]; None for blocks
            without cross-attention.
        mask: [B, T] bool, which of the T cached positions are real tokens.
        context_mask: [B, S] bool or None (all context tokens valid).
    """

    self_kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    cross_kv: list[tuple[Tensor, Tensor] | None] = field(default_factory=list)
    mask: Tensor | None = None
    context_mask: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def reorder(self, index: Tensor) -> DecoderCache:
        """Select batch rows ``index`` [N'] (beam search): a new cache."""
        pick = lambda t: t.index_select(0, index)  # noqa: E731
        return DecoderCache(
            self_kv=[(pick(k), pick(v)) for k, v in self.self_kv],
            cross_kv=[None if kv is None else (pick(kv[0]), pick(kv[1])) for kv in self.cross_kv],
            mask=None if self.mask is None else pick(self.mask),
            context_mask=None if self.context_mask is None else pick(self.context_mask),
        )


@dataclass
class DecoderOutput:
    logits: Tensor  # [B, L, V]
    hidden: Tensor | None  # [B, L, D] after the final LayerNorm (None from a wrapped Hugging Face LM)
    cache: DecoderCache | None = None


class DecoderBlock(nn.Module):
    """Pre-LN causal block with optional cross-attention (see the module docstring)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        cross_attention: bool = False,
        context_dim: int | None = None,
        dropout: float = 0.0,
        act_layer: str = "gelu",
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, heads, dropout=dropout)
        self.ln_x = nn.LayerNorm(dim, eps=norm_eps) if cross_attention else None
        self.xattn = CrossAttention(dim, heads, context_dim=context_dim, dropout=dropout) if cross_attention else None
        self.ln_2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, mlp_ratio, dropout=dropout, act_layer=act_layer)

    def context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the context [B, S, Dc] for this block's cross-attention."""
        assert self.xattn is not None
        return self.xattn.context_kv(context)  # 2 x [B, H, S, Dh]

    def forward(
        self,
        x: Tensor,  # [B, L, D] the new tokens
        self_mask: Tensor,  # [B, 1, L, T] bool, True where a query may attend a key
        past: tuple[Tensor, Tensor] | None,  # cached keys/values [B, H, T - L, Dh]
        cross_kv: tuple[Tensor, Tensor] | None,  # [B, H, S, Dh]
        cross_mask: Tensor | None,  # [B, 1, 1, S] bool or None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        y, kv = self.attn(self.ln_1(x), attn_mask=self_mask, past=past, return_kv=True)
        x = x + y  # [B, L, D]
        if self.xattn is not None:
            assert cross_kv is not None, "this block cross-attends: pass a context"
            x = x + self.xattn(self.ln_x(x), attn_mask=cross_mask, kv=cross_kv)
        x = x + self.mlp(self.ln_2(x))
        return x, kv


class TextDecoder(nn.Module):
    """Causal text decoder (see the module docstring).

    Args:
        vocab_size: Size of the token vocabulary V (``lit-vlm`` takes it from the data's tokenizer).
        context_length: Maximum number of positions, prompt and generated tokens together
            (``lit-vlm`` takes the data's ``context_length``).
        width: Model width D.
        layers: Number of blocks.
        heads: Attention heads; must divide ``width``.
        mlp_ratio: MLP hidden width as a multiple of ``width``.
        cross_attention_layers: How many of the last blocks cross-attend to the context; None: all.
        context_dim: Width of the context tokens (default: ``width``).
        dropout: Dropout in attention and MLPs (training only).
        act_layer: MLP activation ("gelu", "quick_gelu", "gelu_tanh").
        norm_eps: LayerNorm epsilon.
        tie_embeddings: Use the token embedding as the output projection.
        token_init_std: Standard deviation of the token embedding's initialisation (0.02 as in
            CLIP and BERT). 1.0 starts words far apart next to the positions (std 0.01), as the
            bag-of-words text tower of the quickstarts does; untie the embeddings with it, or the
            output logits start with a spread of about sqrt(width).
    """

    def __init__(
        self,
        vocab_size: int | None = None,
        context_length: int | None = None,
        width: int = 512,
        layers: int = 6,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        cross_attention_layers: int | None = None,
        context_dim: int | None = None,
        dropout: float = 0.0,
        act_layer: str = "gelu",
        norm_eps: float = 1e-5,
        tie_embeddings: bool = True,
        token_init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if token_init_std <= 0:
            raise UserError(f"token_init_std must be > 0, got {token_init_std}")
        if vocab_size is None or context_length is None:
            raise UserError("TextDecoder: vocab_size and context_length must be given (lit-vlm fills them from the data)")
        n_cross = layers if cross_attention_layers is None else cross_attention_layers
        if not 0 <= n_cross <= layers:
            raise UserError(f"cross_attention_layers must be in [0, layers={layers}], got {cross_attention_layers}")
        if width % heads != 0:
            raise UserError(f"decoder width {width} must be divisible by heads {heads}")
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.width = width
        self.heads = heads
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(
            DecoderBlock(width, heads, mlp_ratio, cross_attention=i >= layers - n_cross, context_dim=context_dim,
                         dropout=dropout, act_layer=act_layer, norm_eps=norm_eps)
            for i in range(layers)
        )
        self.ln_final = nn.LayerNorm(width, eps=norm_eps)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=float(token_init_std))
        nn.init.normal_(self.positional_embedding, std=0.01)
        if tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=width**-0.5)

    @property
    def has_cross_attention(self) -> bool:
        return any(b.xattn is not None for b in self.blocks)

    @property
    def num_unimodal_layers(self) -> int:
        """Blocks before the first cross-attending one (CoCa's unimodal text layers)."""
        return next((i for i, b in enumerate(self.blocks) if b.xattn is not None), len(self.blocks))

    # ---- pieces, also used by families that run the blocks in stages (CoCa) ------------------
    @staticmethod
    def attention_mask(full_mask: Tensor, new: int) -> Tensor:
        """Self-attention mask of the last ``new`` of T positions: [B, T] real-token mask ->
        [B, 1, new, T] bool. A query sees the real keys up to its own position, and always itself."""
        T = full_mask.shape[1]
        q_abs = torch.arange(T - new, T, device=full_mask.device)[:, None]  # [L, 1]
        k_abs = torch.arange(T, device=full_mask.device)[None, :]  # [1, T]
        allowed = ((k_abs <= q_abs)[None] & full_mask[:, None, :]) | (k_abs == q_abs)[None]  # [B, L, T]
        return allowed[:, None]  # [B, 1, L, T]

    def embed(self, ids: Tensor, full_mask: Tensor) -> Tensor:
        """Token plus positional embedding of the last L = ids.shape[1] of the T positions of
        ``full_mask`` [B, T]; a position counts the real tokens before it: [B, L] -> [B, L, D]."""
        T, L = full_mask.shape[1], ids.shape[1]
        if T > self.context_length:
            raise UserError(f"decoder: {T} positions exceed context_length={self.context_length}")
        positions = (full_mask.long().cumsum(1) - 1).clamp_min(0)[:, T - L :]  # [B, L]
        return self.token_embedding(ids) + self.positional_embedding[positions]  # [B, L, D]

    def context_kv(self, context: Tensor | None) -> list[tuple[Tensor, Tensor] | None]:
        """Every block's cross-attention keys/values of ``context`` [B, S, Dc] (None for blocks
        without cross-attention)."""
        if not self.has_cross_attention:
            return [None] * len(self.blocks)
        if context is None:
            raise ValueError("this decoder cross-attends to image tokens: pass context")
        return [b.context_kv(context) if b.xattn is not None else None for b in self.blocks]

    def run_blocks(
        self,
        x: Tensor,  # [B, L, D]
        self_mask: Tensor,  # [B, 1, L, T]
        cross_kv: list[tuple[Tensor, Tensor] | None],
        context_mask: Tensor | None = None,  # [B, S] bool
        start: int = 0,
        stop: int | None = None,
        past: list[tuple[Tensor, Tensor]] | None = None,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Blocks ``start:stop`` on ``x``; returns the output [B, L, D] and their keys/values."""
        cross_mask = None if context_mask is None else context_mask.bool()[:, None, None, :]  # [B, 1, 1, S]
        kvs: list[tuple[Tensor, Tensor]] = []
        for i in range(start, len(self.blocks) if stop is None else stop):
            x, kv = self.blocks[i](x, self_mask, past[i] if past else None, cross_kv[i], cross_mask)
            kvs.append(kv)
        return x, kvs

    def head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Final LayerNorm and output projection: [B, L, D] -> (hidden [B, L, D], logits [B, L, V])."""
        hidden = self.ln_final(x)
        return hidden, self.lm_head(hidden)

    def forward(
        self,
        ids: Tensor,  # [B, L] new token ids
        mask: Tensor | None = None,  # [B, L] bool, True on real tokens
        context: Tensor | None = None,  # [B, S, Dc] image tokens (ignored when the cache holds them)
        context_mask: Tensor | None = None,  # [B, S] bool
        cache: DecoderCache | None = None,
        use_cache: bool = False,
        prefix_length: int | None = None,  # unused: a causal decoder has no bidirectional prefix
    ) -> DecoderOutput:
        B, L = ids.shape
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        past_mask = cache.mask if cache is not None and cache.mask is not None else ids.new_zeros((B, 0), dtype=torch.bool)
        full_mask = torch.cat([past_mask, mask], dim=1)  # [B, T]
        x = self.embed(ids, full_mask)  # [B, L, D]
        self_mask = self.attention_mask(full_mask, L)  # [B, 1, L, T]
        if cache is not None and cache.cross_kv:
            cross_kv, context_mask = cache.cross_kv, cache.context_mask
        else:
            cross_kv = self.context_kv(context)
        past = cache.self_kv if cache is not None and cache.self_kv else None
        x, new_self = self.run_blocks(x, self_mask, cross_kv, context_mask, past=past)
        hidden, logits = self.head(x)  # [B, L, D], [B, L, V]
        out_cache = None
        if use_cache:
            out_cache = DecoderCache(self_kv=new_self, cross_kv=list(cross_kv), mask=full_mask, context_mask=context_mask)
        return DecoderOutput(logits=logits, hidden=hidden, cache=out_cache)
