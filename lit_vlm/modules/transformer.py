"""Transformer building blocks shared by every model family in lit-vlm.

Plain ``torch.nn`` modules (no Lightning). Attention runs through
``torch.nn.functional.scaled_dot_product_attention`` so it picks the fastest kernel available.

Shape letters used in the comments:
    B batch, L query length, S key/value length, D model width, H heads, Dh head width (D // H),
    Q number of learned queries.

Attention masks follow the ``scaled_dot_product_attention`` convention: a boolean mask is True
where attention is *allowed*; a float mask is *added* to the attention logits (use ``-inf`` to
block). A mask must broadcast to ``[B, H, L, S]``; a 3-D ``[B, L, S]`` mask is broadcast over
heads for convenience.

Initialisation follows the CLIP text tower (used by open_clip for both towers' blocks):
qkv and query/key/value projections ~ N(0, D^-0.5), MLP input ~ N(0, (2D)^-0.5), residual output
projections (attention out-proj and MLP output) ~ N(0, D^-0.5 * (2 * layers)^-0.5), biases zero,
LayerNorm weight 1 / bias 0.

Weight compatibility: a :class:`Block` holds exactly the tensors of an OpenAI CLIP / open_clip
``ResidualAttentionBlock`` (``ln_1``, fused ``in_proj`` -> ``attn.qkv``, ``out_proj`` ->
``attn.proj``, ``mlp.c_fc`` -> ``mlp.fc1``, ``mlp.c_proj`` -> ``mlp.fc2``, ``ln_2``), with the
activation (``act_layer``: QuickGELU for OpenAI weights) and LayerNorm epsilon (``norm_eps``)
selectable, so those checkpoints load exactly (see :mod:`lit_vlm.interop`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lit_vlm.errors import UserError


def _prepare_mask(attn_mask: Tensor | None, is_causal: bool, q_len: int, k_len: int, device: torch.device) -> Tensor | None:
    """Return a mask broadcastable to [B, H, L, S], folding in causality if both are requested.

    ``scaled_dot_product_attention`` refuses ``attn_mask`` together with ``is_causal=True``, so
    when both are given the causal constraint is merged into the explicit mask here.
    """
    if attn_mask is None:
        return None
    if attn_mask.dim() == 3:
        attn_mask = attn_mask.unsqueeze(1)  # [B, 1, L, S]
    if is_causal:
        # bottom-right aligned like SDPA's is_causal when L != S
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)  # [L, S]
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & causal  # [..., L, S]
        else:
            attn_mask = attn_mask.masked_fill(~causal, float("-inf"))  # [..., L, S]
    return attn_mask


ACT_LAYERS = ("gelu", "quick_gelu", "gelu_tanh")


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU used by OpenAI CLIP: ``x * sigmoid(1.702 * x)``.

    OpenAI's released CLIP weights (and open_clip models named ``*-quickgelu``) were trained with
    it; running them with exact GELU changes every embedding noticeably.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Apply QuickGELU element-wise to ``x`` [...]; returns [...]."""
        return x * torch.sigmoid(1.702 * x)  # [...]


def make_activation(name: str) -> nn.Module:
    """Build the MLP activation named ``name``.

    Args:
        name: "gelu" (exact, erf-based GELU; open_clip's default and Hugging Face ``"gelu"``),
            "quick_gelu" (``x * sigmoid(1.702 x)``; OpenAI CLIP and Hugging Face ``"quick_gelu"``),
            or "gelu_tanh" (the tanh approximation; Hugging Face ``"gelu_pytorch_tanh"`` /
            ``"gelu_new"``, used by SigLIP).

    Raises:
        ValueError: for any other name (the message lists the valid ones).
    """
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    raise UserError(f"act_layer must be one of {ACT_LAYERS}, got {name!r}")


def mlp_hidden_width(dim: int, mlp_ratio: float) -> int:
    """Hidden width of an MLP: ``int(dim * mlp_ratio)``, snapped to the nearest integer when the
    product is within 1e-6 of it, so that a ratio computed from a checkpoint (hidden / dim, e.g.
    8192 / 1664) reproduces the checkpoint's hidden width despite float round-off."""
    product = dim * float(mlp_ratio)
    nearest = round(product)
    return int(nearest) if abs(product - nearest) < 1e-6 else int(product)


