"""Text generation for every generating family: greedy, beam search and top-k / nucleus sampling,
batched, with a key/value cache, over any :class:`StepDecoder`: lit-vlm's own
:class:`~lit_vlm.modules.decoder.TextDecoder` or a Hugging Face causal LM wrapped in
:class:`~lit_vlm.modules.language_model.CausalLM`.

:func:`generate` takes prompts as a padded batch (left or right padding: the real tokens of each
row are what counts) plus the image tokens the decoder cross-attends to, and returns the new tokens
of every row, right-padded with ``pad_id``. Each row stops at ``eos_id`` (which is kept) or after
``max_new_tokens``.

Options, as Hugging Face's ``generate`` names them:

- ``num_beams``: beam search when > 1. Scores are summed log-probabilities; a finished hypothesis
  is ranked by ``score / new_tokens ** length_penalty``; an end token counts as a finished
  hypothesis only among the ``num_beams`` best candidates of its step; a row stops when
  ``num_beams`` hypotheses have finished (early stopping), otherwise the live beams are ranked the
  same way at the end.
  ``num_beams=1`` is greedy decoding.
- ``do_sample``: draw the next token from the softmax of ``logits / temperature`` restricted to
  the ``top_k`` most likely tokens and to the smallest set whose probability reaches ``top_p``
  (nucleus); ``generator`` makes it reproducible.
- ``repetition_penalty`` (CTRL, Keskar et al. 2019): the logit of every token already in the row
  (prompt included) is divided by the penalty when positive and multiplied when negative. Beam
  search applies it (like the other options) to the log-probabilities, as Hugging Face does.
- ``no_repeat_ngram_size``: a token that would repeat an n-gram already in the row is banned.
- ``min_new_tokens``: ``eos_id`` is banned before that many new tokens.
- ``use_cache``: decode with the key/value cache (one token's work per step) or recompute the
  whole sequence at every step; both give the same tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from lit_vlm.errors import UserError

NEG_INF = float("-inf")


class StepCache(Protocol):
    """Whatever a decoder caches between steps; beam search keeps rows of it."""

    def reorder(self, index: Tensor) -> StepCache:
        """A cache of batch rows ``index`` [N']."""


@runtime_checkable
class StepDecoder(Protocol):
    """The decoder contract :func:`generate` drives.

    ``decoder(ids, mask, context=, context_mask=, cache=None, use_cache=False)`` takes the new tokens
    ``ids`` / ``mask`` [B, L] (the whole prompt at the first call; one column per later step, with
    the ``cache`` the previous call returned), and returns an object with ``logits`` [B, L, V] and,
    with ``use_cache``, ``cache`` (a :class:`StepCache`). ``context`` [B, S, D] is what the decoder
    conditions on (cross-attended image tokens, or a prefix of embeddings); it is only passed while
    there is no cache. Called without a cache on the whole sequence, the decoder must give the
    same logits (``use_cache=False`` decoding relies on it); a prefix LM may accept
    ``prefix_length``, the prompt's length, for that case.
    """

    def __call__(
        self, ids: Tensor, mask: Tensor | None = None, context: Tensor | None = None, context_mask: Tensor | None = None,
        cache: Any = None, use_cache: bool = False,
    ) -> Any: ...  # fmt: skip


def left_align(ids: Tensor, mask: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """Move every row's real tokens to the right end ([B, L] ids and bool mask), so that new tokens
    can be appended in one column for all rows."""
    mask = mask.bool()
    order = torch.argsort(mask.long(), dim=1, stable=True)  # padding first, real tokens in order
    return torch.where(mask.gather(1, order), ids.gather(1, order), torch.full_like(ids, pad_id)), mask.gather(1, order)


def _apply_penalties(
    logits: Tensor,  # [N, V] next-token logits
    sequences: Tensor,  # [N, T] tokens so far (prompt + generated)
    seq_mask: Tensor,  # [N, T] bool, real tokens
    repetition_penalty: float,
    no_repeat_ngram_size: int,
    ban_eos: bool,
    eos_id: int | None,
) -> Tensor:
    if repetition_penalty != 1.0:
        present = torch.zeros_like(logits, dtype=torch.bool)  # [N, V]
        present.scatter_(1, torch.where(seq_mask, sequences, 0), seq_mask)
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(present, penalised, logits)
    if no_repeat_ngram_size > 0:
        n = no_repeat_ngram_size
        logits = logits.clone()
        for row in range(sequences.shape[0]):
            tokens = sequences[row][seq_mask[row]].tolist()
            if len(tokens) < n:
                continue
            prefix = tuple(tokens[len(tokens) - n + 1 :]) if n > 1 else ()
            banned = {tuple(tokens[i : i + n])[-1] for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n - 1]) == prefix}
            if banned:
                logits[row, list(banned)] = NEG_INF
    if ban_eos and eos_id is not None:
        logits = logits.clone()
        logits[:, eos_id] = NEG_INF
    return logits


