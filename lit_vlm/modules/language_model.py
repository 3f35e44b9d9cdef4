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

:class:`Seq2SeqLM` does the same for an ``AutoModelForSeq2SeqLM`` (T5, FlanT5, BART): its ``context``
is the *encoder's* input embeddings (soft prompt and prompt text), its ``ids`` the decoder's tokens,
and its cache holds the encoder's output. :func:`load_language_model` picks the wrapper from the
folder's ``config.json``. Both generate from a prompt given as embeddings (``generate_from_embeds``)
with the suite's decoding or with the model's own ``generate(inputs_embeds=...)``.

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
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_vlm import generation
from lit_vlm.errors import MissingFileError, UserError
from lit_vlm.modules.decoder import DecoderOutput

__all__ = [
    "DTYPES", "GENERATE_WITH", "IGNORE_INDEX", "IMAGE_TOKEN_INDEX", "CausalLM", "CausalLMCache", "EmbeddedPrompt",
    "Seq2SeqCache", "Seq2SeqLM", "add_lora", "language_model_facts", "left_pad", "load_language_model",
    "splice_images", "weights_fingerprint",
]

#: ``input_ids`` value of an ``<image>`` placeholder (LLaVA's): replaced by the image's tokens.
IMAGE_TOKEN_INDEX = -200
#: Label of a position without loss (``torch.nn.functional.cross_entropy``'s ``ignore_index``).
IGNORE_INDEX = -100
#: The dtypes a frozen LM may be held in (what trains stays float32).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Who decodes: the suite's :func:`lit_vlm.generation.generate` or the model's own ``generate``.
GENERATE_WITH = ("suite", "transformers")


def _read_config(folder: Path, path: str | Path) -> dict[str, Any]:
    """The folder's ``config.json`` (a missing one is one paragraph naming the path)."""
    if not (folder / "config.json").is_file():
        hint = " (the embedded one is written by `lit-vlm fit --config configs/lm/quickstart.yaml`)" if "world-lm" in str(path) else ""
        raise MissingFileError(
            f"language model {str(path)!r}: no config.json there; give a local Hugging Face model folder{hint}"
        )
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"language model {str(path)!r}: cannot read config.json ({exc})") from exc


def load_language_model(path: str | Path, dtype: str = "float32") -> CausalLM | Seq2SeqLM:
    """A local LM folder behind the right wrapper: :class:`Seq2SeqLM` when its ``config.json`` says
    ``is_encoder_decoder`` (T5, FlanT5, BART), else :class:`CausalLM`."""
    config = _read_config(Path(path), path)
    return (Seq2SeqLM if config.get("is_encoder_decoder") else CausalLM).from_pretrained(path, dtype=dtype)


def _transformers_options(options: dict[str, Any], eos_id: int | None, pad_id: int) -> dict[str, Any]:
    """The suite's decoding options as ``transformers``' ``generate`` keywords."""
    if options.get("generator") is not None:
        raise UserError("generate_with: transformers samples with its own random state: drop the generator")
    kwargs = {k: v for k, v in options.items() if k != "generator"}
    kwargs.setdefault("max_new_tokens", 20)
    if not kwargs.get("do_sample"):
        for key in ("temperature", "top_k", "top_p"):  # unused without sampling; transformers warns about them
            kwargs.pop(key, None)
    elif kwargs.get("top_k") == 0:
        kwargs["top_k"] = None
    return {**kwargs, "eos_token_id": eos_id, "pad_token_id": pad_id}


@dataclass
class CausalLMCache:
    """The LM's own key/value cache and which cached positions are real ([B, T] bool)."""

    past: Any
    mask: Tensor

    def reorder(self, index: Tensor) -> CausalLMCache:
        """Keep batch rows ``index`` [N'] (beam search). The LM's cache is reordered in place."""
        self.past.reorder_cache(index)
        return CausalLMCache(self.past, self.mask.index_select(0, index))