def _heads(x: Tensor, heads: int) -> Tensor:
    """[B, L, D] -> [B, H, L, D / H]."""
    B, L, D = x.shape
    return x.view(B, L, heads, D // heads).transpose(1, 2)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float, is_causal: bool = False) -> Tensor:
    """The one attention computation every block uses: q [B, H, L, Dh] against k, v [B, H, T, Dh]
    with a mask broadcastable to [B, H, L, T] (bool: True may attend); returns [B, L, H * Dh]."""
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal and mask is None)
    B, H, L, Dh = y.shape
    return y.transpose(1, 2).reshape(B, L, H * Dh)  # [B, L, D]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, optionally continuing a key/value cache.

    Args:
        dim: Model width D (input and output feature size).
        heads: Number of attention heads; must divide ``dim``.
        dropout: Dropout on the attention weights and on the output projection (training only).
        bias: Whether the qkv and output projections have a bias.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if dim % heads != 0:
            raise UserError(f"width {dim} must be divisible by heads {heads}")
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.proj_drop = nn.Dropout(dropout)
        self.init_weights()

    def init_weights(self, proj_std: float | None = None) -> None:
        """CLIP-style init; ``proj_std`` (default D^-0.5) is the std of the output projection."""
        nn.init.normal_(self.qkv.weight, std=self.dim**-0.5)
        nn.init.normal_(self.proj.weight, std=proj_std if proj_std is not None else self.dim**-0.5)
        for lin in (self.qkv, self.proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(
        self,
        x: Tensor,  # [B, L, D] (the new tokens when continuing a cache)
        attn_mask: Tensor | None = None,  # broadcastable to [B, H, L, T], or [B, L, T]
        is_causal: bool = False,
        past: tuple[Tensor, Tensor] | None = None,  # cached keys, values [B, H, T - L, Dh]
        return_kv: bool = False,
    ) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        """Attend ``x`` to itself (after ``past``); returns [B, L, D], and with ``return_kv`` the
        keys and values [B, H, T, Dh] to cache."""
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [3, B, H, L, Dh]
        q, k, v = qkv.unbind(0)  # 3 x [B, H, L, Dh]
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # [B, H, T, Dh]
            v = torch.cat([past[1], v], dim=2)
        mask = _prepare_mask(attn_mask, is_causal, L, k.shape[2], x.device)  # broadcastable to [B, H, L, T]
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0, is_causal)  # [B, L, D]
        out = self.proj_drop(self.proj(y))  # [B, L, D]
        return (out, (k, v)) if return_kv else out


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from ``x``, keys/values from ``context`` (or given, as
    a decoder caches them once per context).

    Reused by the attentional pooler and by families that attend from text to image features
    (BLIP, CoCa, Flamingo). The context may have a different width than the queries.

    Args:
        dim: Query / output width D.
        heads: Number of attention heads; must divide ``dim``.
        context_dim: Width of the context tokens (keys/values). Defaults to ``dim``.
        dropout: Dropout on the attention weights and on the output projection (training only).
        bias: Whether the projections have a bias.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if dim % heads != 0:
            raise UserError(f"width {dim} must be divisible by heads {heads}")
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        self.context_dim = context_dim if context_dim is not None else dim
        self.dropout = dropout
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(self.context_dim, 2 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.proj_drop = nn.Dropout(dropout)
        self.init_weights()

    def init_weights(self, proj_std: float | None = None) -> None:
        """CLIP-style init; ``proj_std`` (default D^-0.5) is the std of the output projection."""
        nn.init.normal_(self.q.weight, std=self.dim**-0.5)
        nn.init.normal_(self.kv.weight, std=self.dim**-0.5)
        nn.init.normal_(self.proj.weight, std=proj_std if proj_std is not None else self.dim**-0.5)
        for lin in (self.q, self.kv, self.proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of ``context`` [B, S, Dc]: 2 x [B, H, S, Dh]."""
        B, S, _ = context.shape
        kv = self.kv(context).view(B, S, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [2, B, H, S, Dh]
        return kv[0], kv[1]

    def forward(
        self,
        x: Tensor,  # [B, L, D] queries
        context: Tensor | None = None,  # [B, S, Dc]
        attn_mask: Tensor | None = None,  # broadcastable to [B, H, L, S], or [B, L, S]
        kv: tuple[Tensor, Tensor] | None = None,  # precomputed context_kv(context)
    ) -> Tensor:
        """Attend queries ``x`` to ``context`` (or its cached ``kv``); returns [B, L, D]. For a
        key-padding mask ``m`` [B, S] pass ``m[:, None, None, :]``."""
        k, v = kv if kv is not None else self.context_kv(context)  # [B, H, S, Dh]
        q = _heads(self.q(x), self.heads)  # [B, H, L, Dh]
        mask = _prepare_mask(attn_mask, False, x.shape[1], k.shape[2], x.device)  # broadcastable to [B, H, L, S]
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)  # [B, L, D]
        return self.proj_drop(self.proj(y))  # [B, L, D]


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear -> activation -> Linear.

    Args:
        dim: Input and output width D.
        mlp_ratio: Hidden width as a multiple of ``dim`` (hidden = int(dim * mlp_ratio), see
            :func:`mlp_hidden_width`).
        dropout: Dropout after the output projection (training only).
        act_layer: Activation between the two projections: "gelu" (default), "quick_gelu"
            (OpenAI CLIP weights) or "gelu_tanh"; see :func:`make_activation`.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, dropout: float = 0.0, act_layer: str = "gelu") -> None:
        super().__init__()
        hidden = mlp_hidden_width(dim, mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = make_activation(act_layer)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)
        self.init_weights()

    def init_weights(self, proj_std: float | None = None) -> None:
        """CLIP-style init: fc1 ~ N(0, (2D)^-0.5), fc2 ~ N(0, proj_std or D^-0.5), zero biases."""
        dim = self.fc1.in_features
        nn.init.normal_(self.fc1.weight, std=(2 * dim) ** -0.5)
        nn.init.normal_(self.fc2.weight, std=proj_std if proj_std is not None else dim**-0.5)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the MLP to ``x`` [..., D]; returns [..., D]."""
        x = self.act(self.fc1(x))  # [..., hidden]
        return self.drop(self.fc2(x))  # [..., D]


class LayerScale(nn.Module):
    """Learned per-channel scaling of a residual branch (CaiT / DINOv2 style).

    Args:
        dim: Width D of the scaled features.
        init: Initial value of every scale entry.
    """

    def __init__(self, dim: int, init: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))  # [D]

    def forward(self, x: Tensor) -> Tensor:
        """Scale ``x`` [..., D] channel-wise; returns [..., D]."""
        return x * self.gamma  # [..., D]


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``.

    Args:
        dim: Model width D.
        heads: Number of attention heads; must divide ``dim``.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        ls_init: If set, wrap both residual branches in a LayerScale initialised to this value;
            None (default) disables LayerScale.
        dropout: Dropout used inside attention and the MLP (training only).
        act_layer: MLP activation: "gelu" (default), "quick_gelu" (OpenAI CLIP) or "gelu_tanh".
        norm_eps: Epsilon of both LayerNorms (1e-5 as in CLIP; SigLIP uses 1e-6).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        ls_init: float | None = None,
        dropout: float = 0.0,
        act_layer: str = "gelu",
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, heads, dropout=dropout)
        self.ls_1 = LayerScale(dim, ls_init) if ls_init is not None else nn.Identity()
        self.ln_2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, mlp_ratio, dropout=dropout, act_layer=act_layer)
        self.ls_2 = LayerScale(dim, ls_init) if ls_init is not None else nn.Identity()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """Run the block on ``x`` [B, L, D]; returns [B, L, D]."""
        x = x + self.ls_1(self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal))  # [B, L, D]
        x = x + self.ls_2(self.mlp(self.ln_2(x)))  # [B, L, D]
        return x


