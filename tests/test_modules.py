"""Fast CPU tests of the shared building blocks in lit_vlm.modules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_vlm.errors import UserError
from lit_vlm.modules import (
    TEXT_PRESETS,
    VISION_PRESETS,
    Attention,
    AttentionalPooler,
    ConvNet,
    CrossAttention,
    GlobalBatchNorm2d,
    TextDecoder,
    TextTransformer,
    Transformer,
    VisionTransformer,
    interpolate_pos_embed,
    resolve_preset,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- attention


def _naive_attention(q, k, v, mask=None):
    """softmax(Q K^T / sqrt(d) + mask) V with a boolean (True = keep) or additive mask."""
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [B, H, L, S]
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    return logits.softmax(-1) @ v  # [B, H, L, Dh]


def _split(attn: Attention, x):
    B, L, D = x.shape
    q, k, v = attn.qkv(x).split(D, dim=-1)
    return [t.view(B, L, attn.heads, attn.head_dim).transpose(1, 2) for t in (q, k, v)]


@pytest.mark.parametrize("mode", ["none", "causal", "bool", "float", "bool+causal"])
def test_attention_matches_naive_reference(mode: str) -> None:
    B, L, D, H = 2, 7, 16, 4
    attn = Attention(D, H).double().eval()
    x = torch.randn(B, L, D, dtype=torch.float64)
    q, k, v = _split(attn, x)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    keep = torch.rand(B, 1, L, L) > 0.3
    keep |= torch.eye(L, dtype=torch.bool)  # every row keeps at least itself (and so its causal past)
    mask, is_causal, ref_mask = None, False, None
    if mode == "causal":
        is_causal, ref_mask = True, causal
    elif mode == "bool":
        mask = ref_mask = keep
    elif mode == "float":
        mask = ref_mask = torch.randn(B, 1, L, L, dtype=torch.float64)
    elif mode == "bool+causal":
        mask, is_causal, ref_mask = keep, True, keep & causal
    ref = _naive_attention(q, k, v, ref_mask).transpose(1, 2).reshape(B, L, D)
    ref = attn.proj(ref)
    out = attn(x, attn_mask=mask, is_causal=is_causal)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_cross_attention_matches_naive_reference_and_context_dim() -> None:
    B, L, S, D, Dc, H = 2, 3, 5, 16, 24, 4
    ca = CrossAttention(D, H, context_dim=Dc).double()
    x, ctx = torch.randn(B, L, D, dtype=torch.float64), torch.randn(B, S, Dc, dtype=torch.float64)
    key_keep = torch.tensor([[True] * 5, [True, True, False, False, False]])
    q = ca.q(x).view(B, L, H, D // H).transpose(1, 2)
    k, v = [t.view(B, S, H, D // H).transpose(1, 2) for t in ca.kv(ctx).split(D, dim=-1)]
    ref = ca.proj(_naive_attention(q, k, v, key_keep[:, None, None, :]).transpose(1, 2).reshape(B, L, D))
    out = ca(x, ctx, attn_mask=key_keep[:, None, None, :])
    assert out.shape == (B, L, D)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_attention_rejects_bad_heads() -> None:
    with pytest.raises(ValueError, match="divisible"):
        Attention(30, 4)


def test_transformer_hidden_states_convention() -> None:
    tr = Transformer(width=16, layers=3, heads=2).eval()
    x = torch.randn(2, 5, 16)
    out, hs = tr(x, output_hidden_states=True)
    assert len(hs) == 4
    assert hs[0] is x and torch.equal(hs[-1], out)
    torch.testing.assert_close(hs[1], tr.blocks[0](x))
    out2, none = tr(x)
    assert none is None and torch.equal(out, out2)


def test_layerscale_optional_and_grad_checkpointing() -> None:
    plain = Transformer(16, 2, 2)
    assert not any("gamma" in n for n, _ in plain.named_parameters())
    ls = Transformer(16, 2, 2, ls_init=1e-5)
    assert sum("gamma" in n for n, _ in ls.named_parameters()) == 4
    x = torch.randn(2, 5, 16)
    ref = plain(x)[0]
    plain.set_grad_checkpointing(True)
    torch.testing.assert_close(plain(x)[0], ref)


@pytest.mark.parametrize("n_queries", [1, 4])
def test_attentional_pooler_shapes(n_queries: int) -> None:
    pooler = AttentionalPooler(width=32, n_queries=n_queries, heads=4, context_dim=48)
    out = pooler(torch.randn(3, 10, 48))
    assert out.shape == (3, n_queries, 32)


# ----------------------------------------------------------------------------- vision


@pytest.mark.parametrize("pool,queries,pooled_shape", [("cls", 1, (2, 32)), ("mean", 1, (2, 32)), ("attn", 1, (2, 32)), ("attn", 3, (2, 3, 32))])
def test_vision_shapes_per_pool(pool: str, queries: int, pooled_shape: tuple) -> None:
    vit = VisionTransformer("tiny", pool=pool, attn_pool_queries=queries)
    out = vit(torch.randn(2, 3, 32, 32))
    assert vit.width == 32 and vit.grid_size == 4 and vit.num_patches == 16
    assert out.pooled.shape == pooled_shape
    assert out.tokens.shape == (2, 17, 32)
    assert out.hidden_states is None


def test_vision_cls_pool_is_first_token() -> None:
    vit = VisionTransformer("tiny").eval()
    out = vit(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(out.pooled, out.tokens[:, 0])


def test_vision_hidden_states_penultimate() -> None:
    vit = VisionTransformer("tiny", layers=3).eval()
    out = vit(torch.randn(2, 3, 32, 32), output_hidden_states=True)
    assert len(out.hidden_states) == 3 + 1
    penultimate = out.hidden_states[-2]  # what LLaVA feeds its projector
    assert penultimate.shape == (2, 17, 32)
    torch.testing.assert_close(vit.transformer.blocks[-1](penultimate), out.hidden_states[-1])
    torch.testing.assert_close(vit.ln_post(out.hidden_states[-1]), out.tokens)


def test_vision_pos_embed_interpolation() -> None:
    vit = VisionTransformer("tiny").eval()
    out = vit(torch.randn(2, 3, 48, 48))  # 6x6 grid from a 4x4 model
    assert out.tokens.shape == (2, 1 + 36, 32)
    out = vit(torch.randn(2, 3, 32, 48))  # non-square 4x6
    assert out.tokens.shape == (2, 1 + 24, 32)
    with pytest.raises(ValueError, match="50x50.*8"):
        vit(torch.randn(1, 3, 50, 50))

    pe = vit.positional_embedding.detach()
    assert interpolate_pos_embed(pe, 4) is pe  # same size: identity
    # bicubic at scale 1 is the identity too (exercise the resampling path explicitly)
    same = F.interpolate(pe[1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(same.permute(0, 2, 3, 1).reshape(16, 32), pe[1:])
    big = interpolate_pos_embed(pe, (6, 6))
    assert big.shape == (37, 32) and torch.equal(big[0], pe[0])  # class position kept
    batched = interpolate_pos_embed(pe.unsqueeze(0), 8)  # checkpoint layout [1, T, D]
    assert batched.shape == (1, 65, 32)

    # load a checkpoint trained at 32px into a 64px model
    vit64 = VisionTransformer("tiny", image_size=64)
    sd = vit.state_dict()
    sd["positional_embedding"] = interpolate_pos_embed(sd["positional_embedding"], vit64.grid_size)
    vit64.load_state_dict(sd)


def test_vision_patch_dropout() -> None:
    vit = VisionTransformer("tiny", patch_dropout=0.5)  # 16 patches -> keep 8
    images = torch.randn(3, 3, 32, 32)
    vit.train()
    out = vit(images, output_hidden_states=True)
    assert out.tokens.shape == (3, 1 + 8, 32)
    assert out.hidden_states[0].shape == (3, 9, 32)
    # class token always kept: the first token of the transformer input is ln_pre(cls + pos[0])
    cls_in = vit.ln_pre(vit.class_embedding + vit.positional_embedding[0])
    for b in range(3):
        torch.testing.assert_close(out.hidden_states[0][b, 0], cls_in)
    # per-sample subsets differ (independent noise per sample)
    x = vit.conv1(images).flatten(2).transpose(1, 2) + vit.positional_embedding[1:]
    kept = vit.ln_pre(x)
    picked = [
        {int((kept[b] - out.hidden_states[0][b, j]).abs().sum(-1).argmin()) for j in range(1, 9)} for b in range(3)
    ]
    assert all(len(s) == 8 for s in picked) and len({frozenset(s) for s in picked}) > 1
    # per-call override
    assert vit(images, patch_dropout=0.25).tokens.shape == (3, 1 + 12, 32)
    assert vit(images, patch_dropout=0.0).tokens.shape == (3, 17, 32)
    # off in eval mode
    vit.eval()
    assert vit(images).tokens.shape == (3, 17, 32)
    assert vit(images, patch_dropout=0.5).tokens.shape == (3, 17, 32)
    with pytest.raises(ValueError, match="patch_dropout"):
        vit(images, patch_dropout=1.0)


def test_vision_errors() -> None:
    with pytest.raises(ValueError, match="image_size 30.*patch_size 8"):
        VisionTransformer("tiny", image_size=30)
    with pytest.raises(ValueError, match="width 30.*heads 4"):
        VisionTransformer("tiny", width=30, heads=4)
    with pytest.raises(ValueError, match="pool"):
        VisionTransformer("tiny", pool="max")
    with pytest.raises(ValueError, match="patch_dropout"):
        VisionTransformer("tiny", patch_dropout=1.0)
    with pytest.raises(ValueError, match="patch_dropout"):
        VisionTransformer("tiny", patch_dropout=-0.1)
    with pytest.raises(ValueError, match="unknown preset 'XL/7'.*'B/32'"):
        VisionTransformer("XL/7")
    with pytest.raises(ValueError, match="layers, heads, mlp_ratio"):
        VisionTransformer(None, image_size=32, patch_size=8, width=32)


# ----------------------------------------------------------------------------- text


@pytest.mark.parametrize("pool", ["eot", "first", "mean"])
@pytest.mark.parametrize("causal", [True, False])
def test_text_shapes_per_pool(pool: str, causal: bool) -> None:
    txt = TextTransformer("tiny", pool=pool, causal=causal)
    ids = torch.randint(1, 1000, (3, 10))
    out = txt(ids, output_hidden_states=True)
    assert (txt.width, txt.vocab_size, txt.context_length) == (32, 1000, 16)
    assert out.pooled.shape == (3, 32) and out.tokens.shape == (3, 10, 32)
    assert len(out.hidden_states) == 3 and out.hidden_states[-2].shape == (3, 10, 32)


def test_text_causal_later_token_does_not_change_earlier() -> None:
    txt = TextTransformer("tiny").eval()
    ids = torch.randint(1, 1000, (2, 12))
    ids2 = ids.clone()
    ids2[:, 8] = (ids[:, 8] + 1) % 999 + 1
    a, b = txt(ids).tokens, txt(ids2).tokens
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_text_eot_pooling_and_padding_invariance() -> None:
    txt = TextTransformer("tiny").eval()
    ids = torch.randint(1, 1000, (3, 12))
    lengths = torch.tensor([12, 5, 1])
    mask = torch.arange(12)[None] < lengths[:, None]
    ids = ids.masked_fill(~mask, 0)
    out = txt(ids)
    torch.testing.assert_close(out.pooled, out.tokens[torch.arange(3), lengths - 1])
    # explicit mask and mask derived from pad_id agree
    torch.testing.assert_close(txt(ids, mask=mask).pooled, out.pooled)
    # causal: padding content after the eot token cannot change the pooled output
    junk = ids.masked_scatter(~mask, torch.randint(1, 1000, (int((~mask).sum()),)))
    torch.testing.assert_close(txt(junk, mask=mask).pooled, out.pooled)
    # and shorter padding (a shorter batch) gives the same pooled output
    torch.testing.assert_close(txt(ids[1:, :5]).pooled, out.pooled[1:])


def test_text_noncausal_key_padding_ignores_padding() -> None:
    for pool in ("first", "mean", "eot"):
        txt = TextTransformer("tiny", causal=False, pool=pool).eval()
        ids = torch.randint(1, 1000, (2, 10))
        mask = torch.arange(10)[None] < torch.tensor([[10], [6]])
        junk = ids.clone()
        junk[1, 6:] = torch.randint(1, 1000, (4,))
        a, b = txt(ids, mask=mask), txt(junk, mask=mask)
        torch.testing.assert_close(a.pooled, b.pooled)
        torch.testing.assert_close(a.tokens[1, :6], b.tokens[1, :6])
        # non-causal: a later real token does change earlier features
        later = ids.clone()
        later[0, 9] = ids[0, 9] % 999 + 1
        assert not torch.allclose(txt(later, mask=mask).tokens[0, 0], a.tokens[0, 0])


def test_text_mean_pool_is_masked_mean() -> None:
    txt = TextTransformer("tiny", pool="mean").eval()
    ids = torch.randint(1, 1000, (2, 8))
    ids[1, 3:] = 0
    out = txt(ids)
    torch.testing.assert_close(out.pooled[1], out.tokens[1, :3].mean(0))
    torch.testing.assert_close(out.pooled[0], out.tokens[0].mean(0))


def test_text_errors() -> None:
    txt = TextTransformer("tiny")
    with pytest.raises(ValueError, match="17.*16"):
        txt(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        TextTransformer("small")
    assert TextTransformer("small", vocab_size=500, layers=1).vocab_size == 500
    with pytest.raises(ValueError, match="unknown preset 'clip-XL'.*'clip-B'"):
        TextTransformer("clip-XL")
    with pytest.raises(ValueError, match="pool"):
        TextTransformer("tiny", pool="cls")
    with pytest.raises(ValueError, match="width 30.*heads 4"):
        TextTransformer("tiny", width=30, heads=4)


# ----------------------------------------------------------------------------- presets


def test_presets_resolve_and_overrides_win() -> None:
    assert set(VISION_PRESETS) == {"tiny", "small", "B/32", "B/16", "L/14", "L/14-336"}
    assert set(TEXT_PRESETS) == {"tiny", "small", "clip-B", "clip-L"}
    cfg = resolve_preset(VISION_PRESETS, "B/16", {"layers": 2, "width": None})
    assert cfg["layers"] == 2 and cfg["width"] == 768 and cfg["patch_size"] == 16
    assert VISION_PRESETS["B/16"]["layers"] == 12  # table not mutated
    assert resolve_preset(TEXT_PRESETS, None, {"width": 8, "heads": None}) == {"width": 8}
    with pytest.raises(ValueError, match="valid presets: 'tiny', 'small', 'clip-B', 'clip-L'"):
        resolve_preset(TEXT_PRESETS, "bogus", {})
    vit = VisionTransformer("small", layers=1)
    assert (vit.width, vit.grid_size, len(vit.transformer.blocks)) == (192, 8, 1)
    vit = VisionTransformer(None, image_size=16, patch_size=4, width=8, layers=1, heads=2, mlp_ratio=2.0)
    assert vit.num_patches == 16 and vit.transformer.blocks[0].mlp.fc1.out_features == 16


def test_published_parameter_counts_on_meta() -> None:
    with torch.device("meta"):
        vit_b32 = VisionTransformer("B/32")
        clip_b = TextTransformer("clip-B")
        vit_l14 = VisionTransformer("L/14")
    # open_clip ViT-B-32: visual 87.85M incl. its 768x512 projection; 87.456M without it
    assert _n_params(vit_b32) == pytest.approx(87.8e6, rel=0.01)
    assert _n_params(clip_b) == pytest.approx(63.0e6, rel=0.01)  # CLIP paper: 63M-parameter text tower
    assert _n_params(vit_l14) == pytest.approx(303.2e6, rel=0.01)  # open_clip ViT-L-14 visual (304.0M incl. proj)


# ----------------------------------------------------------------------------- gradients


def test_gradients_flow_to_all_parameters() -> None:
    modules = [
        VisionTransformer("tiny", pool="attn", attn_pool_queries=2),
        VisionTransformer("tiny", pool="mean"),
        TextTransformer("tiny"),
        TextTransformer("tiny", causal=False, pool="first"),
    ]
    for m in modules:
        m.train()
        if isinstance(m, VisionTransformer):
            out = m(torch.randn(2, 3, 32, 32))
        else:
            out = m(torch.randint(1, 1000, (2, 16)))
        (out.pooled.square().sum() + out.tokens.square().mean()).backward()
        for name, p in m.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{type(m).__name__}.{name} got no gradient"


def test_conv_stem():
    """The early-convolution stem reaches the patch stride; it needs a power-of-two patch size."""
    vit = VisionTransformer("tiny", image_size=32, patch_size=8, stem="conv")
    out = vit(torch.randn(2, 3, 32, 32))
    assert out.tokens.shape == (2, 1 + 16, vit.width) and out.pooled.shape == (2, vit.width)
    strides = [m.stride[0] for m in vit.conv1 if isinstance(m, torch.nn.Conv2d)]
    assert strides == [2, 2, 2, 1]
    out48 = vit(torch.randn(1, 3, 48, 48))  # positional interpolation still applies
    assert out48.tokens.shape[1] == 1 + 36
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        VisionTransformer("tiny", image_size=36, patch_size=12, stem="conv")
    with pytest.raises(ValueError, match="stem must be"):
        VisionTransformer("tiny", stem="cnn")


# ----------------------------------------------------------------------------- checkpoint-compatibility options


def test_quick_gelu_and_activation_choice() -> None:
    from lit_vlm.modules.transformer import MLP, QuickGELU, make_activation

    x = torch.tensor([-2.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    expected = torch.tensor([-2.0 / (1 + math.exp(3.404)), 0.0, 1.0 / (1 + math.exp(-1.702)), 3.0 / (1 + math.exp(-5.106))], dtype=torch.float64)
    torch.testing.assert_close(QuickGELU()(x), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(make_activation("gelu")(x), 0.5 * x * (1 + torch.erf(x / math.sqrt(2))))
    assert isinstance(make_activation("gelu_tanh"), torch.nn.GELU) and make_activation("gelu_tanh").approximate == "tanh"
    with pytest.raises(ValueError, match="act_layer must be one of .*'quick_gelu'.*got 'relu'"):
        make_activation("relu")
    with pytest.raises(ValueError, match="act_layer"):
        VisionTransformer("tiny", act_layer="swish")
    vit = VisionTransformer("tiny", act_layer="quick_gelu")
    txt = TextTransformer("tiny", act_layer="quick_gelu")
    assert all(isinstance(b.mlp.act, QuickGELU) for b in [*vit.transformer.blocks, *txt.transformer.blocks])
    # defaults unchanged: exact GELU
    assert type(VisionTransformer("tiny").transformer.blocks[0].mlp.act) is torch.nn.GELU
    assert type(MLP(8).act) is torch.nn.GELU


def test_norm_eps_ln_post_and_state_dict_keys_unchanged() -> None:
    default_keys = set(VisionTransformer("tiny").state_dict())
    vit = VisionTransformer("tiny", norm_eps=1e-6, act_layer="quick_gelu")
    assert set(vit.state_dict()) == default_keys  # options change behaviour, not the key layout
    norms = [m for m in vit.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 + 2 * 2 and all(m.eps == 1e-6 for m in norms)  # ln_pre, ln_post, 2 per block
    txt = TextTransformer("tiny", norm_eps=1e-6)
    assert all(m.eps == 1e-6 for m in txt.modules() if isinstance(m, torch.nn.LayerNorm))
    bare = VisionTransformer("tiny", ln_post=False).eval()
    out = bare(torch.randn(2, 3, 32, 32), output_hidden_states=True)
    torch.testing.assert_close(out.tokens, out.hidden_states[-1])  # no final norm
    torch.testing.assert_close(out.pooled, out.hidden_states[-1][:, 0])
    assert "ln_post.weight" not in bare.state_dict()


def test_mlp_hidden_width_survives_float_round_off() -> None:
    from lit_vlm.modules.transformer import mlp_hidden_width

    assert mlp_hidden_width(1664, 8192 / 1664) == 8192  # open_clip ViT-bigG's ratio
    assert mlp_hidden_width(1152, 4304 / 1152) == 4304  # SigLIP so400m's ratio
    assert mlp_hidden_width(33, 2.5) == 82  # a genuinely fractional product still truncates
    assert mlp_hidden_width(768, 4.0) == 3072


def test_text_argmax_and_eos_pooling() -> None:
    txt = TextTransformer("tiny", pool="argmax").eval()
    ids = torch.tensor([[5, 999, 7, 0], [998, 3, 999, 999]])  # max id: position 1, then first max at 2
    out = txt(ids)
    torch.testing.assert_close(out.pooled, out.tokens[torch.arange(2), torch.tensor([1, 2])])
    eos = TextTransformer("tiny", pool="eos", eos_id=7).eval()
    eos.load_state_dict(txt.state_dict())
    ids = torch.tensor([[5, 6, 7, 7], [7, 7, 7, 7], [5, 6, 8, 9]])  # first eos at 2, at 0, none -> 0
    out = eos(ids)
    torch.testing.assert_close(out.pooled, out.tokens[torch.arange(3), torch.tensor([2, 0, 0])])
    with pytest.raises(ValueError, match="eos_id"):
        TextTransformer("tiny", pool="eos")


def test_towers_take_layer_scale() -> None:
    vit = VisionTransformer("tiny", ls_init=0.5)
    txt = TextTransformer("tiny", ls_init=0.5)
    for m in (vit, txt):
        gammas = [k for k in m.state_dict() if k.endswith("gamma")]
        assert len(gammas) == 4 and all(torch.all(m.state_dict()[k] == 0.5) for k in gammas)


# ---- freezing ---------------------------------------------------------------------------------
def test_lock_freezes_keeps_eval_and_leaves_the_optimiser():
    """open_clip's lock() as a building block: frozen parameters leave the optimiser, fully frozen
    submodules stay in eval mode when the owner trains, the last groups and the norms can stay
    trainable, and a deep copy keeps its own (frozen) behaviour."""
    import copy

    from torch import nn

    from lit_vlm.modules.freeze import lock, vit_groups
    from lit_vlm.optim import param_groups

    owner = nn.ModuleDict({"vision": VisionTransformer("tiny"), "head": nn.Linear(32, 8)})
    groups = vit_groups(owner["vision"])
    assert len(groups) == 3  # stem, block 0, [block 1, ln_post] for the 2-block tiny tower
    frozen = lock(owner["vision"], groups, unlocked_groups=1, unlock_norms=True)
    owner.train()
    assert all(not m.training for m in frozen) and owner["head"].training
    assert owner["vision"].transformer.blocks[1].training  # the unlocked last group trains
    trainable = {id(p) for g in param_groups(owner, 0.1) for p in g["params"]}
    assert id(owner["vision"].conv1.weight) not in trainable and id(owner["vision"].transformer.blocks[0].mlp.fc1.weight) not in trainable
    assert id(owner["vision"].transformer.blocks[1].mlp.fc1.weight) in trainable
    assert id(owner["vision"].ln_pre.weight) in trainable  # unlock_norms
    twin = copy.deepcopy(owner)
    twin.train()
    assert not twin["vision"].transformer.blocks[0].training and owner["vision"].transformer.blocks[0] is not twin["vision"].transformer.blocks[0]
    with pytest.raises(ValueError, match=r"tower_unlocked_groups must be in \[0, 3\]"):
        lock(VisionTransformer("tiny"), vit_groups(VisionTransformer("tiny")), unlocked_groups=4, what="tower")


def test_lock_works_on_a_hugging_face_model():
    transformers = pytest.importorskip("transformers")
    from lit_vlm.modules.freeze import lock

    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    lm = transformers.GPT2LMHeadModel(config)
    groups = [[lm.transformer.wte, lm.transformer.wpe], *[[b] for b in lm.transformer.h], [lm.transformer.ln_f]]
    lock(lm, groups, unlocked_groups=1)
    lm.train()
    assert not lm.transformer.h[0].training and not any(p.requires_grad for p in lm.transformer.h.parameters())
    assert all(p.requires_grad for p in lm.transformer.ln_f.parameters())


def test_a_locked_module_pickles():
    import pickle

    from lit_vlm.modules.freeze import lock

    tower = VisionTransformer("tiny")
    lock(tower)
    again = pickle.loads(pickle.dumps(tower))
    again.train()
    assert not again.training and not any(p.requires_grad for p in again.parameters())


def test_convnet_shapes_tokens_and_errors() -> None:
    torch.manual_seed(0)
    net = ConvNet(channels=(8, 16, 24), strides=(2, 2, 1), image_size=32).eval()
    out = net(torch.randn(3, 3, 32, 32))
    assert net.width == 24 and net.stride == 4
    assert out.pooled.shape == (3, 24) and out.tokens.shape == (3, 1 + 8 * 8, 24)
    assert torch.equal(out.tokens[:, 0], out.pooled)  # "class token first", as a ViT's
    assert torch.allclose(out.tokens[:, 1:].mean(1), out.pooled, atol=1e-6)
    for kwargs, match in [({"norm": "layer"}, "norm must be one of"), ({"strides": (2,)}, "same non-zero length"),
                          ({"convs_per_stage": 0}, ">= 1")]:
        with pytest.raises(UserError, match=match):
            ConvNet(**kwargs)
    with pytest.raises(UserError, match="needs a VisionTransformer"):
        net(torch.randn(1, 3, 32, 32), patch_dropout=0.5)


def test_global_batchnorm_is_batchnorm_in_one_process() -> None:
    torch.manual_seed(0)
    ours, ref = GlobalBatchNorm2d(4), torch.nn.BatchNorm2d(4)
    x = torch.randn(5, 4, 6, 6) * 3 + 1
    assert torch.allclose(ours(x), ref(x), atol=1e-6)
    assert torch.allclose(ours.running_var, ref.running_var) and torch.allclose(ours.running_mean, ref.running_mean)


def test_text_token_init_std() -> None:
    torch.manual_seed(0)
    text = TextTransformer("tiny", vocab_size=500, context_length=8, layers=0, pool="mean", token_init_std=1.0)
    assert text.token_embedding.weight.std().item() == pytest.approx(1.0, abs=0.05)
    with pytest.raises(UserError, match="token_init_std"):
        TextTransformer("tiny", vocab_size=50, context_length=8, token_init_std=0)
    decoder = TextDecoder(vocab_size=500, context_length=8, width=32, layers=1, heads=2, token_init_std=1.0, tie_embeddings=False)
    assert decoder.token_embedding.weight.std().item() == pytest.approx(1.0, abs=0.05)
    assert decoder.lm_head.weight.std().item() == pytest.approx(32 ** -0.5, rel=0.1)  # untied: the output starts small
    with pytest.raises(UserError, match="token_init_std"):
        TextDecoder(vocab_size=50, context_length=8, width=32, layers=1, heads=2, token_init_std=-1)
