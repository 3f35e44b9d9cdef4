"""Weight interop with Hugging Face CLIPModel and OpenAI / open_clip state dicts (tiny, CPU, no download).

Reference: a randomly initialised ``transformers.CLIPModel`` built from a tiny ``CLIPConfig``
(every parameter perturbed so that zero biases or unit LayerNorms cannot hide a wrong mapping).
The OpenAI-layout state dicts are produced here from the HF weights by a plain mapping written
in this file, independent of lit_vlm.interop.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import save_file  # noqa: E402

from lit_vlm.interop import (  # noqa: E402
    CheckpointMismatchError,
    build_clip_towers,
    convert_hf_to_lit,
    convert_lit_to_openai,
    convert_openai_to_lit,
    export_hf,
    hf_config_to_kwargs,
    load_clip_state_dict,
    load_into,
    load_state_dict,
)
from lit_vlm.models.clip import CLIP  # noqa: E402
from lit_vlm.modules import TEXT_PRESETS, VISION_PRESETS, TextTransformer, VisionTransformer  # noqa: E402
from lit_vlm.modules.presets import CLIP_PRESETS  # noqa: E402

VOCAB, CTX, EMBED = 99, 16, 24
EOS = VOCAB - 1  # the largest id, as OpenAI's <|endoftext|> (49407) is
HEADS = 4


def _config(act: str, eos_token_id: int) -> "transformers.CLIPConfig":
    return transformers.CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=HEADS,
            max_position_embeddings=CTX, hidden_act=act, pad_token_id=1, bos_token_id=VOCAB - 2, eos_token_id=eos_token_id,
        ),
        vision_config=dict(
            hidden_size=40, intermediate_size=160, num_hidden_layers=2, num_attention_heads=HEADS,
            image_size=32, patch_size=8, hidden_act=act,
        ),
        projection_dim=EMBED,
    )


def _hf_model(act: str, eos_token_id: int = EOS, seed: int = 0) -> "transformers.CLIPModel":
    torch.manual_seed(seed)
    model = transformers.CLIPModel(_config(act, eos_token_id)).eval()
    with torch.no_grad():
        for p in model.parameters():  # no zero biases / unit LayerNorms left to hide a wrong mapping
            p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, generator=g)  # [B, 3, H, W]
    ids = torch.randint(2, VOCAB - 2, (3, CTX), generator=g)  # [B, L]
    for row, length in enumerate((5, CTX, 9)):  # EOT at position length - 1, then padded with EOT
        ids[row, 0] = VOCAB - 2  # start-of-text
        ids[row, length - 1 :] = EOS
    return images, ids


def _feat(out) -> torch.Tensor:
    """transformers 5 returns a ModelOutput (projection in pooler_output), 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def _hf_embeddings(model, images, ids) -> tuple[torch.Tensor, torch.Tensor]:
    return _feat(model.get_image_features(pixel_values=images)), _feat(model.get_text_features(input_ids=ids))


@torch.no_grad()
def _lit_embeddings(vision, text, extras, images, ids) -> tuple[torch.Tensor, torch.Tensor]:
    img = vision(images).pooled @ extras["image_projection"].t()  # [B, E]
    txt = text(ids).pooled @ extras["text_projection"].t()  # [B, E]
    return img, txt


def _assert_same_embeddings(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)  # after projection, before normalisation
        torch.testing.assert_close(F.normalize(x, dim=-1), F.normalize(y, dim=-1), atol=1e-5, rtol=0)