def _filter_top_k_top_p(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1).cumsum(-1)  # [N, V]
        remove = probs - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        remove[:, 0] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(1, order, remove), NEG_INF)
    return logits


class _Stepper:
    """Runs the decoder for the next-token logits, with or without the cache."""

    def __init__(self, decoder: StepDecoder, context: Tensor | None, context_mask: Tensor | None, use_cache: bool) -> None:
        self.decoder, self.context, self.context_mask, self.use_cache = decoder, context, context_mask, use_cache
        self.cache: StepCache | None = None
        self.prompt_length = 0
        # a prefix LM needs to know where the prompt ends when it recomputes a whole sequence
        self.takes_prefix = "prefix_length" in inspect.signature(getattr(decoder, "forward", decoder)).parameters

    def first(self, ids: Tensor, mask: Tensor) -> Tensor:
        self.prompt_length = ids.shape[1]
        out = self.decoder(ids, mask, context=self.context, context_mask=self.context_mask, use_cache=self.use_cache)
        self.cache = out.cache
        return out.logits[:, -1]  # [N, V]

    def next(self, ids: Tensor, mask: Tensor) -> Tensor:
        """``ids``/``mask`` [N, T]: the whole sequence so far (its last column is new)."""
        if not self.use_cache:
            extra = {"prefix_length": self.prompt_length} if self.takes_prefix else {}
            return self.decoder(ids, mask, context=self.context, context_mask=self.context_mask, **extra).logits[:, -1]
        out = self.decoder(ids[:, -1:], mask[:, -1:], cache=self.cache, use_cache=True)
        self.cache = out.cache
        return out.logits[:, -1]

    def reorder(self, index: Tensor) -> None:
        """Beam search keeps the rows of ``index``; beams only move within their batch item, whose
        image tokens they share, so the (uncached) context needs no reordering."""
        if self.cache is not None:
            self.cache = self.cache.reorder(index)


@torch.no_grad()
def generate(
    decoder: StepDecoder,
    prompt_ids: Tensor,  # [B, L]
    prompt_mask: Tensor | None = None,  # [B, L] bool; None: all real
    context: Tensor | None = None,  # [B, S, Dc] image tokens
    context_mask: Tensor | None = None,  # [B, S] bool
    *,
    max_new_tokens: int = 20,
    eos_id: int | None = None,
    pad_id: int = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    min_new_tokens: int = 0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """New tokens of every row, [B, <= max_new_tokens], right-padded with ``pad_id`` (see the
    module docstring for the options)."""
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_beams < 1:
        raise UserError(f"num_beams must be >= 1, got {num_beams}")
    if do_sample and num_beams > 1:
        raise UserError("beam search with sampling is not supported: use num_beams=1 with do_sample=True")
    if temperature <= 0 or not 0 < top_p <= 1 or top_k < 0 or repetition_penalty <= 0:
        raise UserError(
            f"temperature must be > 0, top_p in (0, 1], top_k >= 0 and repetition_penalty > 0; got "
            f"{temperature}, {top_p}, {top_k}, {repetition_penalty}"
        )
    mask = torch.ones_like(prompt_ids, dtype=torch.bool) if prompt_mask is None else prompt_mask.bool()
    if bool((~mask.any(1)).any()):
        raise UserError("every prompt needs at least one real token (e.g. the start token)")
    ids, mask = left_align(prompt_ids, mask, pad_id)
    if num_beams > 1:
        return _beam_search(decoder, ids, mask, context, context_mask, max_new_tokens, eos_id, pad_id, num_beams,
                            length_penalty, repetition_penalty, no_repeat_ngram_size, min_new_tokens, use_cache)
    B = ids.shape[0]
    stepper = _Stepper(decoder, context, context_mask, use_cache)
    logits = stepper.first(ids, mask)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    new: list[Tensor] = []
    for step in range(max_new_tokens):
        logits = _apply_penalties(logits.float(), ids, mask, repetition_penalty, no_repeat_ngram_size,
                                  step < min_new_tokens, eos_id)
        if do_sample:
            filtered = _filter_top_k_top_p(logits / temperature, top_k, top_p)
            token = torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(1)  # [B]
        else:
            token = logits.argmax(-1)  # [B]
        live = ~done  # rows still generating: their token (an eos included) is real
        token = torch.where(live, token, torch.full_like(token, pad_id))
        new.append(token)
        if eos_id is not None:
            done = done | (live & (token == eos_id))
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, live[:, None]], dim=1)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = stepper.next(ids, mask)
    return torch.stack(new, dim=1)


