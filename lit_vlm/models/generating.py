"""What every generating family shares: the ``generate(images, prompts)`` capability.

A family mixes :class:`GeneratingMixin` into its LightningModule and implements two methods:

- ``generation_context(images) -> (context [B, S, Dc] | None, context_mask [B, S] | None)``: what
  its decoder attends to (CoCa's pooled image queries, BLIP's image tokens);
- ``generation_decoder()``: the decoder :func:`lit_vlm.generation.generate` steps (a
  :class:`~lit_vlm.modules.decoder.TextDecoder` or anything with its forward contract).

The mixin turns prompts into token ids (start token plus the prompt's tokens, no end token), runs
the configured decoding (greedy, beam search or sampling; the family's ``generation`` options,
overridable per call) and decodes the new tokens to strings, so the captioning and VQA callbacks
run on any such family unchanged.

The tokenizer is the one the data was tokenised with: the family's ``tokenizer`` argument
(``"synth"`` or a ``tokenizer.json`` path; ``lit-vlm`` fills it from the DataModule, and it is
saved in the checkpoint), else the attached DataModule's ``tokenizer``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from lit_vlm import generation
from lit_vlm.errors import UserError

#: Decoding options a family's ``generation`` dict may set (see :func:`lit_vlm.generation.generate`).
GENERATION_OPTIONS = tuple(
    name for name, p in inspect.signature(generation.generate).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
)


def check_generation_options(options: dict[str, Any] | None, owner: str = "model generation") -> dict[str, Any]:
    """Validate a ``generation`` dict (unknown keys are an error that lists the valid ones)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(GENERATION_OPTIONS) - {"max_new_tokens"})
    reserved = sorted({"eos_id", "pad_id", "generator"} & set(options))
    if unknown or reserved:
        bad = unknown + reserved
        raise UserError(
            f"{owner}: unknown or reserved option(s) {bad}; valid: "
            f"{sorted(set(GENERATION_OPTIONS) - {'eos_id', 'pad_id', 'generator'})}"
        )
    return options