def _openai_layout(hf_sd: dict[str, torch.Tensor], layers: int = 2) -> dict[str, torch.Tensor]:
    """OpenAI CLIP key layout (model.py) from HF CLIPModel weights, written out by hand."""
    out = {
        "visual.conv1.weight": hf_sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": hf_sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": hf_sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": hf_sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": hf_sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": hf_sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": hf_sd["vision_model.post_layernorm.bias"],
        "visual.proj": hf_sd["visual_projection.weight"].t().contiguous(),
        "token_embedding.weight": hf_sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf_sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf_sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf_sd["text_model.final_layer_norm.bias"],
        "text_projection": hf_sd["text_projection.weight"].t().contiguous(),
        "logit_scale": hf_sd["logit_scale"],
    }
    for src, dst in (("vision_model.encoder.layers.", "visual.transformer.resblocks."), ("text_model.encoder.layers.", "transformer.resblocks.")):
        for i in range(layers):
            s, d = f"{src}{i}.", f"{dst}{i}."
            for part in ("weight", "bias"):
                out[d + f"attn.in_proj_{part}"] = torch.cat([hf_sd[s + f"self_attn.{n}_proj.{part}"] for n in "qkv"])
                out[d + f"attn.out_proj.{part}"] = hf_sd[s + f"self_attn.out_proj.{part}"]
                out[d + f"ln_1.{part}"] = hf_sd[s + f"layer_norm1.{part}"]
                out[d + f"ln_2.{part}"] = hf_sd[s + f"layer_norm2.{part}"]
                out[d + f"mlp.c_fc.{part}"] = hf_sd[s + f"mlp.fc1.{part}"]
                out[d + f"mlp.c_proj.{part}"] = hf_sd[s + f"mlp.fc2.{part}"]
    return {k: v.detach().clone() for k, v in out.items()}


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory) -> tuple["transformers.CLIPModel", Path]:
    model = _hf_model("quick_gelu")
    path = tmp_path_factory.mktemp("hf_quick")
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text("{}")
    return model, path


# ---------------------------------------------------------------------- Hugging Face -> lit-vlm


@pytest.mark.parametrize(
    "act, eos_token_id, pool",
    [("quick_gelu", EOS, "eos"), ("gelu", EOS, "eos"), ("quick_gelu", 2, "argmax")],
    ids=["quick_gelu", "gelu", "legacy-eos2-argmax"],
)
def test_hf_directory_matches_hf_embeddings(tmp_path: Path, act: str, eos_token_id: int, pool: str) -> None:
    model = _hf_model(act, eos_token_id)
    model.save_pretrained(tmp_path)
    vision, text, extras = build_clip_towers(tmp_path)
    assert extras["format"] == "hf" and extras["tokenizer"] is None and extras["embed_dim"] == EMBED
    assert vision.act_layer == text.act_layer == act
    assert text.pool == pool and (text.eos_id == EOS if pool == "eos" else True)
    assert extras["text_kwargs"]["heads"] == HEADS and extras["vision_kwargs"]["width"] == 40
    torch.testing.assert_close(extras["logit_scale"], model.logit_scale.detach(), atol=0, rtol=0)
    images, ids = _inputs()
    _assert_same_embeddings(_lit_embeddings(vision, text, extras, images, ids), _hf_embeddings(model, images, ids))


def test_hf_into_clip_family_module(quick_model) -> None:
    model, path = quick_model
    vk, tk, embed_dim, sd, tokenizer = convert_hf_to_lit(path)
    assert tokenizer == path / "tokenizer.json"
    clip = CLIP(VisionTransformer(**vk), TextTransformer(**tk), embed_dim=embed_dim).eval()
    report = load_into(clip, sd)
    assert not report.missing and not report.unexpected
    images, ids = _inputs()
    with torch.no_grad():
        ours = (clip.encode_image(images, normalize=False), clip.encode_text(ids, torch.ones_like(ids, dtype=torch.bool), normalize=False))
    _assert_same_embeddings(ours, _hf_embeddings(model, images, ids))
    torch.testing.assert_close(clip.logit_scale.detach(), model.logit_scale.detach(), atol=0, rtol=0)


def test_hf_config_defaults_are_the_b32_presets() -> None:
    """An empty config takes CLIPVisionConfig/CLIPTextConfig defaults: OpenAI ViT-B/32's shapes."""
    vk, tk, embed_dim = hf_config_to_kwargs({})
    for key, value in VISION_PRESETS["B/32"].items():
        assert vk[key] == value, key
    for key, value in TEXT_PRESETS["clip-B"].items():
        assert tk[key] == value, key
    assert embed_dim == CLIP_PRESETS["ViT-B/32"]["embed_dim"] == 512
    assert vk["act_layer"] == tk["act_layer"] == "quick_gelu" and vk["norm_eps"] == 1e-5
    with pytest.raises(ValueError, match="hidden_act"):
        hf_config_to_kwargs({"vision_config": {"hidden_act": "relu"}})
    with pytest.raises(ValueError, match="model_type='siglip'"):
        hf_config_to_kwargs({"model_type": "siglip"})


