"""Bridges to frozen language models: conversation templates and their label masks, the LM wrapper
(exact logits, LoRA at zero, image splicing), checkpoints that hold only what trains and refuse
another LM, LLaVA's JSON read as it is, and a user's path through `lit-vlm fit` by paths alone (a
random `transformers` LM and a 20-record LLaVA file: LLaVA stage 1 then stage 2), beside the smoke
runs of the embedded LM's and LLaVA's tiny configs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from lit_vlm.datamodules.instructions import conversation, pope_questions
from lit_vlm.datamodules.templates import TEMPLATES, ConversationError, encode_conversation, prompt_ids
from lit_vlm.datamodules.tokenizer import Tokenizer
from lit_vlm.datamodules.world_text import train_tokenizer
from lit_vlm.errors import UserError
from lit_vlm.modules import VisionTransformer
from lit_vlm.modules.language_model import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    CausalLM,
    Seq2SeqLM,
    add_lora,
    load_language_model,
    splice_images,
    weights_fingerprint,
)

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_contrastive_family import DRIVER, scalars  # noqa: E402

TEXTS = ["A red circle is at the top.", "USER: Is there a star? ASSISTANT: no", "<|im_start|>user\nhi<|im_end|>\n",
         "Describe the image concisely. The image shows two objects: a blue square and a green star."]
TURNS = [{"from": "human", "value": "<image>\nWhat is at the top?"}, {"from": "gpt", "value": "A red circle."},
         {"from": "human", "value": "Is there a star?"}, {"from": "gpt", "value": "no"}]


def lm_folder(path: Path, seed: int = 0, width: int = 32) -> Path:
    """A random tiny LLaMA and a BPE tokenizer, saved as a Hugging Face model folder."""
    train_tokenizer(TEXTS * 4, 300, path)
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    transformers.LlamaForCausalLM(config).save_pretrained(str(path))
    return path


def t5_folder(path: Path, seed: int = 0, width: int = 32) -> Path:
    """A random tiny T5 (encoder-decoder) with the same kind of tokenizer, as a model folder."""
    train_tokenizer(TEXTS * 4, 300, path)
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=len(tok), d_model=width, d_kv=16, d_ff=2 * width, num_layers=2,
                                   num_decoder_layers=2, num_heads=2, decoder_start_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    transformers.T5ForConditionalGeneration(config).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    return lm_folder(tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    return t5_folder(tmp_path_factory.mktemp("t5"))


# ---- templates -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_labels_cover_the_answers_and_their_end_markers_only(name, lm_dir):
    tok = Tokenizer.from_pretrained(lm_dir)
    ids, labels = encode_conversation(TURNS, tok, name)
    assert len(ids) == len(labels) and ids[0] == tok.bos_id and ids.count(IMAGE_TOKEN_INDEX) == 1
    target = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert target == [lab for lab in labels if lab != IGNORE_INDEX]  # labels copy the ids where they count
    end = "</s>" if TEMPLATES[name].end == "{eos}" else "<|im_end|>\n"
    text = tok.backend.decode(target, skip_special_tokens=False)
    assert text.replace(" ", "") == f"A red circle.{end}no{end}".replace(" ", "")
    # what generation asks after the first turn is, token for token, what training put before the answer
    first_answer = labels.index(next(lab for lab in labels if lab != IGNORE_INDEX))
    assert prompt_ids(TURNS[0]["value"], tok, name) == ids[:first_answer]
    history = prompt_ids(TURNS[2]["value"], tok, name, history=TURNS[:2])
    assert history == ids[: len(history)] and labels[len(history)] != IGNORE_INDEX
    if name != "plain":  # plain (single-turn, stage 1) has no user text between an answer and the next
        assert labels[len(history) - 1] == IGNORE_INDEX
    if name == "plain":  # the instruction text is dropped: the image, then the answer
        assert ids[:2] == [tok.bos_id, IMAGE_TOKEN_INDEX]


@pytest.mark.parametrize("turns, images, reason", [
    (TURNS[:3], 1, "bad_roles"),
    ([TURNS[1], TURNS[0]], 1, "bad_roles"),
    ([TURNS[0], {"from": "gpt", "value": "  "}], 1, "empty_turn"),
    (TURNS, 0, "image_count"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image> no"}], 1, "image_count"),
])
def test_conversations_that_cannot_be_masked_are_refused_by_reason(turns, images, reason, lm_dir):
    with pytest.raises(ConversationError) as err:
        encode_conversation(turns, Tokenizer.from_pretrained(lm_dir), "chat", images)
    assert err.value.reason == reason


def test_truncation_that_leaves_no_answer_is_refused_not_masked(lm_dir):
    tok = Tokenizer.from_pretrained(lm_dir)
    ids, _ = encode_conversation(TURNS, tok, "chat")
    with pytest.raises(ConversationError, match="truncated_targets"):
        encode_conversation(TURNS, tok, "chat", max_length=ids.index(IMAGE_TOKEN_INDEX) + 3)


def test_world_instructions_and_pope_follow_their_scene():
    import numpy as np

    from lit_vlm.datamodules import synth

    scene = synth.make_scene(np.random.default_rng(3), synth.SynthConfig(), True)
    turns = conversation(scene, np.random.default_rng(0), [{"question": "how many objects are there?", "multiple_choice_answer": "2"}])
    assert turns[0]["from"] == "human" and "<image>" in turns[0]["value"] and "2" in [t["value"] for t in turns[1::2]]
    assert sum("<image>" in t["value"] for t in turns) == 1
    objects = [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "star"}]
    for kind in ("random", "popular", "adversarial"):
        qs = pope_questions(objects, np.random.default_rng(1), kind, popular=[("red", "circle"), ("green", "heart"), ("red", "star")])
        yes = {q["object"] for q in qs if q["label"] == "yes"}
        no = [q["object"] for q in qs if q["label"] == "no"]
        assert yes == {"red circle", "blue star"} and len(no) == 2 and not set(no) & yes
        if kind == "popular":
            assert no == ["green heart", "red star"]
        if kind == "adversarial":  # near misses: the colour or the shape of a present object
            assert all(o.split()[0] in ("red", "blue") or o.split()[1] in ("circle", "star") for o in no)


# ---- the language-model wrapper ------------------------------------------------------------------


def test_the_wrapper_without_images_gives_the_lms_own_logits_and_splices_images_in_place(lm_dir):
    lm = CausalLM.from_pretrained(lm_dir).eval()
    ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    own = lm.model(input_ids=ids, attention_mask=mask.long()).logits
    embeds, emask, _ = splice_images(lm.embed, ids, mask, None, torch.zeros(0, 3, lm.width))
    assert torch.equal(lm.forward_embeds(embeds, emask).logits[mask], own[mask])
    # an <image> becomes its S tokens, labelled IGNORE_INDEX; the rest keeps its order
    ids2 = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5, 6], [1, 7, 8, 0]])
    mask2 = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, 8, -100]])
    image = torch.randn(1, 3, lm.width)
    e, m, lab = splice_images(lm.embed, ids2, mask2, labels, image)
    assert e.shape[:2] == (2, 6) and m.sum(1).tolist() == [6, 3]
    assert torch.equal(e[0, 1:4], image[0]) and torch.equal(e[0, 4], lm.embed(ids2.clamp_min(0))[0, 2])
    assert lab.tolist() == [[-100, -100, -100, -100, 5, 6], [-100, 7, 8, -100, -100, -100]]
    with pytest.raises(ValueError, match="placeholders"):
        splice_images(lm.embed, ids2, mask2, labels, torch.randn(2, 3, lm.width))


def test_lora_at_initialisation_gives_identical_logits_and_trains_only_adapters(lm_dir):
    lm = CausalLM.from_pretrained(lm_dir).eval()
    ids = torch.tensor([[1, 5, 6, 7]])
    before = lm.model(input_ids=ids).logits
    lora = add_lora(lm.model, rank=4, alpha=8, dropout=0.0).eval()
    assert torch.equal(lora(input_ids=ids).logits, before)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_the_encoder_decoder_wrapper_gives_the_lms_own_logits_and_generates_as_transformers_does(t5_dir):
    lm = load_language_model(t5_dir).eval()
    assert isinstance(lm, Seq2SeqLM)
    enc = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    enc_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    dec = torch.tensor([[lm.decoder_start_id, 12, 13], [lm.decoder_start_id, 14, 15]])
    own = lm.model(input_ids=enc, attention_mask=enc_mask.long(), decoder_input_ids=dec).logits
    ours = lm(dec, None, context=lm.embed(enc), context_mask=enc_mask).logits
    assert torch.equal(ours, own)
    # decoding step by step with the cache (and beam search) gives what transformers' own generate gives
    tok = Tokenizer.from_pretrained(t5_dir)
    for options in ({"max_new_tokens": 6}, {"max_new_tokens": 6, "num_beams": 3}):
        suite = lm.generate_from_embeds(lm.embed(enc), enc_mask, eos_id=tok.eos_id, pad_id=tok.pad_id, **options)
        hf = lm.generate_from_embeds(lm.embed(enc), enc_mask, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                     generate_with="transformers", **options)
        assert suite.tolist() == hf[:, : suite.shape[1]].tolist(), options


def _blip2(lm: Path, **kwargs):
    from lit_vlm.models import BLIP2
    from lit_vlm.modules.qformer import QFormer

    torch.manual_seed(0)
    vision = VisionTransformer(image_size=16, patch_size=8, width=16, layers=1, heads=2)
    qformer = QFormer(image_width=16, vocab_size=300, num_queries=4, width=16, layers=2, heads=2)
    return BLIP2(vision=vision, qformer=qformer, stage=2, language_model=str(lm), **kwargs)


@pytest.mark.parametrize("family", ["blip2-t5", "blip2-llama", "clipcap", "llava"])
def test_bridges_generate_the_same_with_the_suite_and_with_transformers(family, lm_dir, t5_dir):
    if family == "llava":
        model = _llava(lm_dir)
    elif family == "clipcap":
        from lit_vlm.models import ClipCap

        torch.manual_seed(0)
        model = ClipCap(vision=VisionTransformer(image_size=16, patch_size=8, width=16, layers=1, heads=2),
                        language_model=str(lm_dir), prefix_length=3)
    else:
        model = _blip2(t5_dir if family == "blip2-t5" else lm_dir)
    images = torch.randn(3, 3, 16, 16)
    prompts = None if family != "llava" else ["What is at the top?", "Is there a star?", "hi"]
    suite = model.generate(images, prompts, max_new_tokens=5)
    model.generate_with = "transformers"
    assert model.generate(images, prompts, max_new_tokens=5) == suite
    assert len(suite) == 3 and all(isinstance(c, str) for c in suite)


def test_a_prefix_after_the_start_token_and_a_caption_ended_by_end_text(lm_dir):
    import torch.nn.functional as F

    from lit_vlm.models import Frozen

    torch.manual_seed(0)
    model = Frozen(vision=VisionTransformer(image_size=16, patch_size=8, width=16, layers=1, heads=2),
                   language_model=str(lm_dir), prefix_length=3, prefix_after_bos=True, end_text="\n").eval()
    tok = Tokenizer.from_pretrained(lm_dir)
    ids, mask = tok.encode(["A red circle is at the top."], 16)
    prefix, _ = model.prefix(torch.randn(1, 3, 16, 16))  # [1, 3, D]
    loss = model.prefix_caption_loss(prefix, None, ids, mask)
    newline = tok.backend.encode("\n", add_special_tokens=False).ids
    assert model.end_id == newline[0] and len(newline) == 1
    target = ids[0, mask[0]].clone()
    target[-1] = newline[0]  # the caption ends with end_text in place of </s>
    embeds = torch.cat([model.lm.embed(target[:1]), prefix[0], model.lm.embed(target[1:])])[None]  # [bos, prefix, text]
    logits = model.lm.model(inputs_embeds=embeds).logits[0]  # [1 + 3 + n - 1, V]
    assert torch.allclose(loss, F.cross_entropy(logits[3:-1], target[1:]), atol=1e-6)
    captions = model.generate(torch.randn(2, 3, 16, 16), max_new_tokens=6)
    assert len(captions) == 2 and not any("\n" in c for c in captions)
    with pytest.raises(UserError, match="must be one"):
        Frozen(vision=VisionTransformer(image_size=16, patch_size=8, width=16, layers=1, heads=2),
               language_model=str(lm_dir), end_text="two words").end_id


def test_blip2_with_an_encoder_decoder_splits_the_caption_between_encoder_and_decoder(t5_dir):
    model = _blip2(t5_dir, caption_ratio=0.0)
    tok = Tokenizer.from_pretrained(t5_dir)
    ids, mask = tok.encode(["A red circle is at the top.", "no"], 16)
    calls = []
    forward = model.lm.forward
    model.lm.forward = lambda dec, dmask, context, context_mask: calls.append((dec, dmask, context_mask)) or forward(
        dec, dmask, context=context, context_mask=context_mask)
    batch = {"image": torch.randn(2, 3, 16, 16), "text_ids": ids, "text_mask": mask}
    model.train()
    torch.manual_seed(3)
    loss = model(batch)["loss"]
    dec, dmask, cmask = calls[-1]
    text = [ids[b, mask[b]][1:-1].tolist() for b in range(2)]  # without bos and eos
    k = [int(cmask[b].sum()) - 4 for b in range(2)]  # encoder: 4 queries, then the caption's first k tokens
    assert all(1 <= k[b] < len(text[b]) for b in range(2))  # caption_ratio 0: every caption splits inside
    for b in range(2):
        assert dec[b, dmask[b]].tolist() == [model.lm.decoder_start_id, *text[b][k[b]:], tok.eos_id]
    assert torch.isfinite(loss)
    model.eval()  # evaluation: the whole caption is the target
    model(batch)
    dec, dmask, cmask = calls[-1]
    assert cmask.sum(1).tolist() == [4, 4] and dec[0, dmask[0]].tolist() == [model.lm.decoder_start_id, *text[0], tok.eos_id]


def test_a_missing_language_model_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="no config.json there"):
        CausalLM.from_pretrained(tmp_path / "nowhere")


def _llava(lm: Path, **kwargs):
    from lit_vlm.models import LLaVA

    torch.manual_seed(0)
    vision = VisionTransformer(image_size=16, patch_size=8, width=16, layers=2, heads=2)
    return LLaVA(vision=vision, language_model=str(lm), template="chat", **kwargs)


def _chat_batch(lm: Path) -> dict:
    tok = Tokenizer.from_pretrained(lm)
    rows = [encode_conversation(TURNS, tok, "chat"), encode_conversation(TURNS[2:], tok, "chat", num_images=0)]
    L = max(len(r[0]) for r in rows)
    ids = torch.tensor([r[0] + [tok.pad_id] * (L - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [IGNORE_INDEX] * (L - len(r[1])) for r in rows])
    mask = torch.tensor([[1] * len(r[0]) + [0] * (L - len(r[0])) for r in rows], dtype=torch.bool)
    return {"image": torch.randn(2, 3, 16, 16), "has_image": torch.tensor([True, False]), "chat_ids": ids,
            "chat_labels": labels, "chat_mask": mask}


def test_a_bridge_checkpoint_holds_what_trains_reloads_exactly_and_refuses_another_lm(lm_dir, tmp_path):
    model = _llava(lm_dir, train_lm="lora", lora={"rank": 2})
    with torch.no_grad():  # adapters away from zero, so that they matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    batch = _chat_batch(lm_dir)
    model.eval()
    loss = model(batch)["loss"]
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    kept = checkpoint["state_dict"]
    assert not [k for k in kept if k.startswith("lm.") and "lora_" not in k]  # the LM's own weights stay in its folder
    lm_bytes = sum(t.numel() * t.element_size() for t in model.lm.model.base_model.model.state_dict().values())
    lm_kept = sum(t.numel() * t.element_size() for k, t in kept.items() if k.startswith("lm."))
    assert lm_kept < lm_bytes / 4 and checkpoint["language_model"]["fingerprint"] == weights_fingerprint(
        CausalLM.from_pretrained(lm_dir).model)
    again = _llava(lm_dir, train_lm="lora", lora={"rank": 2})
    again.on_load_checkpoint(checkpoint)
    again.load_state_dict(checkpoint["state_dict"])  # strict: every key accounted for
    assert torch.equal(again.eval()(batch)["loss"], loss)
    other = _llava(lm_folder(tmp_path / "other", seed=1), train_lm="lora", lora={"rank": 2})
    with pytest.raises(UserError, match="other weights"):
        other.on_load_checkpoint({"state_dict": dict(kept), "language_model": checkpoint["language_model"]})


def test_llava_generates_through_its_template_with_and_without_cache(lm_dir):
    model = _llava(lm_dir, generation={"max_new_tokens": 4})
    images = torch.randn(2, 3, 16, 16)
    cached = model.generate(images, ["What is at the top?", "Is there a star?"])
    assert len(cached) == 2 and all(isinstance(a, str) for a in cached)
    assert model.generate(images, ["What is at the top?", "Is there a star?"], use_cache=False) == cached
    beams = model.generate(images, ["What is at the top?", "Is there a star?"], num_beams=2)
    assert len(beams) == 2 and all(isinstance(a, str) for a in beams)


# ---- LLaVA's JSON and the user's path ------------------------------------------------------------


def llava_json(folder: Path, n: int = 20) -> Path:
    """``n`` LLaVA records with images (some text-only), plus four that must be left out."""
    (folder / "images" / "coco").mkdir(parents=True)
    records = []
    for i in range(n):
        colour = ("red", "blue", "green", "white")[i % 4]
        if i % 7 == 6:  # text-only, as LLaVA's mixture has
            records.append({"id": f"t{i}", "conversations": [{"from": "human", "value": "Say a colour."},
                                                             {"from": "gpt", "value": colour}]})
            continue
        Image.new("RGB", (24 + i, 20), colour).save(folder / "images" / "coco" / f"{i}.jpg")
        records.append({"id": f"r{i}", "image": f"coco/{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the picture?"}, {"from": "gpt", "value": colour},
            {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": f"A {colour} picture."}]})
    records += [
        {"id": "bad-roles", "image": "coco/0.jpg", "conversations": [{"from": "gpt", "value": "hi"}]},
        {"id": "no-image-token", "image": "coco/1.jpg", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]},
        {"id": "outside", "image": "../secret.jpg", "conversations": TURNS[:2]},
        {"id": "missing", "image": "coco/none.jpg", "conversations": TURNS[:2]},
    ]
    path = folder / "llava.json"
    path.write_text(json.dumps(records))
    return path


def test_llava_json_converts_with_bad_records_left_out_and_counted(tmp_path):
    from lit_vlm.datamodules.conversations import convert_llava

    path = llava_json(tmp_path)
    report = convert_llava(path, tmp_path / "images", tmp_path / "shards", progress=False)
    assert report.samples == {"train": 20}
    assert len(report.malformed) == 2 and report.outside_images == ["../secret.jpg"] and report.missing_images == ["coco/none.jpg"]
    assert "2 text-only records" in " ".join(report.notes)


def test_a_users_lm_and_llava_json_train_llava_stage_1_and_2_by_paths_alone(tmp_path):
    """The user's path, unchanged: a random `transformers` LM folder (and a T5 one) and a LLaVA JSON
    with images; stage 1 (plain template, projector only) and stage 2 (chat template, LoRA, from
    stage 1) through `lit-vlm fit`, BLIP-2 stage 2 on both LMs; beside them, the embedded LM's tiny
    config and every bridge's tiny config on it."""
    lm, t5 = lm_folder(tmp_path / "my-lm"), t5_folder(tmp_path / "my-t5")
    data = llava_json(tmp_path)
    common = ["--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
              "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
              "--trainer.logger.init_args.save_dir", "runs", "--trainer.log_every_n_steps", "1",
              "--data", "lit_vlm.datamodules.ConversationDataModule", "--data.init_args.llava_json", str(data),
              "--data.init_args.image_folder", str(tmp_path / "images"), "--data.init_args.image_size", "16",
              "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0", "--data.init_args.pad_square", "true",
              "--model", "lit_vlm.models.LLaVA", "--model.init_args.vision", "lit_vlm.modules.VisionTransformer",
              "--model.init_args.vision.init_args.image_size", "16", "--model.init_args.vision.init_args.patch_size", "8",
              "--model.init_args.vision.init_args.width", "16", "--model.init_args.vision.init_args.layers", "2",
              "--model.init_args.vision.init_args.heads", "2", "--model.init_args.language_model", str(lm)]
    tiny = ["--data.init_args.root", str(tmp_path / "world"), "--trainer.enable_progress_bar", "false",
            "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1"]
    runs = [
        ["fit", *common, "--data.init_args.template", "plain", "--trainer.logger.init_args.name", "stage1"],
        ["fit", *common, "--data.init_args.template", "chat", "--trainer.logger.init_args.name", "stage2",
         "--model.init_args.init_from", "runs/stage1", "--model.init_args.init_from_parts", "[vision, projector]",
         "--model.init_args.train_lm", "lora"],
        ["fit", "--config", str(ROOT / "configs" / "lm" / "tiny.yaml"), "--data.init_args.num_train", "32",
         "--trainer.enable_progress_bar", "false"],
        ["lm", "merge", "runs/stage2/version_0/adapter", "--out", "merged"],
        # BLIP-2 stage 2 on the same user's files (the converted LLaVA shards read as image-text pairs),
        # with the user's decoder-only LM and with an encoder-decoder one (a T5 folder)
        *[["fit", "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
           "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger", "--trainer.logger.init_args.save_dir",
           "runs", "--trainer.logger.init_args.name", name, "--trainer.log_every_n_steps", "1",
           "--data", "lit_vlm.datamodules.ImageTextDataModule",
           "--data.init_args.root", "data/llava/llava", "--data.init_args.synthesize", "false", "--data.init_args.image_size", "16",
           "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0", "--model", "lit_vlm.models.BLIP2",
           "--model.init_args.stage", "2", "--model.init_args.language_model", str(folder),
           "--model.init_args.vision", "lit_vlm.modules.VisionTransformer", "--model.init_args.vision.init_args.image_size", "16",
           "--model.init_args.vision.init_args.patch_size", "8", "--model.init_args.vision.init_args.width", "16",
           "--model.init_args.vision.init_args.layers", "1", "--model.init_args.vision.init_args.heads", "2",
           "--model.init_args.qformer", "lit_vlm.modules.QFormer", "--model.init_args.qformer.init_args.image_width", "16",
           "--model.init_args.qformer.init_args.num_queries", "4", "--model.init_args.qformer.init_args.width", "16",
           "--model.init_args.qformer.init_args.layers", "2", "--model.init_args.qformer.init_args.heads", "2"]
          for name, folder in (("blip2-user", lm), ("blip2-user-t5", t5))],
    ]
    for family in ("llava/tiny", "blip2/tiny", "blip2/tiny-stage2", "clipcap/tiny", "frozen/tiny", "flamingo/tiny"):
        cfg = ["--config", str(ROOT / "configs" / f"{family}.yaml"), *tiny]
        if family == "flamingo/tiny":  # documents beside the tiny world's pairs; few-shot on that world
            cfg = ["--config", str(ROOT / "configs" / f"{family}.yaml"), *tiny[2:],
                   "--data.init_args.train_mix.pairs.shards", str(tmp_path / "world" / "train"),
                   "--trainer.callbacks.init_args.root", str(tmp_path / "world")]
        runs += [["fit", *cfg, "--trainer.limit_train_batches", "2"], ["test", *cfg, "--ckpt_path", "best"]]
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = scalars(tmp_path / "runs/stage1/version_0"), scalars(tmp_path / "runs/stage2/version_0")
    assert math.isfinite(one["train/loss"]) and math.isfinite(two["train/loss"])
    assert one["params/lm_trainable"] == 0 and 0 < two["params/lm_trainable"] < two["params/lm_total"]
    fit = json.loads((tmp_path / "runs/stage2/version_0/fit.json").read_text())
    assert fit["data"]["train"]["skipped"] == 0  # the conversion left the bad records out
    assert (tmp_path / "runs/stage2/version_0/adapter/adapter_config.json").is_file()
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert merged.config.vocab_size == transformers.AutoConfig.from_pretrained(str(lm)).vocab_size
    world_lm = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "models/world-lm-tiny"))
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "models/world-lm-tiny")).pad_token == "<pad>"
    assert world_lm.config.model_type == "llama" and "val/perplexity" in scalars(next((tmp_path / "runs/lm-tiny").glob("version_*")))
    assert math.isfinite(scalars(tmp_path / "runs/blip2-user/version_0")["train/lm_loss"])
    assert math.isfinite(scalars(tmp_path / "runs/blip2-user-t5/version_0")["train/lm_loss"])

    def results(name: str) -> dict:
        return json.loads((tmp_path / f"runs/{name}/version_1/results.json").read_text())["metrics"]

    assert {"test/caption/CIDEr", "test/vqa/overall", "test/vqa/baseline/overall", "test/pope/adversarial/f1",
            "test/pope/all/yes_ratio"} <= set(results("llava-tiny"))
    assert {"test/retrieval/mean_R@1", "test/retrieval/rerank/mean_R@1", "test/caption/CIDEr", "test/itm_loss"} <= set(results("blip2-tiny"))
    for name in ("blip2-tiny-stage2", "clipcap-tiny", "frozen-tiny"):
        assert {"test/caption/CIDEr", "test/caption/baseline/CIDEr"} <= set(results(name)), name
    flamingo = results("flamingo-tiny")
    for task, metric in (("captioning", "CIDEr"), ("vqa", "accuracy"), ("classification", "top1")):
        for method in ("random", "rices"):
            assert {f"test/fewshot/{task}/{method}/{k}shot/{metric}{s}" for k in (0, 2) for s in ("", "_std")} <= set(flamingo)
    assert math.isfinite(scalars(tmp_path / "runs/flamingo-tiny/version_0")["train/docs/loss"])
    assert "gates/layer1_attn" in scalars(tmp_path / "runs/flamingo-tiny/version_0")


