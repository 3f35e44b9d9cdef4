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
(:meth:`CausalLM.from_pretrained`, with the dtype the frozen LM is held in): nothing is downloaded.

For training, LLaVA's way of mixing images into text is here too: :data:`IMAGE_TOKEN_INDEX` marks
an ``<image>`` placeholder in ``input_ids`` (no new token row), :func:`splice_images` replaces each
by that image's projected tokens and masks their labels with :data:`IGNORE_INDEX`, and
:meth:`CausalLM.forward_embeds` runs the LM over the result. :func:`add_lora` wraps the LM in
``peft`` LoRA adapters; :func:`weights_fingerprint` names the LM's weights in a bridge checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_vlm.errors import MissingFileError, UserError
from lit_vlm.modules.decoder import DecoderOutput

__all__ = [
    "DTYPES", "IGNORE_INDEX", "IMAGE_TOKEN_INDEX", "CausalLM", "CausalLMCache", "EmbeddedPrompt", "add_lora",
    "language_model_facts", "left_pad",
    "splice_images", "weights_fingerprint",
]

#: ``input_ids`` value of an ``<image>`` placeholder (LLaVA's): replaced by the image's tokens.
IMAGE_TOKEN_INDEX = -200
#: Label of a position without loss (``torch.nn.functional.cross_entropy``'s ``ignore_index``).
IGNORE_INDEX = -100
#: The dtypes a frozen LM may be held in (what trains stays float32).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CausalLMCache:
    """The LM's own key/value cache and which cached positions are real ([B, T] bool)."""

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
    def from_pretrained(cls, path: str | Path, dtype: str = "float32", **kwargs: Any) -> CausalLM:
        """Load a local model folder (``config.json`` + weights), never from the network, in
        ``dtype`` (``float32``, ``bfloat16`` or ``float16``)."""
        folder = Path(path)
        if dtype not in DTYPES:
            raise UserError(f"language model dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if not (folder / "config.json").is_file():
            hint = " (the embedded one is written by `lit-vlm fit --config configs/lm/quickstart.yaml`)" if "world-lm" in str(path) else ""
            raise MissingFileError(
                f"language model {str(path)!r}: no config.json there; give a local Hugging Face model folder{hint}"
            )
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=DTYPES[dtype], **kwargs)
        except (OSError, ValueError) as exc:
            raise UserError(f"language model {str(path)!r}: cannot load it ({exc})") from exc
        return cls(model)

    def embed(self, ids: Tensor) -> Tensor:
        """Token embeddings [B, L, D] of ids [B, L]."""
        return self.model.get_input_embeddings()(ids)

    def forward_embeds(self, embeds: Tensor, mask: Tensor, use_cache: bool = False) -> DecoderOutput:
        """The LM over a whole sequence of input embeddings [B, T, D] (real positions ``mask``
        [B, T]): next-token logits [B, T, V] and, with ``use_cache``, the cache to continue from;
        positions count the real tokens, as in :meth:`forward`."""
        positions = (mask.long().cumsum(1) - 1).clamp_min(0)  # [B, T]
        dtype = self.model.get_input_embeddings().weight.dtype
        out = self.model(inputs_embeds=embeds.to(dtype), attention_mask=mask.long(), position_ids=positions, use_cache=use_cache)
        return DecoderOutput(logits=out.logits, hidden=None, cache=CausalLMCache(_cache_of(out), mask.bool()) if use_cache else None)

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
            **inputs, attention_mask=full.long(), position_ids=positions, use_cache=use_cache,
            **{_cache_argument(self.model): None if cache is None else cache.past},
        )  # fmt: skip
        logits = out.logits[:, -L:]  # [B, L, V]: the text positions only
        return DecoderOutput(logits=logits, hidden=None, cache=CausalLMCache(_cache_of(out), full) if use_cache else None)


def _cache_argument(model: nn.Module) -> str:
    """The name ``forward`` takes the key/value cache under: ``cache`` (transformers 5) or
    ``past_key_values`` (before)."""
    return _cache_name(type(getattr(model, "get_base_model", lambda: model)()))


