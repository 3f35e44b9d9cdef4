"""BLIP-2's Querying Transformer (Li et al., 2023) as a building block.

Learned queries and text share each layer's self-attention; the queries also cross-attend to the
frozen image tokens (every ``cross_attention_freq``-th layer, from the first) and have a
feed-forward of their own. Which token may see which is the mask of the task:

    task    queries see          text sees
    itc     queries              text           (two unimodal passes: the sides never meet)
    itm     queries + text       queries + text (bidirectional)
    itg     queries              queries + its own past (causal)

Blocks are pre-LayerNorm (``norm: pre``, the suite's) or BERT's post-LayerNorm (``norm: post``).
The paper starts the Q-Former from BERT-base: ``bert`` names a local Hugging Face BERT folder whose
weights fill the post-norm layout (embeddings, self-attention, and both feed-forwards, the queries'
copied from the text's, as BLIP-2 does); the queries and the cross-attention start at random. Its
text path then gives the BERT's own outputs (a test). Widths as BERT's names: ``width`` the hidden
size, ``mlp_ratio`` its intermediate size over it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from lit_vlm.errors import MissingFileError, UserError
from lit_vlm.modules.transformer import MLP, Attention, CrossAttention

TASKS = ("itc", "itm", "itg")
NORMS = ("pre", "post")


class QFormerLayer(nn.Module):
    """Self-attention over [queries, text], cross-attention of the queries to the image (if this
    layer has it), then the queries' and the text's own feed-forwards."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, image_width: int | None, norm: str = "pre",
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.post = norm == "post"
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_cross = nn.LayerNorm(width, eps=eps) if image_width else None
        self.cross = CrossAttention(width, heads, context_dim=image_width) if image_width else None
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_ratio)
        self.ln_2_query = nn.LayerNorm(width, eps=eps)
        self.mlp_query = MLP(width, mlp_ratio)

    def forward(self, x: Tensor, queries: int, mask: Tensor | None, image: Tensor | None) -> Tensor:
        if self.post:  # BERT: x = LN(x + sublayer(x))
            x = self.ln_1(x + self.attn(x, attn_mask=mask))  # [B, Q+L, D]
            q, t = x[:, :queries], x[:, queries:]  # [B, Q, D], [B, L, D]
            if queries and self.cross is not None and image is not None:
                q = self.ln_cross(q + self.cross(q, image))  # [B, Q, D]
            q = self.ln_2_query(q + self.mlp_query(q))
            t = self.ln_2(t + self.mlp(t))
            return torch.cat([q, t], dim=1)
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
        norm: ``pre`` (pre-LayerNorm blocks) or ``post`` (BERT's post-LayerNorm).
        bert: A local Hugging Face BERT folder to start from (``norm: post``; its width, layers,
            heads, feed-forward and vocabulary must be the Q-Former's: the data's tokenizer is
            then the BERT folder's).
    """

    def __init__(self, image_width: int, vocab_size: int | None = None, num_queries: int = 32, width: int = 768,
                 layers: int = 12, heads: int = 12, mlp_ratio: float = 4.0, cross_attention_freq: int = 2,
                 context_length: int | None = None, norm: str = "pre", bert: str | None = None) -> None:
        super().__init__()
        if norm not in NORMS:
            raise UserError(f"QFormer norm must be one of {NORMS}, got {norm!r}")
        if bert is not None and norm != "post":
            raise UserError("QFormer bert: BERT's weights need BERT's layout; set norm: post")
        if vocab_size is None:
            raise UserError("QFormer needs vocab_size: set it, or let lit-vlm fill it from the data")
        if num_queries < 1 or layers < 1 or cross_attention_freq < 1:
            raise UserError(f"QFormer num_queries, layers and cross_attention_freq must be >= 1, got "
                            f"{num_queries}, {layers}, {cross_attention_freq}")
        self.width, self.num_queries = width, num_queries
        self.queries = nn.Parameter(torch.randn(1, num_queries, width) * 0.02)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.randn(context_length or 64, width) * 0.02)
        eps = 1e-12 if norm == "post" else 1e-5  # BERT's LayerNorm epsilon
        self.ln_embed = nn.LayerNorm(width, eps=eps)
        self.blocks = nn.ModuleList(
            QFormerLayer(width, heads, mlp_ratio, image_width if i % cross_attention_freq == 0 else None, norm, eps)
            for i in range(layers)
        )
        self.ln_final = nn.LayerNorm(width) if norm == "pre" else nn.Identity()  # post-norm blocks end normalised
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.bert = bert
        if bert is not None:
            self.load_bert(bert)

    @torch.no_grad()
    def load_bert(self, path: str) -> None:
        """Fill the embeddings, self-attention and feed-forwards from a local BERT folder (see the
        class docstring); a mismatch of any size is one error naming the folder and the size."""
        from transformers import AutoConfig, AutoModel

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise MissingFileError(f"QFormer bert={path!r}: no config.json there; give a local Hugging Face BERT folder")
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        mlp_hidden = self.blocks[0].mlp.fc1.out_features
        wanted = {"hidden_size": self.width, "num_hidden_layers": len(self.blocks), "intermediate_size": mlp_hidden,
                  "vocab_size": self.token_embedding.num_embeddings}
        wrong = {k: (getattr(config, k, None), v) for k, v in wanted.items() if getattr(config, k, None) != v}
        if wrong or config.num_attention_heads != self.blocks[0].attn.heads:
            shown = ", ".join(f"{k} {got} (Q-Former: {want})" for k, (got, want) in wrong.items()) or "num_attention_heads"
            raise UserError(f"QFormer bert={path!r} does not fit this Q-Former: {shown}; size the Q-Former as the BERT "
                            "(width, layers, heads, mlp_ratio) and tokenise the data with the BERT folder's tokenizer")
        if config.hidden_act != "gelu":
            raise UserError(f"QFormer bert={path!r}: hidden_act {config.hidden_act!r}; the Q-Former's feed-forward is GELU")
        bert = AutoModel.from_pretrained(str(folder), local_files_only=True, add_pooling_layer=False)
        emb = bert.embeddings
        L = self.position_embedding.shape[0]
        if emb.position_embeddings.weight.shape[0] < L:
            raise UserError(f"QFormer bert={path!r} has {emb.position_embeddings.weight.shape[0]} positions; the texts need {L}")
        self.token_embedding.weight.copy_(emb.word_embeddings.weight)
        self.position_embedding.copy_(emb.position_embeddings.weight[:L] + emb.token_type_embeddings.weight[0])  # type 0 folded in
        self.ln_embed.load_state_dict(emb.LayerNorm.state_dict())
        for block, layer in zip(self.blocks, bert.encoder.layer):
            att = layer.attention
            block.attn.qkv.weight.copy_(torch.cat([att.self.query.weight, att.self.key.weight, att.self.value.weight]))
            block.attn.qkv.bias.copy_(torch.cat([att.self.query.bias, att.self.key.bias, att.self.value.bias]))
            block.attn.proj.load_state_dict(att.output.dense.state_dict())
            block.ln_1.load_state_dict(att.output.LayerNorm.state_dict())
            for mlp, ln in ((block.mlp, block.ln_2), (block.mlp_query, block.ln_2_query)):  # the queries' copied from the text's
                mlp.fc1.load_state_dict(layer.intermediate.dense.state_dict())
                mlp.fc2.load_state_dict(layer.output.dense.state_dict())
                ln.load_state_dict(layer.output.LayerNorm.state_dict())

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


__all__ = ["NORMS", "QFormer", "QFormerLayer", "TASKS"]