def test_presets_match_published_clip_shapes() -> None:
    """Hand-written from OpenAI's CLIP paper / model card (Table 19 and 20)."""
    published = {
        "ViT-B/32": ((224, 32, 768, 12, 12), (512, 12, 8), 512),
        "ViT-B/16": ((224, 16, 768, 12, 12), (512, 12, 8), 512),
        "ViT-L/14": ((224, 14, 1024, 24, 16), (768, 12, 12), 768),
        "ViT-L/14@336px": ((336, 14, 1024, 24, 16), (768, 12, 12), 768),
    }
    for name, (vision, text, embed) in published.items():
        entry = CLIP_PRESETS[name]
        v, t = VISION_PRESETS[entry["vision"]], TEXT_PRESETS[entry["text"]]
        assert (v["image_size"], v["patch_size"], v["width"], v["layers"], v["heads"]) == vision, name
        assert (t["width"], t["layers"], t["heads"]) == text, name
        assert (t["context_length"], t["vocab_size"], v["mlp_ratio"], t["mlp_ratio"]) == (77, 49408, 4.0, 4.0)
        assert entry["embed_dim"] == embed and entry["act_layer"] == "quick_gelu"


def test_preset_names_follow_open_clip_activation_naming() -> None:
    """OpenAI's spelling is its QuickGELU release; open_clip's plain name is exact GELU (its model
    configs leave quick_gelu false) and its ``-quickgelu`` name is QuickGELU; shapes are shared."""
    for openai, open_clip in (("ViT-B/32", "ViT-B-32"), ("ViT-B/16", "ViT-B-16"), ("ViT-L/14", "ViT-L-14"),
                              ("ViT-L/14@336px", "ViT-L-14-336")):
        gelu, quick = CLIP_PRESETS[open_clip], CLIP_PRESETS[f"{open_clip}-quickgelu"]
        assert (gelu["act_layer"], quick["act_layer"], CLIP_PRESETS[openai]["act_layer"]) == ("gelu", "quick_gelu", "quick_gelu")
        shape = {k: v for k, v in CLIP_PRESETS[openai].items() if k != "act_layer"}
        assert {k: v for k, v in gelu.items() if k != "act_layer"} == shape == {k: v for k, v in quick.items() if k != "act_layer"}


# -------------------------------------------------------------------------- lit-vlm -> HF


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_export_hf_round_trip_is_exact(tmp_path: Path, act: str) -> None:
    model = _hf_model(act, seed=3)
    model.save_pretrained(tmp_path / "src")
    vision, text, extras = build_clip_towers(tmp_path / "src")
    tok = tmp_path / "tok.json"
    tok.write_text('{"x": 1}')
    out = export_hf(vision, text, extras["image_projection"], extras["text_projection"], extras["logit_scale"], tmp_path / "out", tokenizer=tok)
    assert (out / "tokenizer.json").read_text() == '{"x": 1}'
    reloaded = transformers.CLIPModel.from_pretrained(out).eval()
    ref_sd, new_sd = model.state_dict(), reloaded.state_dict()
    assert set(ref_sd) == set(new_sd)
    for key in ref_sd:
        assert torch.equal(ref_sd[key], new_sd[key]), key
    assert reloaded.config.vision_config.hidden_act == act and reloaded.config.text_config.eos_token_id == EOS
    images, ids = _inputs(seed=5)
    ref = _hf_embeddings(model, images, ids)
    _assert_same_embeddings(_hf_embeddings(reloaded, images, ids), ref)
    _assert_same_embeddings(_lit_embeddings(vision, text, extras, images, ids), ref)
    # and back to lit-vlm: identical tensors
    _, _, _, sd2, tokenizer = convert_hf_to_lit(out)
    assert tokenizer == out / "tokenizer.json"
    assert set(sd2) == set(extras["state_dict"])
    for key, value in extras["state_dict"].items():
        assert torch.equal(sd2[key], value), key