@functools.lru_cache(maxsize=None)
def _cache_name(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    """The key/value cache of a model output, under either name."""
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else getattr(out, "past_key_values", None)


class EmbeddedPrompt(nn.Module):
    """A :class:`CausalLM` whose prompt is already embeddings (images spliced into text), for
    :func:`lit_vlm.generation.generate`. ``ids``' first column stands for the prompt's end: a call
    without cache runs the LM over ``context`` (the prompt's embeddings [B, T, D], left-padded:
    ``context_mask`` real, last position real) followed by the tokens ``ids[:, 1:]``, and returns
    the logits from the prompt's last position on ([B, L, V]); calls with a cache are the LM's own."""

    def __init__(self, lm: CausalLM) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: Tensor, mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None, cache: CausalLMCache | None = None, use_cache: bool = False) -> DecoderOutput:
        if cache is not None:
            return self.lm(ids, mask, cache=cache, use_cache=use_cache)
        if context is None or context_mask is None:
            raise ValueError("EmbeddedPrompt needs the prompt embeddings and their mask as context on its first call")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        embeds = self.lm.embed(ids[:, 1:])  # [B, L - 1, D]
        embeds = torch.cat([context.to(embeds.dtype), embeds], dim=1)  # [B, T + L - 1, D]
        out = self.lm.forward_embeds(embeds, torch.cat([context_mask.bool(), mask[:, 1:]], dim=1), use_cache)
        return DecoderOutput(logits=out.logits[:, context.shape[1] - 1 :], hidden=None, cache=out.cache)  # [B, L, V]


def left_pad(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Rows [T_i, D] stacked right-aligned: ([B, T, D], mask [B, T])."""
    T = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), T, rows[0].shape[-1])
    mask = torch.zeros(len(rows), T, dtype=torch.bool, device=rows[0].device)
    for b, r in enumerate(rows):
        out[b, T - r.shape[0]:] = r
        mask[b, T - r.shape[0]:] = True
    return out, mask


def splice_images(
    embed: Any,  # ids [B, L] -> embeddings [B, L, D] (the LM's token embedding)
    ids: Tensor,  # [B, L] token ids, IMAGE_TOKEN_INDEX at each <image>
    mask: Tensor,  # [B, L] bool, real tokens
    labels: Tensor | None,  # [B, L] targets (IGNORE_INDEX where no loss belongs) or None
    images: Tensor,  # [N, S, D] one image's tokens per placeholder, in reading order (row by row)
    max_length: int | None = None,  # cut the spliced rows to this many positions
) -> tuple[Tensor, Tensor, Tensor | None]:
    """LLaVA's splice: each ``<image>`` placeholder becomes its image's S tokens (label
    IGNORE_INDEX); rows are right-padded to the longest. Returns ``(embeds [B, T, D], mask [B, T],
    labels [B, T] | None)``. A row without placeholders is a text-only sample."""
    B = ids.shape[0]
    placeholder = (ids == IMAGE_TOKEN_INDEX) & mask.bool()  # [B, L]
    if int(placeholder.sum()) != images.shape[0]:
        raise ValueError(f"splice_images: {int(placeholder.sum())} <image> placeholders but {images.shape[0]} images")
    text = embed(ids.masked_fill(ids < 0, 0))  # [B, L, D]
    images = images.to(text.dtype)
    rows, row_labels, k = [], [], 0
    for b in range(B):
        real = mask[b].bool()
        pieces, targets, start = [], [], 0
        positions = placeholder[b].nonzero().flatten().tolist()
        for p in positions + [None]:
            stop = int(real.sum()) if p is None else p
            pieces.append(text[b, start:stop])
            if labels is not None:
                targets.append(labels[b, start:stop])
            if p is not None:
                pieces.append(images[k])
                if labels is not None:
                    targets.append(labels.new_full((images.shape[1],), IGNORE_INDEX))
                k += 1
                start = p + 1
        rows.append(torch.cat(pieces)[:max_length])
        if labels is not None:
            row_labels.append(torch.cat(targets)[:max_length])
    T = max(r.shape[0] for r in rows)
    embeds = text.new_zeros(B, T, text.shape[-1])
    out_mask = torch.zeros(B, T, dtype=torch.bool, device=ids.device)
    out_labels = None if labels is None else labels.new_full((B, T), IGNORE_INDEX)
    for b, r in enumerate(rows):
        embeds[b, : r.shape[0]] = r
        out_mask[b, : r.shape[0]] = True
        if out_labels is not None:
            out_labels[b, : r.shape[0]] = row_labels[b]
    return embeds, out_mask, out_labels


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.05,
             target_modules: list[str] | str = "all-linear") -> nn.Module:
    """Wrap a ``transformers`` model in ``peft`` LoRA adapters (B initialised at zero, so the
    output is unchanged at first); only the adapters train. ``target_modules``: module names, or
    ``"all-linear"`` (every linear layer but the output head, as LLaVA's LoRA)."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise UserError(f"model lora rank must be >= 1, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"model lora target_modules={target_modules!r}: {exc}") from exc


def weights_fingerprint(module: nn.Module) -> str:
    """A short hash naming a model's weights: every tensor's name, shape and dtype, its sum and up to
    1024 of its values, evenly spaced. Seconds even for billions of weights; two LMs that differ
    anywhere in practice (another model, another fine-tune) differ here."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(module.state_dict().items()):
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 1024)
            sample = flat[::step][:1024].float().cpu()
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{float(flat.double().sum()):.6e}|".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


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