def _beam_search(
    decoder: StepDecoder,
    ids: Tensor,
    mask: Tensor,
    context: Tensor | None,
    context_mask: Tensor | None,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
    K: int,
    length_penalty: float,
    repetition_penalty: float,
    no_repeat_ngram_size: int,
    min_new_tokens: int,
    use_cache: bool,
) -> Tensor:
    B, device = ids.shape[0], ids.device
    expand = lambda t: None if t is None else t.repeat_interleave(K, dim=0)  # noqa: E731
    ids, mask = expand(ids), expand(mask)  # [B*K, L]
    stepper = _Stepper(decoder, expand(context), expand(context_mask), use_cache)
    scores = torch.full((B, K), NEG_INF, device=device)
    scores[:, 0] = 0.0  # one live beam at the start (the others are copies)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    row_done = [False] * B
    generated = torch.zeros(B * K, 0, dtype=torch.long, device=device)
    logits = stepper.first(ids, mask)
    for step in range(max_new_tokens):
        # As Hugging Face's beam search: the penalties act on the log-probabilities
        logprobs = _apply_penalties(logits.float().log_softmax(-1), ids, mask, repetition_penalty,
                                    no_repeat_ngram_size, step < min_new_tokens, eos_id)  # [B*K, V]
        V = logprobs.shape[-1]
        cand = (scores.view(B * K, 1) + logprobs).view(B, K * V)  # [B, K*V]
        top_scores, top_index = torch.topk(cand, min(2 * K, K * V), dim=1)  # [B, 2K]
        next_beam = torch.zeros(B, K, dtype=torch.long, device=device)
        next_token = torch.full((B, K), pad_id, dtype=torch.long, device=device)
        next_scores = torch.full((B, K), NEG_INF, device=device)
        for b in range(B):
            if row_done[b]:
                continue
            filled = 0
            for rank, (score, index) in enumerate(zip(top_scores[b].tolist(), top_index[b].tolist())):
                beam, token = divmod(index, V)
                if score == NEG_INF:
                    break
                if eos_id is not None and token == eos_id:
                    if rank >= K:  # as Hugging Face: an ending outside the top num_beams candidates is dropped
                        continue
                    hyp = generated[b * K + beam].tolist() + [token]
                    finished[b].append((score / (len(hyp) ** length_penalty), hyp))
                    continue
                next_beam[b, filled], next_token[b, filled], next_scores[b, filled] = beam, token, score
                filled += 1
                if filled == K:
                    break
            if len(finished[b]) >= K or filled == 0:
                row_done[b] = True
        if all(row_done) or step == max_new_tokens - 1:
            if step == max_new_tokens - 1:  # live beams end here
                for b in range(B):
                    if row_done[b]:
                        continue
                    for k in range(K):
                        if next_scores[b, k] == NEG_INF:
                            continue
                        hyp = generated[b * K + next_beam[b, k]].tolist() + [int(next_token[b, k])]
                        finished[b].append((float(next_scores[b, k]) / (len(hyp) ** length_penalty), hyp))
            break
        flat = (torch.arange(B, device=device)[:, None] * K + next_beam).view(-1)  # [B*K] source rows
        ids = torch.cat([ids.index_select(0, flat), next_token.view(-1, 1)], dim=1)
        mask = torch.cat([mask.index_select(0, flat), torch.ones(B * K, 1, dtype=torch.bool, device=device)], dim=1)
        generated = torch.cat([generated.index_select(0, flat), next_token.view(-1, 1)], dim=1)
        scores = next_scores
        stepper.reorder(flat)
        logits = stepper.next(ids, mask)
    best = [max(f, key=lambda h: h[0])[1] if f else [] for f in finished]
    width = max(1, max(len(h) for h in best))
    out = torch.full((B, width), pad_id, dtype=torch.long, device=device)
    for b, hyp in enumerate(best):
        out[b, : len(hyp)] = torch.tensor(hyp, dtype=torch.long, device=device)
    return out


def decode_tokens(tokens: Tensor, eos_id: int | None, pad_id: int) -> list[list[int]]:
    """Each row's new tokens up to (not including) ``eos_id``, without padding."""
    rows: list[list[int]] = []
    for row in tokens.tolist():
        out: list[int] = []
        for t in row:
            if eos_id is not None and t == eos_id:
                break
            if t != pad_id:
                out.append(t)
        rows.append(out)
    return rows


__all__: Sequence[str] = ("StepCache", "StepDecoder", "decode_tokens", "generate", "left_align")