def test_export_hf_from_lit_towers_with_eot_pool(tmp_path: Path) -> None:
    """A lit-vlm-trained CLIP (pool='eot', GELU) exports with the tokenizer's end id and matches."""
    torch.manual_seed(0)
    vision = VisionTransformer("tiny").eval()
    text = TextTransformer("tiny", vocab_size=VOCAB, context_length=CTX).eval()
    for module in (vision, text):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
    img_proj, txt_proj = torch.randn(EMBED, vision.width), torch.randn(EMBED, text.width)
    with pytest.raises(ValueError, match="eos_token_id"):
        export_hf(vision, text, img_proj, txt_proj, 2.0, tmp_path / "x")
    out = export_hf(vision, text, img_proj, txt_proj, 2.0, tmp_path / "out", eos_token_id=3)
    hf = transformers.CLIPModel.from_pretrained(out).eval()
    images, _ = _inputs()
    ids = torch.tensor([[4, 5, 6, 3, 0, 0], [4, 7, 7, 7, 7, 3]])  # [bos?] tokens, eos=3, pad=0
    mask = ids != 0
    with torch.no_grad():
        ours = (vision(images).pooled @ img_proj.t(), text(ids, mask).pooled @ txt_proj.t())
        ref = (_feat(hf.get_image_features(pixel_values=images)), _feat(hf.get_text_features(input_ids=ids, attention_mask=mask.long())))
    _assert_same_embeddings(ours, ref)


def test_export_hf_refuses_what_clipmodel_cannot_hold(tmp_path: Path) -> None:
    vision = VisionTransformer("tiny", pool="mean", ln_pre=False)
    text = TextTransformer("tiny", causal=False, pool="first")
    with pytest.raises(ValueError) as err:
        export_hf(vision, text, torch.zeros(8, 32), torch.zeros(8, 32), 0.0, tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("pool='mean'", "ln_pre=False", "causal=False", "pool='first'"):
        assert part in msg
    text_eos2 = TextTransformer("tiny", pool="eos", eos_id=2)
    with pytest.raises(ValueError, match="legacy"):
        export_hf(VisionTransformer("tiny"), text_eos2, torch.zeros(8, 32), torch.zeros(8, 32), 0.0, tmp_path)


# -------------------------------------------------------------------- OpenAI / open_clip layout


@pytest.mark.parametrize("container", ["pt", "safetensors", "wrapped", "torchscript"])
def test_openai_layout_files_load_and_match(tmp_path: Path, quick_model, container: str) -> None:
    model, _ = quick_model
    openai_sd = _openai_layout(model.state_dict())
    extra = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(CTX), "vocab_size": torch.tensor(VOCAB)}
    path = tmp_path / f"clip.{'safetensors' if container == 'safetensors' else 'pt'}"
    if container == "pt":
        torch.save({**openai_sd, **extra}, path)
    elif container == "safetensors":
        save_file(openai_sd, str(path))
    elif container == "wrapped":  # an open_clip / DDP training checkpoint
        torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in openai_sd.items()}}, path)
    else:
        _save_torchscript({**openai_sd, **extra}, path)
    loaded = load_clip_state_dict(path)
    for key, value in openai_sd.items():
        assert torch.equal(loaded[key], value), key

    vision, text, extras = build_clip_towers(path, vision_heads=HEADS, text_heads=HEADS)  # act_layer defaults to quick_gelu
    assert extras["format"] == "openai" and text.pool == "argmax"
    images, ids = _inputs()
    _assert_same_embeddings(_lit_embeddings(vision, text, extras, images, ids), _hf_embeddings(model, images, ids))


