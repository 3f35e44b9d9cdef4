"""Text decoder and generation: cached and uncached decoding agree (logits and tokens), padding
(left or right, in a batch or alone) does not change a row's result, beam search with one beam
is greedy, and the sampling / penalty options do what they say."""

from __future__ import annotations

import pytest
import torch

from lit_vlm.generation import decode_tokens, generate, left_align
from lit_vlm.modules.decoder import TextDecoder

V, CTX, S, DC = 40, 32, 5, 12
EOS, PAD, BOS = 2, 0, 1


def make_decoder(cross: int | None = None, seed: int = 0) -> TextDecoder:
    torch.manual_seed(seed)
    dec = TextDecoder(V, CTX, width=32, layers=3, heads=4, cross_attention_layers=cross, context_dim=DC,
                      tie_embeddings=False).eval()
    with torch.no_grad():  # a random model with distinct, history-dependent next-token choices
        dec.token_embedding.weight.normal_(0, 1.0)
        dec.positional_embedding.normal_(0, 0.5)
        dec.lm_head.weight.mul_(4)
    return dec


def prompts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompts of lengths 1, 4, 2 and image tokens for each."""
    ids = torch.tensor([[BOS, 0, 0, 0], [BOS, 7, 8, 9], [BOS, 11, 0, 0]])
    mask = ids != 0
    g = torch.Generator().manual_seed(1)
    context = torch.randn(3, S, DC, generator=g)
    return ids, mask, context


def test_cached_logits_equal_full_recompute():
    dec = make_decoder(cross=2)
    ids, mask, context = prompts()
    ids, mask = left_align(ids, mask, PAD)
    full_ids = torch.cat([ids, torch.tensor([[5], [6], [7]])], dim=1)
    full_mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], dim=1)
    full = dec(full_ids, full_mask, context=context).logits[:, -1]
    first = dec(ids, mask, context=context, use_cache=True)
    step = dec(full_ids[:, -1:], full_mask[:, -1:], cache=first.cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_padding_left_or_right_gives_the_same_logits():
    dec = make_decoder(cross=None)
    ids, mask, context = prompts()
    right = dec(ids, mask, context=context).logits  # [3, 4, V]
    left_ids, left_mask = left_align(ids, mask, PAD)
    left = dec(left_ids, left_mask, context=context).logits
    for row in range(3):
        n = int(mask[row].sum())
        torch.testing.assert_close(right[row, :n], left[row, -n:], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(left).all()  # padded queries stay finite


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"num_beams": 3},
        {"num_beams": 2, "length_penalty": 0.5, "no_repeat_ngram_size": 2},
        {"do_sample": True, "top_k": 5, "top_p": 0.9, "temperature": 0.8},
        {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "min_new_tokens": 3},
    ],
    ids=["greedy", "beam3", "beam2-penalties", "sample", "greedy-penalties"],
)
def test_cached_and_uncached_generation_are_identical(options):
    dec = make_decoder(cross=2)
    ids, mask, context = prompts()
    out = {}
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(3)
        out[use_cache] = generate(dec, ids, mask, context, max_new_tokens=12, eos_id=EOS, pad_id=PAD,
                                  generator=g, use_cache=use_cache, **options)
    assert torch.equal(out[True], out[False])
    assert out[True].shape[0] == 3 and out[True].shape[1] <= 12


def test_beam_one_is_greedy_and_rows_do_not_depend_on_the_batch():
    dec = make_decoder(cross=None)
    ids, mask, context = prompts()
    greedy = generate(dec, ids, mask, context, max_new_tokens=10, eos_id=EOS, pad_id=PAD)
    beam1 = generate(dec, ids, mask, context, max_new_tokens=10, eos_id=EOS, pad_id=PAD, num_beams=1)
    assert torch.equal(greedy, beam1)
    assert decode_tokens(greedy, EOS, PAD) == decode_tokens(beam1, EOS, PAD)
    batched = generate(dec, ids, mask, context, max_new_tokens=10, eos_id=EOS, pad_id=PAD, num_beams=3)
    for row in range(3):  # alone, without padding: the same tokens
        n = int(mask[row].sum())
        alone = generate(dec, ids[row : row + 1, :n], None, context[row : row + 1], max_new_tokens=10, eos_id=EOS, pad_id=PAD)
        assert decode_tokens(alone, EOS, PAD)[0] == decode_tokens(greedy, EOS, PAD)[row]
        beams = generate(dec, ids[row : row + 1, :n], None, context[row : row + 1], max_new_tokens=10, eos_id=EOS,
                         pad_id=PAD, num_beams=3)
        assert decode_tokens(beams, EOS, PAD)[0] == decode_tokens(batched, EOS, PAD)[row]


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy():
    dec = make_decoder(cross=2, seed=4)
    ids, mask, context = prompts()

    @torch.no_grad()
    def logprob(new: torch.Tensor, row: int) -> float:
        tokens = new[row][new[row] != PAD]
        seq = torch.cat([ids[row][mask[row]], tokens])[None]
        logp = dec(seq, context=context[row : row + 1]).logits.log_softmax(-1)[0]
        start = int(mask[row].sum())
        return float(sum(logp[start - 1 + i, t] for i, t in enumerate(tokens.tolist())))

    greedy = generate(dec, ids, mask, context, max_new_tokens=6, pad_id=PAD)  # no eos: fixed length
    beam = generate(dec, ids, mask, context, max_new_tokens=6, pad_id=PAD, num_beams=4, length_penalty=0.0)
    for row in range(3):
        assert logprob(beam, row) >= logprob(greedy, row) - 1e-4


def test_eos_stops_a_row_and_pads_it():
    dec = make_decoder(cross=None)
    ids, mask, context = prompts()
    bias = torch.zeros(V)
    bias[EOS] = 1e4  # every row ends at once
    dec.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    out = generate(dec, ids, mask, context, max_new_tokens=8, eos_id=EOS, pad_id=PAD)
    assert out.tolist() == [[EOS]] * 3
    out = generate(dec, ids, mask, context, max_new_tokens=8, eos_id=EOS, pad_id=PAD, min_new_tokens=2)
    assert (out[:, :2] != EOS).all() and (out[:, 2] == EOS).all()


def test_sampling_options():
    dec = make_decoder(cross=None)
    ids, mask, context = prompts()
    a = generate(dec, ids, mask, context, max_new_tokens=8, do_sample=True, generator=torch.Generator().manual_seed(0))
    b = generate(dec, ids, mask, context, max_new_tokens=8, do_sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)  # reproducible with a generator
    top1 = generate(dec, ids, mask, context, max_new_tokens=8, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(top1, generate(dec, ids, mask, context, max_new_tokens=8))  # top-k 1 is greedy
    nucleus = generate(dec, ids, mask, context, max_new_tokens=8, do_sample=True, top_p=1e-6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(nucleus, generate(dec, ids, mask, context, max_new_tokens=8))  # a tiny nucleus is greedy
    no_repeat = generate(dec, ids, mask, context, max_new_tokens=12, no_repeat_ngram_size=1)
    for row in decode_tokens(no_repeat, None, PAD):
        assert len(row) == len(set(row))  # no token twice among the new ones
    with pytest.raises(ValueError, match="top_p"):
        generate(dec, ids, mask, context, top_p=0.0)
    with pytest.raises(ValueError, match="at least one real token"):
        generate(dec, ids, torch.zeros_like(mask), context)


def test_decoder_refuses_what_it_cannot_do():
    dec = make_decoder(cross=1)
    ids, mask, context = prompts()
    with pytest.raises(ValueError, match="pass context"):
        dec(ids, mask)
    with pytest.raises(ValueError, match="cross_attention_layers"):
        TextDecoder(V, CTX, width=32, layers=2, heads=4, cross_attention_layers=3)
    with pytest.raises(ValueError, match="exceed context_length"):
        dec(torch.ones(1, CTX + 1, dtype=torch.long), context=context[:1])
    lm = make_decoder(cross=0)  # a plain language model needs no context
    assert lm(ids, mask).logits.shape == (3, 4, V)


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_and_beam_search_match_hugging_face(seed):
    """The reference: transformers' own generate on a random tiny GPT-2, driven through an adapter
    that gives our decoding loop the same model (no cache). Tokens up to the first eos must agree."""
    transformers = pytest.importorskip("transformers")
    import warnings
    from types import SimpleNamespace

    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=BOS,
                                     eos_token_id=EOS, pad_token_id=PAD)
    model = transformers.GPT2LMHeadModel(config).eval()

    class Adapter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids, mask=None, context=None, context_mask=None, cache=None, use_cache=False):
            mask = mask.long()
            positions = (mask.cumsum(1) - 1).clamp_min(0)
            return SimpleNamespace(logits=self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits, cache=None)

    ids = torch.tensor([[BOS, 0, 0, 0, 0], [BOS, 7, 8, 9, 3], [BOS, 11, 0, 0, 0], [BOS, 4, 4, 0, 0]])
    mask = ids != PAD
    left_ids, left_mask = left_align(ids, mask, PAD)

    def upto_eos(tokens: torch.Tensor) -> list[list[int]]:
        rows = []
        for row in tokens.tolist():
            row = row[: row.index(EOS) + 1] if EOS in row else row
            rows.append([t for t in row if t != PAD])
        return rows

    cases = [{}, {"num_beams": 3}, {"num_beams": 4, "length_penalty": 0.6}, {"num_beams": 2, "no_repeat_ngram_size": 2},
             {"repetition_penalty": 1.3}, {"num_beams": 3, "repetition_penalty": 1.3, "min_new_tokens": 4}]
    for options in cases:
        ours = generate(Adapter(), ids, mask, max_new_tokens=16, eos_id=EOS, pad_id=PAD, use_cache=False, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = model.generate(input_ids=left_ids, attention_mask=left_mask.long(), max_new_tokens=16, do_sample=False,
                                    eos_token_id=EOS, pad_token_id=PAD, early_stopping=options.get("num_beams", 1) > 1,
                                    **options)[:, left_ids.shape[1]:]
        assert upto_eos(ours) == upto_eos(theirs), options
