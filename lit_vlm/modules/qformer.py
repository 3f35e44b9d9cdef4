"""BLIP-2's Querying Transformer (Li et al., 2023) as a building block.

Learned queries and text share each layer's self-attention; the queries also cross-attend to the
frozen image tokens (every ``cross_attention_freq``-th layer, from the first) and have a
feed-forward of their own. Which token may see which is the mask of the task:

    task    queries see          text sees
    itc     queries              text           (two unimodal passes: the sides never meet)
    itm     queries + text       queries + text (bidirectional)
    itg     queries              queries + its own past (causal)

Pre-LayerNorm blocks (the suite's), initialised from scratch (the paper starts from BERT-base; a
lit-vlm BERT-style checkpoint loads through ``init_from``). Widths as BERT's names: ``width`` the
hidden size, ``mlp_ratio`` its intermediate size over it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_vlm.errors import UserError
from lit_vlm.modules.transformer import MLP, Attention, CrossAttention

TASKS = ("itc", "itm", "itg")


class QFormerLayer(nn.Module):
    """Self-attention over [queries, text], cross-attention of the queries to the image (if this
    layer has it), then the queries' and the text's own feed-forwards."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, image_width: int | None) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_cross = nn.LayerNorm(width) if image_width else None
        self.cross = CrossAttention(width, heads, context_dim=image_width) if image_width else None
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio)
        self.ln_2_query = nn.LayerNorm(width)
        self.mlp_query = MLP(width, mlp_ratio)

    def forward(self, x: Tensor, queries: int, mask: Tensor | None, image: Tensor | None) -> Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask=mask)  # [B, Q+L, D]
        q, t = x[:, :queries], x[:, queries:]  # [B, Q, D], [B, L, D]
        if queries and self.cross is not None and image is not None:
            q = q + self.cross(self.ln_cross(q), image)  # [B, Q, D]
        q = q + self.mlp_query(self.ln_2_query(q))
        t = t + self.mlp(self.ln_2(t))
        return torch.cat([q, t], dim=1)  # [B, Q+L, D]


class QFormer(nn.Module):
    """Learned queries and a text transformer that share self-attention (see the module docstring).

    Args:
        image_width: Width of the image tokens the queries cross-attend to.
        vocab_size: Text vocabulary (the data's tokenizer); filled from the data by ``lit-vlm``.
        num_queries: Learned queries (the paper: 32).
        width: Hidden size (the paper: 768, BERT-base).
        layers: Layers (the paper: 12).
        heads: Attention heads.
        mlp_ratio: Feed-forward width over ``width``.
        cross_attention_freq: A cross-attention to the image every this many layers (the paper: 2).
        context_length: Longest text (learned positions); filled from the data by ``lit-vlm`` (64 if unset).
    """

    def __init__(self, image_width: int, vocab_size: int | None = None, num_queries: int = 32, width: int = 768,
                 layers: int = 12, heads: int = 12, mlp_ratio: float = 4.0, cross_attention_freq: int = 2,
                 context_length: int | None = None) -> None:
        super().__init__()
        if vocab_size is None:
            raise UserError("QFormer needs vocab_size: set it, or let lit-vlm fill it from the data")
        if num_queries < 1 or layers < 1 or cross_attention_freq < 1:
            raise UserError(f"QFormer num_queries, layers and cross_attention_freq must be >= 1, got "
                            f"{num_queries}, {layers}, {cross_attention_freq}")
        self.width, self.num_queries = width, num_queries
        self.queries = nn.Parameter(torch.randn(1, num_queries, width) * 0.02)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.randn(context_length or 64, width) * 0.02)
        self.ln_embed = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(
            QFormerLayer(width, heads, mlp_ratio, image_width if i % cross_attention_freq == 0 else None) for i in range(layers)
        )
        self.ln_final = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    @staticmethod
    def mask(task: str, queries: int, text_mask: Tensor | None) -> Tensor | None:
        """Boolean attention mask [B, 1, Q+L, Q+L] (True: allowed) of ``task`` (see the module
        docstring); padded text keys are never seen. ``text_mask`` [B, L] or None (queries alone)."""
        if task not in TASKS:
            raise UserError(f"QFormer task must be one of {TASKS}, got {task!r}")
        if text_mask is None:
            return None
        B, L = text_mask.shape
        T = queries + L
        keys = torch.cat([torch.ones(B, queries, dtype=torch.bool, device=text_mask.device), text_mask.bool()], 1)  # [B, T]
        is_text = torch.arange(T, device=text_mask.device) >= queries  # [T]
        if task == "itm":
            allowed = torch.ones(T, T, dtype=torch.bool, device=text_mask.device)
        elif task == "itc":  # each side sees itself only
            allowed = is_text[:, None] == is_text[None, :]
        else:  # itg: queries see queries; text sees the queries and its own past
            causal = torch.ones(T, T, dtype=torch.bool, device=text_mask.device).tril()
            allowed = (~is_text[None, :]) | (is_text[:, None] & causal)
        allowed = allowed[None] & keys[:, None, :]  # [B, T, T]
        allowed = allowed | torch.eye(T, dtype=torch.bool, device=text_mask.device)[None]  # a pad query sees itself
        return allowed[:, None]  # [B, 1, T, T]

    def forward(
        self,
        image: Tensor | None,  # [B, S, Dv] frozen image tokens (None: text alone)
        ids: Tensor | None = None,  # [B, L] text ids (None: queries alone)
        text_mask: Tensor | None = None,  # [B, L] bool
        task: str = "itc",
        with_queries: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """Query outputs [B, Q, D] (None without queries) and text outputs [B, L, D] (None without text)."""
        parts = []
        B = (image if image is not None else ids).shape[0]
        Q = self.num_queries if with_queries else 0
        if with_queries:
            parts.append(self.queries.expand(B, -1, -1))  # [B, Q, D]
        if ids is not None:
            L = ids.shape[1]
            parts.append(self.token_embedding(ids) + self.position_embedding[:L])  # [B, L, D]
            text_mask = torch.ones_like(ids, dtype=torch.bool) if text_mask is None else text_mask.bool()
        x = self.ln_embed(torch.cat(parts, dim=1))  # [B, Q+L, D]
        mask = self.mask(task, Q, text_mask if ids is not None else None)
        for block in self.blocks:
            x = block(x, Q, mask, image if with_queries else None)
        x = self.ln_final(x)
        return (x[:, :Q] if Q else None), (x[:, Q:] if ids is not None else None)


__all__ = ["QFormer", "QFormerLayer", "TASKS"]