class _LanguageModel(nn.Module):
    """What both wrappers share: the ``transformers`` model (``auto_class`` loads it), its token
    embedding, vocabulary and width."""

    auto_class = ""  # the ``transformers`` Auto class that loads this kind of LM
    is_encoder_decoder = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32", **kwargs: Any) -> Any:
        """Load a local model folder (``config.json`` + weights), never from the network, in
        ``dtype`` (``float32``, ``bfloat16`` or ``float16``)."""
        import transformers

        if dtype not in DTYPES:
            raise UserError(f"language model dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        _read_config(Path(path), path)
        try:
            model = getattr(transformers, cls.auto_class).from_pretrained(
                str(path), local_files_only=True, dtype=DTYPES[dtype], **kwargs)
        except (OSError, ValueError) as exc:
            raise UserError(f"language model {str(path)!r}: cannot load it ({exc})") from exc
        return cls(model)

    def embed(self, ids: Tensor) -> Tensor:
        """Token embeddings [B, L, D] of ids [B, L]."""
        return self.model.get_input_embeddings()(ids)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the LM's weights are held in (inputs are cast to it)."""
        return self.model.get_input_embeddings().weight.dtype

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def width(self) -> int:
        """Width of the LM's input embeddings (what a ``context`` prefix must have)."""
        return int(self.model.get_input_embeddings().weight.shape[1])


class CausalLM(_LanguageModel):
    """Wraps a ``transformers`` causal LM (see the module docstring).

    Args:
        model: A ``PreTrainedModel`` with a language-modelling head.
    """

    auto_class = "AutoModelForCausalLM"

    def forward_embeds(self, embeds: Tensor, mask: Tensor, use_cache: bool = False) -> DecoderOutput:
        """The LM over a whole sequence of input embeddings [B, T, D] (real positions ``mask``
        [B, T]): next-token logits [B, T, V] and, with ``use_cache``, the cache to continue from;
        positions count the real tokens, as in :meth:`forward`."""
        positions = (mask.long().cumsum(1) - 1).clamp_min(0)  # [B, T]
        out = self.model(inputs_embeds=embeds.to(self.dtype), attention_mask=mask.long(), position_ids=positions, use_cache=use_cache)
        return DecoderOutput(logits=out.logits, hidden=None, cache=CausalLMCache(_cache_of(out), mask.bool()) if use_cache else None)

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

    def generate_from_embeds(self, embeds: Tensor, mask: Tensor, *, eos_id: int | None, pad_id: int,
                             generate_with: str = "suite", **options: Any) -> Tensor:
        """New tokens [B, <= max_new_tokens] after a prompt given as embeddings [B, T, D], left-padded
        (``mask`` [B, T] real, last position real), decoded by the suite or by ``transformers``."""
        if generate_with == "transformers":
            return self.model.generate(inputs_embeds=embeds.to(self.dtype),
                                       attention_mask=mask.long(), **_transformers_options(options, eos_id, pad_id))
        start = torch.full((embeds.shape[0], 1), pad_id, dtype=torch.long, device=embeds.device)  # stands for the prompt's end
        return generation.generate(EmbeddedPrompt(self), start, None, embeds, mask, eos_id=eos_id, pad_id=pad_id, **options)


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


@dataclass
class Seq2SeqCache:
    """An encoder-decoder's cache: the decoder's keys/values, the encoder's output and which of
    their positions are real."""

    past: Any
    encoded: Tensor  # [B, S, D]
    encoded_mask: Tensor  # [B, S] bool
    mask: Tensor  # [B, T] bool, the decoder's positions so far

    def reorder(self, index: Tensor) -> Seq2SeqCache:
        if self.past is not None:
            self.past.reorder_cache(index)
        return Seq2SeqCache(self.past, self.encoded.index_select(0, index), self.encoded_mask.index_select(0, index),
                            self.mask.index_select(0, index))


class Seq2SeqLM(_LanguageModel):
    """Wraps a ``transformers`` encoder-decoder LM (T5, FlanT5, BART) behind the decoder contract:
    ``context`` [B, S, D] is the encoder's input embeddings (read once, on the first call),
    ``ids`` [B, L] the decoder's tokens, starting with :attr:`decoder_start_id`.

    Args:
        model: A ``PreTrainedModel`` for conditional generation (``AutoModelForSeq2SeqLM``).
    """

    auto_class = "AutoModelForSeq2SeqLM"
    is_encoder_decoder = True

    @property
    def decoder_start_id(self) -> int:
        config = self.model.config
        start = getattr(config, "decoder_start_token_id", None)
        return int(start if start is not None else config.pad_token_id)

    def encode(self, embeds: Tensor, mask: Tensor) -> Tensor:
        """The encoder's output [B, S, D] of input embeddings [B, S, D] (real positions ``mask``)."""
        return self.model.get_encoder()(inputs_embeds=embeds.to(self.dtype), attention_mask=mask.long()).last_hidden_state

    def forward(
        self,
        ids: Tensor,  # [B, L] new decoder tokens
        mask: Tensor | None = None,  # [B, L] bool
        context: Tensor | None = None,  # [B, S, D] the encoder's input embeddings (first call only)
        context_mask: Tensor | None = None,  # [B, S] bool
        cache: Seq2SeqCache | None = None,
        use_cache: bool = False,
    ) -> DecoderOutput:
        from transformers.modeling_outputs import BaseModelOutput

        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        if cache is None:
            if context is None:
                raise ValueError("Seq2SeqLM needs the encoder's input embeddings as context on its first call")
            encoded_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=ids.device) if context_mask is None else context_mask.bool()
            encoded = self.encode(context, encoded_mask)  # [B, S, D]
            full = mask
        else:
            encoded, encoded_mask, full = cache.encoded, cache.encoded_mask, torch.cat([cache.mask, mask], dim=1)
        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoded), attention_mask=encoded_mask.long(),
            decoder_input_ids=ids, decoder_attention_mask=full.long(), use_cache=use_cache,
            **{_cache_argument(self.model): None if cache is None else cache.past},
        )  # fmt: skip
        new_cache = Seq2SeqCache(_cache_of(out), encoded, encoded_mask, full) if use_cache else None
        return DecoderOutput(logits=out.logits, hidden=None, cache=new_cache)  # logits [B, L, V]

    def generate_from_embeds(self, embeds: Tensor, mask: Tensor, *, eos_id: int | None, pad_id: int,
                             generate_with: str = "suite", **options: Any) -> Tensor:
        """New decoder tokens [B, <= max_new_tokens] for the encoder input embeddings [B, S, D]."""
        if generate_with == "transformers":
            out = self.model.generate(inputs_embeds=embeds.to(self.dtype),
                                      attention_mask=mask.long(), **_transformers_options(options, eos_id, pad_id))
            return out[:, 1:]  # without the decoder's start token
        start = torch.full((embeds.shape[0], 1), self.decoder_start_id, dtype=torch.long, device=embeds.device)
        return generation.generate(self, start, None, embeds, mask, eos_id=eos_id, pad_id=pad_id, **options)


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
             target_modules: list[str] | str = "all-linear", task_type: str = "CAUSAL_LM") -> nn.Module:
    """Wrap a ``transformers`` model in ``peft`` LoRA adapters (B initialised at zero, so the
    output is unchanged at first); only the adapters train. ``target_modules``: module names, or
    ``"all-linear"`` (every linear layer but the output head, as LLaVA's LoRA)."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise UserError(f"model lora rank must be >= 1, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        bias="none", task_type=task_type)
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
    folder = Path(path)
    config = _read_config(folder, path)
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