def test_openai_conversion_infers_shapes_and_inverts(quick_model) -> None:
    model, _ = quick_model
    openai_sd = _openai_layout(model.state_dict())
    vk, tk, embed_dim, sd = convert_openai_to_lit(openai_sd, vision_heads=HEADS, text_heads=HEADS)
    assert (vk["image_size"], vk["patch_size"], vk["width"], vk["layers"], vk["mlp_ratio"]) == (32, 8, 40, 2, 4.0)
    assert (tk["vocab_size"], tk["context_length"], tk["width"], tk["layers"], tk["mlp_ratio"]) == (VOCAB, CTX, 32, 2, 1.5)
    assert embed_dim == EMBED and vk["act_layer"] == "quick_gelu"
    back = convert_lit_to_openai(sd)
    assert set(back) == set(openai_sd)
    for key, value in openai_sd.items():
        assert torch.equal(back[key], value), key
    with pytest.raises(ValueError, match="vision_heads"):  # width 40: OpenAI's width // 64 rule cannot apply
        convert_openai_to_lit(openai_sd)
    with pytest.raises(ValueError, match="ResNet"):
        convert_openai_to_lit({**openai_sd, "visual.layer1.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="visual.conv1.weight"):
        convert_openai_to_lit({k: v for k, v in openai_sd.items() if k != "visual.conv1.weight"})


def test_openai_gelu_weights_need_act_layer(tmp_path: Path) -> None:
    """open_clip checkpoints trained with GELU have OpenAI's layout: act_layer selects the activation."""
    model = _hf_model("gelu", seed=7)
    path = tmp_path / "gelu.safetensors"
    save_file(_openai_layout(model.state_dict()), str(path))
    images, ids = _inputs()
    ref = _hf_embeddings(model, images, ids)
    vision, text, extras = build_clip_towers(path, act_layer="gelu", vision_heads=HEADS, text_heads=HEADS)
    _assert_same_embeddings(_lit_embeddings(vision, text, extras, images, ids), ref)
    wrong = _lit_embeddings(*build_clip_towers(path, vision_heads=HEADS, text_heads=HEADS), images, ids)
    assert (wrong[0] - ref[0]).abs().max() > 1e-4  # QuickGELU on GELU weights is measurably off


def _save_torchscript(sd: dict[str, torch.Tensor], path: Path) -> None:
    """A TorchScript archive holding ``sd`` as nested module attributes, like OpenAI's .pt files."""

    class Node(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Node()
    for key, value in sd.items():
        *parents, leaf = key.split(".")
        node = root
        for name in parents:
            if not hasattr(node, name):
                node.add_module(name, Node())
            node = getattr(node, name)
        if value.is_floating_point():
            node.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
        else:
            node.register_buffer(leaf, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script: fine for writing a fixture
        torch.jit.script(root).save(str(path))


def test_torchscript_archive_is_read_without_running_it(tmp_path: Path) -> None:
    sd = {"visual.conv1.weight": torch.randn(4, 3, 2, 2), "visual.proj": torch.randn(4, 2).half(), "input_resolution": torch.tensor(224)}
    path = tmp_path / "ViT-X.pt"
    _save_torchscript(sd, path)
    with pytest.raises(RuntimeError, match="weights_only"), warnings.catch_warnings():  # why we need our own reader
        warnings.simplefilter("ignore", UserWarning)
        torch.load(path, weights_only=True)
    got = load_clip_state_dict(path)
    assert set(got) == set(sd) and got["visual.proj"].dtype == torch.float16
    assert all(torch.equal(got[k], v) for k, v in sd.items())


@dataclasses.dataclass
class _Opaque:
    value: int = 1


def test_unsafe_pickle_is_refused_with_advice(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"weight": torch.zeros(2), "cfg": _Opaque()}, path)
    with pytest.raises(ValueError, match="weights_only") as err:
        load_clip_state_dict(path)
    assert "torch.save" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError):
        load_clip_state_dict(tmp_path / "nope.pt")


def test_hf_weights_file_without_config_is_refused(tmp_path: Path, quick_model) -> None:
    model, path = quick_model
    with pytest.raises(ValueError, match="config.json"):
        build_clip_towers(path / "model.safetensors")


# ------------------------------------------------------------------------------ bad checkpoints


def test_wrong_shapes_give_one_paragraph_naming_keys_and_shapes(quick_model) -> None:
    _, path = quick_model
    vk, tk, embed_dim, sd, _ = convert_hf_to_lit(path)
    clip = CLIP(VisionTransformer(**{**vk, "image_size": 64}), TextTransformer(**{**tk, "context_length": 8}), embed_dim=embed_dim)
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        load_into(clip, sd)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("the checkpoint does not fit CLIP")
    assert "vision.positional_embedding: checkpoint [17, 40] vs model [65, 40]" in msg
    assert "text.positional_embedding: checkpoint [16, 32] vs model [8, 32]" in msg
    assert "2 shape mismatches" in msg and "interpolate_pos_embed" in msg
    assert all(torch.equal(v, before[k]) for k, v in clip.state_dict().items())  # nothing copied


def test_missing_and_unexpected_keys_are_named(quick_model) -> None:
    _, path = quick_model
    vk, tk, embed_dim, sd, _ = convert_hf_to_lit(path)
    sd = dict(sd)
    del sd["text.ln_final.bias"], sd["vision.transformer.blocks.1.attn.qkv.weight"]
    sd["visual.attn_pool.query"] = torch.zeros(1, 40)
    vision = VisionTransformer(**vk)
    with pytest.raises(CheckpointMismatchError) as err:
        load_into(vision, sd, prefix="vision.")
    msg = str(err.value)
    assert "\n" not in msg and "1 key missing from the checkpoint (transformer.blocks.1.attn.qkv.weight)" in msg
    assert "'vision.'" in msg and "unexpected" not in msg  # the foreign key lies outside the prefix

    clip = CLIP(VisionTransformer(**vk), TextTransformer(**tk), embed_dim=embed_dim)
    with pytest.raises(CheckpointMismatchError) as err:
        load_into(clip, sd)
    msg = str(err.value)
    assert "2 keys missing from the checkpoint (text.ln_final.bias, vision.transformer.blocks.1.attn.qkv.weight)" in msg
    assert "1 unexpected key in the checkpoint (visual.attn_pool.query)" in msg
    report = load_into(clip, sd, strict=False)
    assert report.missing == ["text.ln_final.bias", "vision.transformer.blocks.1.attn.qkv.weight"]
    assert report.unexpected == ["visual.attn_pool.query"]
    assert torch.equal(clip.text.ln_final.weight, sd["text.ln_final.weight"])


def test_preset_checks_the_checkpoint(quick_model) -> None:
    _, path = quick_model
    with pytest.raises(ValueError) as err:
        build_clip_towers(path, preset="ViT-B/32")
    msg = str(err.value)
    assert "not a ViT-B/32 CLIP" in msg and "vision image_size: checkpoint 32 vs preset 224" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="unknown CLIP preset"):
        build_clip_towers(path, preset="ViT-Q/3")


def test_config_json_written_by_export_is_plain_json(tmp_path: Path) -> None:
    vision, text = VisionTransformer("tiny", act_layer="quick_gelu"), TextTransformer("tiny", pool="argmax")
    export_hf(vision, text, nn.Linear(32, 8, bias=False), nn.Linear(32, 8, bias=False), torch.tensor(1.5), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["text_config"]["eos_token_id"] == 2  # HF's switch to argmax pooling
    assert cfg["vision_config"]["hidden_act"] == "quick_gelu" and cfg["projection_dim"] == 8
    vk, tk, embed_dim = hf_config_to_kwargs(cfg)
    assert tk["pool"] == "argmax" and vk["image_size"] == 32 and embed_dim == 8


def test_load_state_dict_entry_point_for_init_from(tmp_path: Path, quick_model) -> None:
    """``lit_vlm.interop.load_state_dict(source, model)``: what VLMModule's init_from calls."""
    model, path = quick_model
    vk, tk, embed_dim, _, _ = convert_hf_to_lit(path)
    clip = CLIP(VisionTransformer(**vk), TextTransformer(**tk), embed_dim=embed_dim)
    load_into(clip, load_state_dict(path, clip))  # strict: every key present, every shape right
    images, ids = _inputs()
    with torch.no_grad():
        ours = (clip.encode_image(images, normalize=False), clip.encode_text(ids, normalize=False))
    _assert_same_embeddings(ours, _hf_embeddings(model, images, ids))

    gelu_clip = CLIP(VisionTransformer(**{**vk, "act_layer": "gelu"}), TextTransformer(**{**tk, "pool": "eot"}), embed_dim=embed_dim)
    with pytest.raises(ValueError) as err:
        load_state_dict(path, gelu_clip)
    msg = str(err.value)
    assert "vision act_layer='gelu' but the checkpoint needs 'quick_gelu'" in msg and "text pool='eot'" in msg and "\n" not in msg

    file = tmp_path / "openai.pt"
    torch.save(_openai_layout(model.state_dict()), file)
    sd = load_state_dict(file, clip)
    load_into(clip, sd)
    with pytest.raises(ValueError, match="act_layer='gelu'"):
        load_state_dict(file, gelu_clip, act_layer="quick_gelu")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_state_dict("ViT-B-32", clip)


def test_unknown_open_clip_keys_are_named_by_build(tmp_path: Path, quick_model) -> None:
    model, _ = quick_model
    sd = _openai_layout(model.state_dict())
    sd["visual.attn_pool.query"] = torch.zeros(1, 40)  # an open_clip variant lit-vlm does not build
    del sd["ln_final.bias"]
    path = tmp_path / "variant.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointMismatchError) as err:
        build_clip_towers(path, vision_heads=HEADS, text_heads=HEADS)
    msg = str(err.value)
    assert "\n" not in msg and "CLIPTowers" in msg
    assert "1 key missing from the checkpoint (text.ln_final.bias)" in msg
    assert "1 unexpected key in the checkpoint (visual.attn_pool.query)" in msg


# ------------------------------------------------------------------ init_from: every file layout


def _tiny_clip(path: Path) -> CLIP:
    vk, tk, embed_dim, _, _ = convert_hf_to_lit(path)
    return CLIP(VisionTransformer(**vk), TextTransformer(**tk), embed_dim=embed_dim)


def _write_layout(layout: str, openai_sd: dict[str, torch.Tensor], folder: Path) -> Path:
    """One open_clip / OpenAI file as users have it on disk (key names from open_clip's docs)."""
    if layout == "state_dict.pt":  # torch.save(model.state_dict(), ...)
        torch.save(openai_sd, folder / layout)
    elif layout == "open_clip_pytorch_model.bin":  # the same, as published on model hubs
        torch.save(openai_sd, folder / layout)
    elif layout == "epoch_3.pt":  # open_clip's training checkpoint (DDP: module. prefixes)
        optimizer = {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(2)}},
                     "param_groups": [{"lr": 1e-3, "params": [0]}]}
        torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in openai_sd.items()},
                    "optimizer": optimizer}, folder / layout)
    elif layout == "model.safetensors":
        save_file(openai_sd, str(folder / layout))
    else:  # OpenAI's TorchScript archive
        _save_torchscript(openai_sd, folder / layout)
    return folder / layout