class Transformer(nn.Module):
    """A stack of pre-LN :class:`Block` s (no final LayerNorm; the towers add their own).

    Args:
        width: Model width D.
        layers: Number of blocks.
        heads: Number of attention heads per block; must divide ``width``.
        mlp_ratio: MLP hidden width as a multiple of ``width``.
        ls_init: LayerScale initial value for every block; None disables LayerScale.
        dropout: Dropout inside attention and MLPs (training only).
        act_layer: MLP activation of every block: "gelu" (default), "quick_gelu" (OpenAI CLIP
            weights) or "gelu_tanh".
        norm_eps: Epsilon of every block's LayerNorms.
    """

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        ls_init: float | None = None,
        dropout: float = 0.0,
        act_layer: str = "gelu",
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if layers and width % heads != 0:  # no blocks (layers=0): heads are unused
            raise UserError(f"width {width} must be divisible by heads {heads}")
        self.width = width
        self.layers = layers
        self.heads = heads
        self.grad_checkpointing = False
        make_activation(act_layer)  # validate once, with a clear message, before building blocks
        self.act_layer = act_layer
        self.norm_eps = float(norm_eps)
        self.blocks = nn.ModuleList(
            [Block(width, heads, mlp_ratio, ls_init, dropout, act_layer=act_layer, norm_eps=norm_eps) for _ in range(layers)]
        )
        self.init_weights()

    def init_weights(self) -> None:
        """CLIP init: residual output projections get std D^-0.5 * (2 * layers)^-0.5."""
        proj_std = self.width**-0.5 * (2 * max(self.layers, 1)) ** -0.5
        for block in self.blocks:
            block.attn.init_weights(proj_std=proj_std)
            block.mlp.init_weights(proj_std=proj_std)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass to save memory (training only)."""
        self.grad_checkpointing = enable

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        """Run all blocks on ``x`` [B, L, D].

        Returns ``(x, hidden_states)``: the output [B, L, D] and, if ``output_hidden_states``, a
        tuple of ``layers + 1`` tensors [B, L, D] where ``hidden_states[0]`` is the input to block 0
        and ``hidden_states[i]`` is the output of block ``i - 1`` (Hugging Face convention), else None.
        """
        hidden_states: list[Tensor] | None = [x] if output_hidden_states else None
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask, is_causal, use_reentrant=False)  # [B, L, D]
            else:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)  # [B, L, D]
            if hidden_states is not None:
                hidden_states.append(x)
        return x, (tuple(hidden_states) if hidden_states is not None else None)


class AttentionalPooler(nn.Module):
    """Learned queries cross-attending to a token sequence (CoCa / open_clip attentional pooling).

    The queries and the tokens are each LayerNorm-ed before a single :class:`CrossAttention`;
    there is no residual connection, so the output is purely the attended summary.

    Args:
        width: Width of the queries and of the output.
        n_queries: Number of learned queries Q (output tokens).
        heads: Number of attention heads; must divide ``width``.
        context_dim: Width of the tokens being pooled. Defaults to ``width``.
    """

    def __init__(self, width: int, n_queries: int = 1, heads: int = 8, context_dim: int | None = None) -> None:
        super().__init__()
        if n_queries < 1:
            raise UserError(f"n_queries must be >= 1, got {n_queries}")
        context_dim = context_dim if context_dim is not None else width
        self.n_queries = n_queries
        # open_clip initialises the queries with a unit normal; ln_q makes their scale irrelevant
        self.query = nn.Parameter(torch.randn(n_queries, width))  # [Q, D]
        self.ln_q = nn.LayerNorm(width)
        self.ln_k = nn.LayerNorm(context_dim)
        self.attn = CrossAttention(width, heads, context_dim=context_dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Pool tokens ``x`` [B, S, Dc] into [B, Q, D]; ``attn_mask`` as in :class:`CrossAttention`."""
        B = x.shape[0]
        x = self.ln_k(x)  # [B, S, Dc]
        q = self.ln_q(self.query).unsqueeze(0).expand(B, -1, -1)  # [B, Q, D]
        return self.attn(q, x, attn_mask=attn_mask)  # [B, Q, D]


__all__ = [
    "ACT_LAYERS",
    "Attention",
    "CrossAttention",
    "MLP",
    "QuickGELU",
    "LayerScale",
    "Block",
    "Transformer",
    "AttentionalPooler",
    "make_activation",
    "mlp_hidden_width",
]
