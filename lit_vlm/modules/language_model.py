"""A Hugging Face causal language model behind lit-vlm's decoder contract.

:func:`lit_vlm.generation.generate` drives any :class:`~lit_vlm.generation.StepDecoder`: a module
called as ``decoder(ids, mask, context=, context_mask=, cache=, use_cache=)`` that returns the
next-token ``logits`` and, with ``use_cache``, a cache with ``reorder(index)``.
:class:`~lit_vlm.modules.decoder.TextDecoder` is one; :class:`CausalLM` makes any
``AutoModelForCausalLM`` (GPT-2, LLaMA, OPT, Qwen, ...) another, so captioning, VQA and beam search
run unchanged over a frozen LM -- the seam the LM bridges (BLIP-2, LLaVA, ClipCap, Frozen) plug into.

``context`` here is a *prefix* of input embeddings in the LM's width (projected image tokens, as
LLaVA and ClipCap feed them), placed before the text; the cache then holds it, so later steps pass
only the new token. Positions follow the real tokens (``cumsum(mask) - 1``), so left- and
right-padded prompts give the same tokens. Weights load from a local folder only
(:meth:`CausalLM.from_pretrained`): nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_vlm.errors import MissingFileError, UserError
from lit_vlm.modules.decoder import DecoderOutput

__all__ = ["CausalLM", "CausalLMCache", "language_model_facts"]


@dataclass
class CausalLMCache:
    """The LM's own ``past_key_values`` and which cached positions are real ([B, T] bool)."""

    past: Any
    mask: Tensor

    def reorder(self, index: Tensor) -> CausalLMCache:
        """Keep batch rows ``index`` [N'] (beam search). The LM's cache is reordered in place."""
        self.past.reorder_cache(index)
        return CausalLMCache(self.past, self.mask.index_select(0, index))


class CausalLM(nn.Module):
    """Wraps a ``transformers`` causal LM (see the module docstring).

    Args:
        model: A ``PreTrainedModel`` with a language-modelling head.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> CausalLM:
        """Load a local model folder (``config.json`` + weights), never from the network."""
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise MissingFileError(f"language model {str(path)!r}: no config.json there (a local Hugging Face model folder)")
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, **kwargs)
        except (OSError, ValueError) as exc:
            raise UserError(f"language model {str(path)!r}: cannot load it ({exc})") from exc
        return cls(model)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def width(self) -> int:
        """Width of the LM's input embeddings (what a ``context`` prefix must have)."""
        return int(self.model.get_input_embeddings().weight.shape[1])

    def forward(
        self,
        ids: Tensor,  # [B, L] new token ids
        mask: Tensor | None = None,  # [B, L] bool, True on real tokens
        context: Tensor | None = None,  # [B, S, D] prefix embeddings (first call only)
        context_mask: Tensor | None = None,  # [B, S] bool
        cache: CausalLMCache | None = None,
        use_cache: bool = False,
    ) -> DecoderOutput:
        B, L = ids.shape
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        inputs: dict[str, Tensor] = {"input_ids": ids}
        if context is not None and cache is None:
            if context.shape[-1] != self.width:
                raise UserError(f"CausalLM: context width {context.shape[-1]} != the language model's {self.width}")
            prefix_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=ids.device) if context_mask is None else context_mask.bool()
            embeds = self.model.get_input_embeddings()(ids)  # [B, L, D]
            inputs = {"inputs_embeds": torch.cat([context.to(embeds.dtype), embeds], dim=1)}  # [B, S + L, D]
            mask = torch.cat([prefix_mask, mask], dim=1)  # [B, S + L]
        full = mask if cache is None else torch.cat([cache.mask, mask], dim=1)  # [B, T]
        new = mask.shape[1]
        positions = (full.long().cumsum(1) - 1).clamp_min(0)[:, -new:]  # [B, new]
        out = self.model(
            **inputs, attention_mask=full.long(), position_ids=positions,
            past_key_values=None if cache is None else cache.past, use_cache=use_cache,
        )  # fmt: skip
        logits = out.logits[:, -L:]  # [B, L, V]: the text positions only
        return DecoderOutput(logits=logits, hidden=None, cache=CausalLMCache(out.past_key_values, full) if use_cache else None)


def language_model_facts(path: str | Path) -> dict[str, Any]:
    """What data takes from a local LM folder: its tokenizer (the folder), vocabulary size and
    maximum context length (the smaller of ``tokenizer_config.json``'s ``model_max_length`` and
    the model's position limit), read from the JSON files without loading weights."""
    import json

    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise MissingFileError(f"language_model={str(path)!r}: no config.json there (a local Hugging Face model folder)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"language_model={str(path)!r}: cannot read config.json ({exc})") from exc
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    limits = [config.get(k) for k in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")]
    tok_config = folder / "tokenizer_config.json"
    if tok_config.is_file():
        try:
            limits.append(json.loads(tok_config.read_text(encoding="utf-8")).get("model_max_length"))
        except (OSError, ValueError):
            pass
    limits = [int(v) for v in limits if isinstance(v, int) and 0 < v < 10**7]
    return {"tokenizer": str(folder), "vocab_size": config.get("vocab_size"), "context_length": min(limits) if limits else None}