@pytest.mark.parametrize("layout", ["state_dict.pt", "open_clip_pytorch_model.bin", "epoch_3.pt", "model.safetensors", "ViT-openai.pt"])
def test_init_from_loads_every_open_clip_layout_exactly(tmp_path: Path, quick_model, layout: str) -> None:
    """Each file loads through ``init_from`` (the path ``lit-vlm fit`` takes) and gives the reference
    model's embeddings; the plain state dict shares ``logit_scale`` with lit-vlm's names, which
    once made it look like lit-vlm's own layout."""
    model, hf_dir = quick_model
    file = _write_layout(layout, _openai_layout(model.state_dict()), tmp_path)
    clip = _tiny_clip(hf_dir)
    clip.init_from = str(file)
    loaded = clip.load_initial_weights()
    assert sorted(loaded) == sorted(clip.state_dict())  # every tensor, strictly
    images, ids = _inputs()
    with torch.no_grad():
        ours = (clip.encode_image(images, normalize=False), clip.encode_text(ids, normalize=False))
    _assert_same_embeddings(ours, _hf_embeddings(model, images, ids))


def _open_clip_vit_b32_shapes() -> dict[str, tuple[int, ...]]:
    """open_clip ``CLIP`` (ViT-B-32) state-dict keys and shapes, from its documented architecture:
    image tower width 768, 12 blocks, patch 32 at 224 px (7x7 + 1 positions), text width 512,
    12 blocks, context 77, vocabulary 49408, joint width 512 (``attn_mask`` is not persistent)."""
    shapes: dict[str, tuple[int, ...]] = {
        "positional_embedding": (77, 512), "text_projection": (512, 512), "logit_scale": (),
        "visual.class_embedding": (768,), "visual.positional_embedding": (50, 768), "visual.proj": (768, 512),
        "visual.conv1.weight": (768, 3, 32, 32), "visual.ln_pre.weight": (768,), "visual.ln_pre.bias": (768,),
        "visual.ln_post.weight": (768,), "visual.ln_post.bias": (768,),
        "token_embedding.weight": (49408, 512), "ln_final.weight": (512,), "ln_final.bias": (512,),
    }
    for prefix, width in (("visual.transformer.resblocks", 768), ("transformer.resblocks", 512)):
        for i in range(12):
            block = {
                "ln_1.weight": (width,), "ln_1.bias": (width,), "ln_2.weight": (width,), "ln_2.bias": (width,),
                "attn.in_proj_weight": (3 * width, width), "attn.in_proj_bias": (3 * width,),
                "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
                "mlp.c_fc.weight": (4 * width, width), "mlp.c_fc.bias": (4 * width,),
                "mlp.c_proj.weight": (width, 4 * width), "mlp.c_proj.bias": (width,),
            }
            shapes.update({f"{prefix}.{i}.{k}": v for k, v in block.items()})
    return shapes