class GeneratingMixin:
    """Adds ``generate(images, prompts, max_new_tokens)`` to a family (see the module docstring).

    The family sets ``self.tokenizer_spec`` (str or None) and ``self.generation_options`` (a dict
    checked by :func:`check_generation_options`) in its ``__init__``.
    """

    tokenizer_spec: str | None = None
    generation_options: dict[str, Any] = {}
    _tokenizer_cache: Any = None

    # ---- the family's part ---------------------------------------------------------------------
    def generation_context(self, images: Tensor) -> tuple[Tensor | None, Tensor | None]:
        raise NotImplementedError

    def generation_decoder(self) -> Any:
        raise NotImplementedError

    # ---- tokenizer -----------------------------------------------------------------------------
    @property
    def text_tokenizer(self):
        """The tokenizer generated ids are decoded with (see the module docstring)."""
        if self._tokenizer_cache is not None:
            return self._tokenizer_cache
        if self.tokenizer_spec is not None:
            from lit_vlm.datamodules.tokenizer import Tokenizer

            try:
                self._tokenizer_cache = Tokenizer.load(self.tokenizer_spec)
            except (OSError, ValueError) as err:
                raise UserError(f"model tokenizer={self.tokenizer_spec!r}: {err}") from err
            return self._tokenizer_cache
        trainer = getattr(self, "_trainer", None)
        tok = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        if tok is None:
            raise UserError(
                f"{type(self).__name__}.generate needs a tokenizer: set the model's tokenizer argument "
                "('synth' or a tokenizer.json path) or attach a DataModule that has one"
            )
        return tok

    def encode_prompts(self, prompts: list[str] | None, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Prompt ids and mask [n, L]: the start token (if the tokenizer has one) and each prompt's
        tokens, right-padded, no end token. ``prompts=None``: the start token alone."""
        tok = self.text_tokenizer
        if prompts is None:
            prompts = [""] * n
        if len(prompts) != n:
            raise ValueError(f"generate: {len(prompts)} prompts for {n} images")
        start = [] if tok.bos_id is None else [tok.bos_id]
        rows = [start + tok.backend.encode(p, add_special_tokens=False).ids for p in prompts]
        if any(not r for r in rows):
            raise UserError("generate: an empty prompt with a tokenizer that has no start token leaves nothing to condition on")
        length = max(len(r) for r in rows)
        ids = torch.full((n, length), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((n, length), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        return ids.to(device), mask.to(device)

    def call_options(self, options: dict[str, Any], max_new_tokens: int | None, caller: str) -> dict[str, Any]:
        """The family's ``generation`` options overridden by one call's (checked, naming ``caller``)."""
        merged = {**self.generation_options, **check_generation_options(options, caller)}
        if max_new_tokens is not None:
            merged["max_new_tokens"] = max_new_tokens
        return merged

    # ---- the capability ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, images: Tensor, prompts: list[str] | None = None, max_new_tokens: int | None = None, **options: Any
    ) -> list[str]:
        """images [B, 3, H, W], prompts: B strings or None -> B generated strings (the prompt not
        repeated). ``options`` override the family's ``generation`` options for this call."""
        merged = self.call_options(options, max_new_tokens, "generate")
        tok = self.text_tokenizer
        was_training = self.training
        self.eval()
        try:
            context, context_mask = self.generation_context(images)
            ids, mask = self.encode_prompts(prompts, images.shape[0], images.device)
            new = generation.generate(
                self.generation_decoder(), ids, mask, context, context_mask,
                eos_id=tok.eos_id, pad_id=tok.pad_id, **merged,
            )  # [B, <= max_new_tokens]
        finally:
            self.train(was_training)
        rows = generation.decode_tokens(new, tok.eos_id, tok.pad_id)
        return [tok.backend.decode(r, skip_special_tokens=True).strip() for r in rows]

    @torch.no_grad()
    def score_answers(
        self, images: Tensor, prompts: list[str], candidates: list[str], chunk_size: int = 256
    ) -> Tensor:
        """Log-likelihood of every candidate answer after every prompt: images [Q, 3, H, W], Q
        prompts, C candidates -> [Q, C], the sum of log p(token) over the candidate's tokens and
        the end token (VQA by ranking an answer list, as BLIP's ``rank`` inference does). The
        prompt is decoded once; its key/value cache is shared by the candidates.

        Args:
            chunk_size: Candidate rows (prompt x candidate) scored per decoder call.
        """
        if not candidates:
            raise UserError("score_answers needs at least one candidate answer")
        tok = self.text_tokenizer
        was_training = self.training
        self.eval()
        try:
            Q, device = images.shape[0], images.device
            context, context_mask = self.generation_context(images)
            ids, mask = self.encode_prompts(prompts, Q, device)
            ids, mask = generation.left_align(ids, mask, tok.pad_id)  # candidates continue every row at the right
            dec = self.generation_decoder()
            out = dec(ids, mask, context, context_mask, use_cache=True)
            first = out.logits[:, -1].float().log_softmax(-1)  # [Q, V] the candidate's first token
            end = [] if tok.eos_id is None else [tok.eos_id]
            rows = [tok.backend.encode(c, add_special_tokens=False).ids + end for c in candidates]
            length = max(len(r) for r in rows)
            cand = torch.full((len(rows), length), tok.pad_id, dtype=torch.long, device=device)
            cand_mask = torch.zeros((len(rows), length), dtype=torch.bool, device=device)
            for j, r in enumerate(rows):
                cand[j, : len(r)] = torch.tensor(r, device=device)
                cand_mask[j, : len(r)] = True
            C = len(rows)
            scores = torch.empty(Q, C, device=device)
            pairs = torch.arange(Q * C, device=device)
            for a in range(0, Q * C, chunk_size):
                idx = pairs[a : a + chunk_size]
                q, c = idx // C, idx % C
                x, m = cand[c], cand_mask[c]  # [n, Lc]
                lp = first[q].gather(1, x[:, :1])  # [n, 1]
                if length > 1:
                    logits = dec(x[:, :-1], m[:, :-1], cache=out.cache.reorder(q)).logits  # [n, Lc-1, V]
                    lp = torch.cat([lp, logits.float().log_softmax(-1).gather(2, x[:, 1:, None]).squeeze(2)], 1)
                scores[q, c] = (lp * m).sum(1)
        finally:
            self.train(was_training)
        return scores


__all__ = ["GENERATION_OPTIONS", "GeneratingMixin", "check_generation_options"]