# ---- BLIP-2 and POPE ---------------------------------------------------------------------------------


def test_qformer_masks_say_which_token_sees_which():
    from lit_vlm.modules.qformer import QFormer

    text = torch.tensor([[True, True, False]])  # two real text tokens, one pad; 2 queries before them
    itc, itm, itg = (QFormer.mask(t, 2, text)[0, 0].int().tolist() for t in ("itc", "itm", "itg"))
    # rows: queries q0 q1, text t0 t1 pad; columns the keys
    assert itc == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert itm == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert itg == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_a_qformer_started_from_bert_reads_text_as_the_bert_does(tmp_path):
    from lit_vlm.modules.qformer import QFormer

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=300, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(str(tmp_path / "bert"))
    bert = transformers.BertModel.from_pretrained(str(tmp_path / "bert"), add_pooling_layer=False).eval()
    qformer = QFormer(image_width=8, vocab_size=300, num_queries=3, width=16, layers=2, heads=2, context_length=16,
                      norm="post", bert=str(tmp_path / "bert")).eval()
    ids = torch.randint(0, 300, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    _, text = qformer(None, ids, mask, task="itc", with_queries=False)  # [2, 7, 16]
    own = bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert torch.allclose(text[mask], own[mask], atol=1e-5)
    queries, _ = qformer(torch.randn(2, 5, 8), task="itc")  # the queries read the image through new cross-attention
    assert queries.shape == (2, 3, 16) and torch.isfinite(queries).all()
    with pytest.raises(UserError, match="hidden_size 16 .Q-Former: 32."):
        QFormer(image_width=8, vocab_size=300, width=32, layers=2, heads=2, norm="post", bert=str(tmp_path / "bert"))
    with pytest.raises(UserError, match="norm: post"):
        QFormer(image_width=8, vocab_size=300, width=16, layers=2, heads=2, bert=str(tmp_path / "bert"))


def test_blip2_itc_takes_the_best_query_per_pair():
    from lit_vlm.losses import blip2_itc_loss

    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-1.0, 0.0]]])  # [B=2, Q=2, E=2]
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # [B, E]
    out = blip2_itc_loss(q, t, 0.5, gather=False)
    sim = torch.tensor([[1.0, 1.0], [0.6, 0.8]]) / 0.5  # image b, text n: max over queries
    assert torch.allclose(out["sim_i2t"], sim) and torch.allclose(out["sim_t2i"], sim.T)
    expected = (torch.nn.functional.cross_entropy(sim, torch.arange(2)) + torch.nn.functional.cross_entropy(sim.T, torch.arange(2))) / 2
    assert torch.allclose(out["itc_loss"], expected)