def test_init_from_loads_a_full_open_clip_vit_b32_checkpoint(tmp_path: Path) -> None:
    """The published ViT-B-32 key layout and shapes (half precision, to keep the file at 300 MB)
    fill the ``ViT-B-32`` preset's CLIP through ``init_from``, each tensor where open_clip has it."""
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g).mul_(0.02).half() for k, s in _open_clip_vit_b32_shapes().items()}
    assert sum(v.numel() for v in sd.values()) == pytest.approx(151.28e6, rel=1e-3)  # open_clip: 151,277,313
    file = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(sd, file)
    preset = CLIP_PRESETS["ViT-B-32"]
    clip = CLIP(VisionTransformer(preset["vision"], act_layer=preset["act_layer"]),
                TextTransformer(preset["text"], act_layer=preset["act_layer"], pool="argmax"),
                embed_dim=preset["embed_dim"], init_from=str(file))
    assert len(clip.load_initial_weights()) == len(clip.state_dict())
    own = clip.state_dict()
    assert torch.equal(own["vision.transformer.blocks.11.attn.qkv.weight"], sd["visual.transformer.resblocks.11.attn.in_proj_weight"].float())
    assert torch.equal(own["image_projection.weight"], sd["visual.proj"].float().t())
    assert torch.equal(own["text.transformer.blocks.0.mlp.fc2.bias"], sd["transformer.resblocks.0.mlp.c_proj.bias"].float())
    assert torch.equal(own["logit_scale"], sd["logit_scale"].float())


def test_init_from_that_does_not_fit_names_layout_keys_and_shapes(tmp_path: Path, quick_model) -> None:
    model, hf_dir = quick_model
    sd = _openai_layout(model.state_dict())
    sd["visual.attn_pool.query"] = torch.zeros(1, 40)  # a tower variant lit-vlm does not build
    del sd["ln_final.bias"]
    sd["text_projection"] = torch.zeros(32, 7)  # another joint width
    file = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, file)
    clip = _tiny_clip(hf_dir)
    clip.init_from = str(file)
    with pytest.raises(ValueError) as err:
        clip.load_initial_weights()
    msg = str(err.value)
    assert "\n" not in msg and "read as an OpenAI / open_clip state dict" in msg and "does not fit CLIP" in msg
    assert "1 key(s) missing from the checkpoint (text.ln_final.bias)" in msg
    assert "1 unexpected key(s) in the checkpoint (visual.attn_pool.query)" in msg
    assert "text_projection.weight: checkpoint [7, 32] vs model [24, 32]" in msg
