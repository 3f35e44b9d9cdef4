"""Flamingo's building blocks: the media mask on a hand-made document, gates at 0 leave the LM as it
is (exactly), the resampler works per image, decoder layers are found from the config."""

from __future__ import annotations

import pytest
import torch

from lit_vlm.errors import UserError
from lit_vlm.modules.perceiver import (
    FlamingoLayer,
    GatedCrossAttention,
    PerceiverResampler,
    find_decoder_layers,
    media_attention_mask,
    text_time,
    wrap_decoder_layers,
)

#          intro  <image>  a     b    <eoc> <image>  c   <eoc>
DOCUMENT = [False, True, False, False, False, True, False, False]


def test_each_token_sees_the_latest_image_at_or_before_it():
    times = text_time(torch.tensor([DOCUMENT]))
    assert times.tolist() == [[0, 1, 1, 1, 1, 2, 2, 2]]
    immediate = media_attention_mask(times, 2)[0].int().tolist()
    assert immediate == [[0, 0], [1, 0], [1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 1]]
    every = media_attention_mask(times, 2, only_immediate=False)[0].int().tolist()
    assert every == [[0, 0], [1, 0], [1, 0], [1, 0], [1, 0], [1, 1], [1, 1], [1, 1]]
    padded = media_attention_mask(times, 2, media_mask=torch.tensor([[True, False]]))[0].int().tolist()
    assert padded == [[0, 0]] + [[1, 0]] * 4 + [[0, 0]] * 3


def test_gated_cross_attention_is_the_identity_at_start_and_reads_only_the_allowed_image():
    torch.manual_seed(0)
    block = GatedCrossAttention(16, 8, heads=2)
    x, media = torch.randn(1, 8, 16), torch.randn(1, 2, 3, 8)  # 2 images of 3 latents
    times = text_time(torch.tensor([DOCUMENT]))
    assert torch.equal(block(x, media, times), x)
    with torch.no_grad():
        block.attn_gate.fill_(1.0)  # attention only (the feed-forward gate stays 0)
    out = block(x, media, times)
    assert torch.equal(out[0, 0], x[0, 0])  # before any image: nothing
    assert not torch.allclose(out[0, 1:], x[0, 1:])
    other = media.clone()
    other[0, 1] = torch.randn(3, 8)  # change image 2: tokens of image 1's chunk do not notice
    out2 = block(x, other, times)
    assert torch.equal(out2[0, :5], out[0, :5]) and not torch.allclose(out2[0, 5:], out[0, 5:])


def test_the_resampler_gives_each_image_its_own_latents():
    torch.manual_seed(0)
    resampler = PerceiverResampler(8, depth=2, heads=2, num_latents=4)
    media = torch.randn(2, 3, 5, 8)  # 2 documents, 3 images, 5 tokens each
    out = resampler(media)
    assert out.shape == (2, 3, 4, 8)
    changed = media.clone()
    changed[0, 2] = torch.randn(5, 8)
    out2 = resampler(changed)
    assert torch.allclose(out2[0, :2], out[0, :2], atol=1e-6) and torch.allclose(out2[1], out[1], atol=1e-6)
    assert not torch.allclose(out2[0, 2], out[0, 2])


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_an_untrained_flamingo_layer_stack_gives_the_language_models_logits_exactly():
    lm = _tiny_llama()
    ids = torch.tensor([[1, 5, 39, 6, 7, 38, 39, 8, 38]])
    want = lm(input_ids=ids).logits
    assert find_decoder_layers(lm) == "model.layers"
    layers = wrap_decoder_layers(lm, "model.layers", lambda i: GatedCrossAttention(16, 8, heads=2))
    assert lm.model.layers is layers and all(isinstance(layer, FlamingoLayer) for layer in layers)
    media = torch.randn(1, 2, 3, 8)
    times = text_time(ids == 39)  # 39 plays <image>
    for layer in layers:
        layer.condition(media, times)
    assert torch.equal(lm(input_ids=ids).logits, want)
    for layer in layers:
        layer.xattn.attn_gate.data.fill_(0.5)
    got = lm(input_ids=ids).logits
    assert torch.equal(got[0, :2], want[0, :2]) and not torch.allclose(got[0, 2:], want[0, 2:])


def test_decoder_layers_are_found_from_the_config_or_by_name():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=30, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    assert find_decoder_layers(gpt2) == "transformer.h"
    assert find_decoder_layers(gpt2, "transformer.h") == "transformer.h"
    with pytest.raises(UserError, match="decoder_layers='transformer.wte'"):
        find_decoder_layers(gpt2, "transformer.wte")