def test_pope_reads_yes_no_and_scores_by_hand():
    from lit_vlm.callbacks.pope import pope_metrics, read_yes_no

    assert [read_yes_no(a) for a in ("Yes", "no", "No, there is not.", "There is not a star", "yes. no")] == [
        "yes", "no", "no", "no", "yes"]
    m = pope_metrics(["yes", "yes", "no", "no"], ["yes", "no", "yes", "yes"])
    assert m["accuracy"] == 0.25 and m["precision"] == 1 / 3 and m["recall"] == 0.5 and m["yes_ratio"] == 0.75
    assert abs(m["f1"] - 0.4) < 1e-12


def test_llava_pools_the_patch_grid_and_selects_features(lm_dir):
    model = _llava(lm_dir, pool_grid=1, vision_features="cls_patch", vision_layer=-1)
    images = torch.randn(2, 3, 16, 16)
    tokens = model.image_tokens(images)
    assert tokens.shape == (2, 2, model.lm.width)  # class token + the 2 x 2 patch grid pooled to one
    hidden = model.vision(images, output_hidden_states=True).hidden_states[-1]  # [2, 1 + 4, 16]
    expected = model.projector(torch.stack([hidden[:, 0], hidden[:, 1:].mean(1)], dim=1))
    assert torch.allclose(tokens, expected, atol=1e-6)
    assert _llava(lm_dir).image_tokens(images).shape == (2, 4, model.lm.width)  # penultimate layer, every patch
    with pytest.raises(UserError, match="vision_layer: -1"):
        from lit_vlm.models import LLaVA
        from lit_vlm.modules import ConvNet

        LLaVA(vision=ConvNet(channels=[8], strides=[2]), language_model=str(lm_dir))