# ---- the family --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flamingo_lm(tmp_path_factory):
    from test_bridges import lm_folder

    return lm_folder(tmp_path_factory.mktemp("flamingo-lm"))


def _flamingo(lm_dir, **kw):
    from lit_vlm.models.flamingo import Flamingo
    from lit_vlm.modules import ConvNet

    torch.manual_seed(0)
    return Flamingo(vision=ConvNet(channels=[8, 16], strides=[2, 2], image_size=16), language_model=str(lm_dir),
                    num_latents=4, resampler_depth=1, heads=2, **kw)


def test_an_untrained_flamingo_is_its_language_model_and_trains_only_its_own_parts(flamingo_lm):
    from lit_vlm.modules.language_model import CausalLM

    lm = CausalLM.from_pretrained(flamingo_lm).model.eval()
    model = _flamingo(flamingo_lm).eval()
    vocab = lm.get_input_embeddings().weight.shape[0]
    tok = model.text_tokenizer
    img, end = tok.token_to_id("<image>"), tok.token_to_id("<|endofchunk|>")
    assert (img, end) == (vocab, vocab + 1)  # added after the LM's vocabulary
    text = torch.tensor([tok.backend.encode("a red circle and a blue square", add_special_tokens=False).ids])
    images, media_mask = torch.randn(1, 2, 3, 16, 16), torch.ones(1, 2, dtype=torch.bool)
    got = model.logits(text, torch.ones_like(text), images, media_mask)
    assert torch.equal(got[..., :vocab], lm(input_ids=text).logits)
    # one step on a document: the LM's own weights and its old token rows do not move
    doc = torch.cat([text[:, :2], torch.tensor([[img]]), text[:, 2:], torch.tensor([[end, img]]), text[:, :3], torch.tensor([[end]])], 1)
    batch = {"input_ids": doc, "attention_mask": torch.ones_like(doc), "labels": doc.clone(), "images": images,
             "media_mask": media_mask}
    model.train()
    from lit_vlm.optim import param_groups

    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=0.1)  # the family's decay, as fit builds it
    with torch.no_grad():
        for layer in model.flamingo_layers:
            layer.xattn.attn_gate.fill_(0.5)  # open the gates so that the resampler gets a gradient too
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(batch)["loss"].backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("resampler.") for n in moved) and any(".xattn." in n for n in moved)
    assert not any(n.startswith("vision.") for n in moved)
    lm_moved = {n for n in moved if n.startswith("lm.") and ".xattn." not in n}
    assert lm_moved == {"lm.model.model.embed_tokens.weight", "lm.model.lm_head.weight"}
    for name in lm_moved:
        p = dict(model.named_parameters())[name]
        assert torch.equal(p[:vocab], before[name][:vocab]) and not torch.equal(p[vocab:], before[name][vocab:])


def test_interleaved_generation_with_the_cache_matches_recomputing_and_scoring_matches_the_logits(flamingo_lm):
    model = _flamingo(flamingo_lm).eval()
    with torch.no_grad():
        for layer in model.flamingo_layers:  # open the gates: the images must matter
            layer.xattn.attn_gate.fill_(1.0)
            layer.xattn.ff_gate.fill_(0.5)
    torch.manual_seed(1)
    images = torch.randn(2, 2, 3, 16, 16)
    media_mask = torch.tensor([[True, True], [True, False]])
    prompts = ["<image>a red circle<|endofchunk|><image>a", "<image>a blue"]
    cached = model.generate_interleaved(images, media_mask, prompts, max_new_tokens=6)
    plain = model.generate_interleaved(images, media_mask, prompts, max_new_tokens=6, use_cache=False)
    assert cached == plain and len(cached) == 2
    with pytest.raises(UserError, match="1 <image> tokens for 2 images"):
        model.generate_interleaved(images, media_mask, ["<image>a", "<image>b"])
    # the cached scores of continuations equal the full sequence's token log-likelihoods
    context, options = prompts[0], [" red circle", " blue"]
    got = model.continuation_log_likelihood(images[:1], media_mask[:1], context, options)
    tok = model.text_tokenizer
    for c, option in enumerate(options):
        ids, mask = model.interleaved_ids([context + option], media_mask[:1])
        n = len(tok.backend.encode(option, add_special_tokens=False).ids)
        logp = model.logits(ids, mask, images[:1], media_mask[:1]).log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
        assert torch.allclose(got[c], logp[-n:].mean(), atol=1e-5)
    other = images.clone()
    other[0, 1] = torch.randn(3, 16, 16)  # the context's last image changes what follows it
    assert not torch.allclose(model.continuation_log_likelihood(other[:1], media_mask[:1], context, options), got)