def test_the_lms_trainables_get_their_own_learning_rate(lm_dir):
    from lit_vlm.optim import param_groups

    model = _llava(lm_dir, train_lm="lora", lora={"rank": 2}, lm_lr=1e-2)
    groups = param_groups(model, 0.1, model.group_lrs())
    by_lr = {}
    for g in groups:
        for p in g["params"]:
            by_lr[id(p)] = g.get("lr")
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i, lr in by_lr.items() if lr == 1e-2} == {n for n, p in model.named_parameters() if "lora_" in n}
    assert all(by_lr[id(p)] is None for p in model.projector.parameters())  # the family's lr


def _blip2_itc_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    q = torch.nn.functional.normalize(torch.randn(6, 3, 4, generator=g), dim=-1)  # global batch 6, 3 queries
    t = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1)
    return q, t


def blip2_itc_rank(rank: int, world: int) -> dict:
    """Run on each rank by tests/ddp_loss_worker.py: this rank's third of the batch, negatives gathered."""
    from lit_vlm.losses import blip2_itc_loss

    q, t = _blip2_itc_inputs()
    rows = slice(rank * 6 // world, (rank + 1) * 6 // world)
    out = blip2_itc_loss(q[rows], t[rows], 0.1)
    return {"loss": out["itc_loss"].detach(), "sim_i2t": out["sim_i2t"].detach()}


@pytest.mark.ddp
def test_blip2_itc_over_two_ranks_equals_one_process(tmp_path):
    from test_ddp_contrastive import run_workers

    from lit_vlm.losses import blip2_itc_loss

    ranks = run_workers("test_bridges:blip2_itc_rank", tmp_path)
    q, t = _blip2_itc_inputs()
    whole = blip2_itc_loss(q, t, 0.1, gather=False)
    assert torch.allclose(torch.stack([r["loss"] for r in ranks]).mean(), whole["itc_loss"], atol=1e-6)
    assert torch.allclose(torch.cat([r["sim_i2t"] for r in ranks]), whole["sim_i2t"], atol=1e-6)
    half = blip2_itc_loss(q[:3], t[:3], 0.1, gather=False)["itc_loss"]  # what a rank alone would compute
    assert abs(half - whole["itc_loss"]) > 1e-3
