"""The generative and fusion families: CoCa (and the shared generate capability), with the captioning
callback's nearest-neighbour baseline and a smoke run of every tiny config through the CLI."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_vlm.callbacks.captioning import consensus_caption
from lit_vlm.losses import caption_loss, global_token_mean
from lit_vlm.models import CoCa
from lit_vlm.modules import ConvNet, TextDecoder, VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_contrastive_family import DRIVER, grads, make_batch, scalars, split  # noqa: E402

VOCAB, CTX = 50, 8


def make_coca(seed: int = 0, **kwargs) -> CoCa:
    torch.manual_seed(seed)
    vision = VisionTransformer("tiny")
    decoder = TextDecoder(VOCAB, CTX + 4, width=32, layers=3, heads=2, cross_attention_layers=2)
    return CoCa(vision, decoder, embed_dim=16, caption_queries=4, pooler_heads=2, tokenizer="synth", **kwargs)


# ---- losses ------------------------------------------------------------------------------------
def test_caption_loss_is_the_token_mean_of_shifted_targets():
    """Position t predicts token t+1; padding and the start token are never targets."""
    logits = torch.randn(2, 4, 6)
    ids = torch.tensor([[2, 5, 3, 0], [2, 4, 1, 3]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    sums, counts = caption_loss(logits, ids, mask)
    assert counts.tolist() == [2.0, 3.0]
    lp = logits.log_softmax(-1)
    want0 = -(lp[0, 0, 5] + lp[0, 1, 3])
    want1 = -(lp[1, 0, 4] + lp[1, 1, 1] + lp[1, 2, 3])
    torch.testing.assert_close(sums, torch.stack([want0, want1]))
    torch.testing.assert_close(global_token_mean(sums, counts), (want0 + want1) / 5)
    # a loss mask keeps only the answer part (e.g. a VQA answer after its question)
    only_last = torch.tensor([[0, 0, 1, 0], [0, 0, 0, 1]]).bool()
    sums, counts = caption_loss(logits, ids, mask, loss_mask=only_last)
    assert counts.tolist() == [1.0, 1.0]
    torch.testing.assert_close(sums, torch.stack([-lp[0, 1, 3], -lp[1, 2, 3]]))


def test_consensus_caption_picks_the_one_that_agrees_most():
    cands = ["a red circle", "a blue star on the left", "a red circle on the left", "one red circle"]
    assert consensus_caption(cands) == "a red circle on the left"
    assert consensus_caption(["only"]) == "only"
    assert consensus_caption(["x y", "x y"]) == "x y"


# ---- CoCa ------------------------------------------------------------------------------------------
def test_coca_training_logits_equal_the_generation_decoder():
    """The staged training pass (unimodal layers with the CLS token appended, then multimodal
    layers) gives the logits the plain decoder gives when generating: the CLS token is invisible to
    the caption positions; the text embedding does not depend on the padding."""
    model = make_coca().eval()
    batch = make_batch(3)
    batch["text_ids"][:, 0] = 2
    image_emb, context = model._image(batch["image"])
    ids, mask = batch["text_ids"], batch["text_mask"]
    _, states, attn = model._unimodal(ids, mask)
    dec = model.decoder
    x, _ = dec.run_blocks(states, attn, dec.context_kv(context), start=dec.num_unimodal_layers)
    _, staged = dec.head(x)
    plain = dec(ids, mask, context=context).logits
    torch.testing.assert_close(staged[mask], plain[mask])
    # the text embedding ignores what lies in the padding, and extra padding columns
    noisy = ids.clone()
    noisy[~mask] = 7
    wide = torch.cat([ids, torch.zeros(3, 2, dtype=torch.long)], 1)
    wide_mask = torch.cat([mask, torch.zeros(3, 2, dtype=torch.bool)], 1)
    e = model.encode_text(ids, mask)
    torch.testing.assert_close(model.encode_text(noisy, mask), e)
    torch.testing.assert_close(model.encode_text(wide, wide_mask), e)


def test_coca_loss_weights_and_terms():
    model = make_coca(contrastive_weight=1.0, caption_weight=2.0).train()
    terms = model(make_batch(4))
    assert set(terms) >= {"loss", "contrastive_loss", "caption_loss", "acc_i2t", "acc_t2i", "logit_scale"}
    torch.testing.assert_close(terms["loss"], terms["contrastive_loss"] + 2 * terms["caption_loss"])
    only_cap = make_coca(contrastive_weight=0.0, caption_weight=1.0).train()
    t = only_cap(make_batch(4))
    torch.testing.assert_close(t["loss"], t["caption_loss"])
    with pytest.raises(ValueError, match="cross_attention_layers"):
        CoCa(VisionTransformer("tiny"), TextDecoder(VOCAB, CTX, width=32, layers=2, heads=2), pooler_heads=2)
    with pytest.raises(ValueError, match="caption_weight"):
        make_coca(contrastive_weight=0.0, caption_weight=0.0)
    with pytest.raises(ValueError, match="num_beam"):
        make_coca(generation={"num_beam": 3})


def qa_batch(n: int) -> dict:
    batch = make_batch(n)
    batch["text_ids"][:, 0] = 2
    g = torch.Generator().manual_seed(5)
    batch["qa_ids"] = torch.randint(5, VOCAB, (n - 1, CTX), generator=g)
    batch["qa_ids"][:, 0] = 2
    batch["qa_mask"] = torch.ones(n - 1, CTX, dtype=torch.bool)
    batch["qa_answer_mask"] = torch.zeros(n - 1, CTX, dtype=torch.bool)
    batch["qa_answer_mask"][:, -2:] = True
    batch["qa_owner"] = torch.arange(1, n)
    return batch


def test_question_answering_loss_in_coca_and_prefixlm():
    """With question-answer rows in the batch, CoCa and PrefixLM add a loss on the answer tokens."""
    batch = qa_batch(4)
    coca = make_coca().train()
    t = coca(batch)
    torch.testing.assert_close(t["loss"], t["contrastive_loss"] + 2 * t["caption_loss"] + t["vqa_loss"])
    # the answer loss only depends on the answer tokens' predictions: changing a question token changes it,
    # changing nothing in the answer part's targets keeps the token count
    sums, counts = caption_loss(coca.decoder(batch["qa_ids"], context=coca._image(batch["image"])[1][batch["qa_owner"]]).logits,
                                batch["qa_ids"], batch["qa_mask"], loss_mask=batch["qa_answer_mask"])
    assert counts.tolist() == [2.0, 2.0, 2.0]
    torch.testing.assert_close(t["vqa_loss"], sums.sum() / counts.sum())
    plm = make_prefixlm().train()
    t = plm(batch)
    assert "vqa_loss" in t
    torch.testing.assert_close(t["loss"], t["caption_loss"] + t["vqa_loss"])


def test_coca_accumulated_gradients_equal_one_large_batch():
    """accum_freq=2: the contrastive term sees the whole group and the caption term is the token
    mean over the whole group, so the gradients equal one batch twice as large."""
    model = make_coca(accum_freq=2).train()
    batch = make_batch(8)
    model(batch)["loss"].backward()
    want = grads(model)
    model.zero_grad()
    model.accumulated_backward(split(batch, 2), backward=torch.Tensor.backward)
    got = grads(model)
    assert set(got) == set(want) and "cls_embedding" in got
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_coca_generate_returns_text_with_and_without_cache():
    # tie the decoder to the synthetic vocabulary so that ids decode to words
    from lit_vlm.datamodules.tokenizer import Tokenizer

    tok = Tokenizer.synthetic()
    torch.manual_seed(0)
    vision = VisionTransformer("tiny")
    decoder = TextDecoder(tok.vocab_size, 24, width=32, layers=2, heads=2, cross_attention_layers=1)
    model = CoCa(vision, decoder, embed_dim=16, caption_queries=4, pooler_heads=2, tokenizer="synth",
                 generation={"num_beams": 2, "max_new_tokens": 6})
    images = torch.randn(3, 3, 32, 32)
    texts = model.generate(images)
    assert len(texts) == 3 and all(isinstance(t, str) and t for t in texts)
    assert model.generate(images, use_cache=False) == texts
    assert model.generate(images, num_beams=1) == model.generate(images, num_beams=1, use_cache=False)
    prompted = model.generate(images, ["what colour is the circle ?"] * 3, max_new_tokens=3)
    assert all(len(t.split()) <= 3 for t in prompted)
    assert model.training  # generate restores the mode
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        model.generate(images, ["a", "b"])


def test_cli_fills_the_tokenizer_from_the_data(tmp_path):
    from jsonargparse import Namespace

    from lit_vlm.cli import _data_values

    values = _data_values(Namespace(class_path="lit_vlm.datamodules.ImageTextDataModule",
                                    init_args=Namespace(root=str(tmp_path / "w"))))
    assert values["tokenizer"] == "synth"


# ---- smoke runs through the CLI -------------------------------------------------------------------
@pytest.mark.slow
def test_every_generative_tiny_config_fits_and_tests_through_the_cli(tmp_path):
    """fit (2 batches) then test --ckpt_path best for every generative family's tiny config, with
    captioning (and the nearest-neighbour baseline) evaluated on the test split."""
    common = ["--data.init_args.root", str(tmp_path / "world"), "--trainer.enable_progress_bar", "false",
              "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "2"]
    families = ("coca", "blip", "mae", "prefixlm", "flava")
    runs = []
    for family in families:
        cfg = ["--config", str(ROOT / "configs" / family / "tiny.yaml"), *common]
        runs += [["fit", *cfg, "--trainer.limit_train_batches", "2"], ["test", *cfg, "--ckpt_path", "best"]]
    # BLIP's second stage: the captioning fine-tune (ITC and ITM off) starting from the pre-trained run
    runs.append(["fit", "--config", str(ROOT / "configs" / "blip" / "tiny.yaml"), *common, "--trainer.limit_train_batches", "2",
                 "--trainer.logger.init_args.name", "blip-tiny-finetune", "--model.init_args.init_from", "runs/blip-tiny",
                 "--model.init_args.itc_weight", "0", "--model.init_args.itm_weight", "0"])
    runs.append(["data", "capfilt", "--model", "runs/blip-tiny", "--root", str(tmp_path / "world"), "--out", "capfilt",
                 "--limit", "20", "--batch-size", "8", "--shard-size", "8", "--max-new-tokens", "6", "--threshold", "0.0",
                 "--context-length", "32", "--quiet"])
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for family in families:
        if family in ("mae", "flava"):
            continue
        metrics = json.loads((tmp_path / "runs" / f"{family}-tiny" / "version_1" / "results.json").read_text())["metrics"]
        assert {"test/caption/CIDEr", "test/caption/baseline/CIDEr", "test/caption/num_samples"} <= set(metrics), family
        assert metrics["test/caption/num_samples"] == 20
        assert all(math.isfinite(v) for v in metrics.values()), family
        fit = scalars(tmp_path / "runs" / f"{family}-tiny" / "version_0")
        assert "val/caption/CIDEr" in fit and math.isfinite(fit["train/loss"]), family
        preds = json.loads((tmp_path / "runs" / f"{family}-tiny" / "version_1" / "caption_predictions_test.json").read_text())
        assert len(preds) == 20 and all(isinstance(p["caption"], str) for p in preds)
    flava = json.loads((tmp_path / "runs" / "flava-tiny" / "version_1" / "results.json").read_text())["metrics"]
    assert {"test/retrieval/mean_R@1", "test/retrieval/rerank/mean_R@1", "test/zeroshot/top1", "test/mlm_loss"} <= set(flava)
    mae = json.loads((tmp_path / "runs" / "mae-tiny" / "version_1" / "results.json").read_text())["metrics"]
    assert math.isfinite(mae["test/loss"])
    assert (tmp_path / "runs" / "mae-tiny" / "version_0" / "vision_encoder.pt").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "runs" / "mae-tiny" / "version_0"))
    acc.Reload()
    assert "val/mae/reconstructions" in acc.Tags()["images"]
    # CapFilt: every image captioned and (threshold 0) every caption kept, in new shards a DataModule reads
    report = json.loads((tmp_path / "capfilt" / "reports" / "capfilt.json").read_text())
    assert report["images_in"] == report["images_out"] == 20 and report["synthetic_captions"] >= 1
    assert report["original_kept"] == report["original_captions"] > 0
    from lit_vlm.datamodules import ImageTextDataModule

    dm = ImageTextDataModule(root=str(tmp_path / "capfilt"), image_size=32, batch_size=20, num_workers=0, synthesize=False)
    assert sum(b["image"].shape[0] for b in dm.sample_loader("train")) == 20
    tuned = scalars(tmp_path / "runs" / "blip-tiny-finetune" / "version_0")
    assert "train/lm_loss" in tuned and "train/itc_loss" not in tuned and "val/caption/CIDEr" in tuned
    blip = json.loads((tmp_path / "runs" / "blip-tiny" / "version_1" / "results.json").read_text())["metrics"]
    assert {"test/retrieval/rerank/mean_R@1", "test/vqa/overall", "test/vqa/baseline/answer_type/yes_no",
            "test/vqa_rank/overall", "test/itm_loss"} <= set(blip)


# ---- BLIP --------------------------------------------------------------------------------------------
def make_blip(seed: int = 0, vocab: int = VOCAB, **kwargs):
    from lit_vlm.models import BLIP

    torch.manual_seed(seed)
    kwargs.setdefault("queue_size", 12)
    return BLIP(VisionTransformer("tiny"), TextDecoder(vocab, CTX + 8, width=32, layers=2, heads=2), embed_dim=16,
                tokenizer="synth", **kwargs)


def test_blip_encoder_shares_all_but_self_attention_with_the_decoder():
    model = make_blip()
    text = model.text
    dec_params = {id(p) for p in text.decoder.parameters()}
    own = [n for n, p in text.named_parameters() if id(p) not in dec_params]
    assert own and all(n.startswith(("enc_ln.", "enc_attn.", "enc_token")) for n in own)
    # the unimodal encoder is bidirectional: the first state depends on the last token
    ids = torch.tensor([[2, 7, 8, 9, 3]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    other = ids.clone()
    other[0, 3] = 11
    assert not torch.allclose(text.encode(ids, mask)[:, 0], text.encode(other, mask)[:, 0])
    # ... and padding never matters
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    pmask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)], 1)
    torch.testing.assert_close(text.encode(padded, pmask)[:, :5], text.encode(ids, mask))
    with pytest.raises(ValueError, match="cross_attention_layers"):
        from lit_vlm.models import BLIP

        BLIP(VisionTransformer("tiny"), TextDecoder(VOCAB, CTX, width=32, layers=2, heads=2, cross_attention_layers=1))


def test_blip_losses_momentum_queue_and_weights():
    model = make_blip(alpha=0.4).train()
    batch = make_batch(4)
    terms = model(batch)
    assert {"itc_loss", "itm_loss", "lm_loss", "itm_acc", "acc_i2t", "logit_scale"} <= set(terms)
    torch.testing.assert_close(terms["loss"], terms["itc_loss"] + terms["itm_loss"] + terms["lm_loss"])
    # the momentum queue fills with the momentum features and wraps around
    assert int(model.queue_filled) == 4 and int(model.queue_ptr) == 4
    for _ in range(3):
        model(batch)
    assert int(model.queue_filled) == 12 and int(model.queue_ptr) == 4
    # the momentum encoders move towards the online ones (EMA), never by gradient
    assert all(not p.requires_grad for p in model.vision_m.parameters())
    with torch.no_grad():
        for p in model.vision.parameters():
            p.add_(1.0)
    before = [q.clone() for q in model.vision_m.parameters()]
    model(batch)
    for p, q, b in zip(model.vision.parameters(), model.vision_m.parameters(), before):
        torch.testing.assert_close(q, 0.995 * b + 0.005 * p.detach())
    # without momentum ITC is plain InfoNCE with temperature, a single weight switches a loss off
    plain = make_blip(momentum=None, itm_weight=0.0, lm_weight=0.0).train()
    t = plain(batch)
    from lit_vlm.losses import clip_loss

    img = plain.encode_image(batch["image"])
    txt = plain.encode_text(batch["text_ids"], batch["text_mask"])
    torch.testing.assert_close(t["loss"], clip_loss(img, txt, 1 / plain.temp)["loss"])
    assert "itm_loss" not in t and "lm_loss" not in t and not hasattr(plain, "vision_m")
    # the captioning fine-tune (ITC and ITM off) never runs the unimodal or image-grounded encoder
    tune = make_blip(momentum=None, itc_weight=0.0, itm_weight=0.0, lm_weight=2.0).train()
    calls = []
    tune.text.encode = lambda *a, **k: calls.append(1)
    t = tune(batch)
    assert calls == [] and set(t) == {"lm_loss", "loss", "logit_scale"}
    torch.testing.assert_close(t["loss"], 2.0 * t["lm_loss"])
    t["loss"].backward()
    assert tune.text.enc_token.grad is None and tune.text.decoder.blocks[0].xattn.q.weight.grad is not None


def test_blip_itm_hard_negatives_follow_the_similarity(monkeypatch):
    """Negatives are drawn from softmax(similarity / temperature) with the pair itself and
    identical captions excluded."""
    model = make_blip(momentum=None).train()
    batch = make_batch(4)
    batch["text_ids"][3] = batch["text_ids"][2]  # rows 2 and 3 share a caption
    batch["text_mask"][3] = batch["text_mask"][2]
    drawn = []
    real = torch.multinomial

    def spy(weights, n, *a, **k):
        drawn.append(weights.clone())
        return real(weights, n, *a, **k)

    monkeypatch.setattr(torch, "multinomial", spy)
    model(batch)
    w_t2i, w_i2t = drawn
    for w in (w_t2i, w_i2t):
        assert (w.diagonal() == 0).all() and w[2, 3] == 0 and w[3, 2] == 0
        assert (w[0, 1:] > 0).all()
    img = model.encode_image(batch["image"])
    txt = model.encode_text(batch["text_ids"], batch["text_mask"])
    want = (txt @ img.T / model.temp).softmax(1) + 1e-4
    torch.testing.assert_close(w_t2i[0, 1:], want[0, 1:].detach(), rtol=1e-4, atol=1e-6)


def test_score_answers_is_the_log_likelihood_of_each_candidate():
    from lit_vlm.datamodules.tokenizer import Tokenizer

    tok = Tokenizer.synthetic()
    model = make_blip(vocab=tok.vocab_size).eval()
    images = torch.randn(2, 3, 32, 32)
    prompts = ["what colour is the circle?", "how many shapes are there?"]
    cands = ["red", "top left", "2"]
    scores = model.score_answers(images, prompts, cands, chunk_size=4)
    assert scores.shape == (2, 3)
    # by hand: decode prompt + candidate + eos with teacher forcing, sum the candidate's log-probs
    ctx, _ = model.generation_context(images)
    for q in range(2):
        for c, cand in enumerate(cands):
            p_ids = [tok.bos_id] + tok.backend.encode(prompts[q], add_special_tokens=False).ids
            a_ids = tok.backend.encode(cand, add_special_tokens=False).ids + [tok.eos_id]
            ids = torch.tensor([p_ids + a_ids])
            lp = model.text.decoder(ids, context=ctx[q : q + 1]).logits.log_softmax(-1)[0]
            want = sum(lp[len(p_ids) - 1 + j, t] for j, t in enumerate(a_ids))
            assert scores[q, c].item() == pytest.approx(want.item(), abs=1e-4)


def test_encode_pairs_marks_the_answer_and_keeps_the_end_token():
    from lit_vlm.datamodules.tokenizer import Tokenizer

    tok = Tokenizer.synthetic()
    ids, mask, ans = tok.encode_pairs(["is there a red circle?", "how many shapes are there?"], ["yes", "2"], 12)
    assert tok.decode(ids[0][ans[0]]) == "yes" and ids[0][ans[0]][-1] == tok.eos_id
    assert ids[0, 0] == tok.bos_id and mask[0].sum() == 1 + 6 + 1 + 1
    short, _, short_ans = tok.encode_pairs(["how many shapes are there in this picture?"], ["2"], 5)
    assert short[0, -1] == tok.eos_id and tok.decode(short[0][short_ans[0]]) == "2"


def test_train_vqa_batches_carry_question_answer_sequences(tmp_path):
    from lit_vlm.datamodules import ImageTextDataModule

    dm = ImageTextDataModule(root=str(tmp_path / "w"), synth_config={"num_train": 16, "num_val": 4, "num_test": 4,
                             "shard_size": 8, "image_size": 32}, image_size=32, batch_size=8, num_workers=0,
                             train_vqa=True)
    dm.prepare_data()
    batch = next(iter(dm.train_dataloader()))
    q = batch["qa_owner"].shape[0]
    assert q == 8 and len(batch["question"]) == len(batch["answer"]) == q
    for row in range(q):
        answer = dm.tokenizer.decode(batch["qa_ids"][row][batch["qa_answer_mask"][row]])
        assert answer == batch["answer"][row].lower()
    # the bank reader of the nearest-neighbour baseline reads the training split whole, in order
    bank = [b for b in dm.sample_loader("train")]
    assert sum(b["image"].shape[0] for b in bank) == 16 and "captions" in bank[0]
    # k questions per image: k distinct ones of each image (the world asks 5 to 8), owners in row order
    dm4 = ImageTextDataModule(root=str(tmp_path / "w"), image_size=32, batch_size=8, num_workers=0, train_vqa=4)
    batch = next(iter(dm4.train_dataloader()))
    owner = batch["qa_owner"].tolist()
    assert owner == sorted(owner) and [owner.count(r) for r in range(8)] == [4] * 8
    for row in range(8):
        asked = [q for q, o in zip(batch["question"], owner) if o == row]
        assert len(set(asked)) == 4
    many = ImageTextDataModule(root=str(tmp_path / "w"), image_size=32, batch_size=8, num_workers=0, train_vqa=50)
    owner = next(iter(many.train_dataloader()))["qa_owner"].tolist()
    assert all(5 <= owner.count(r) <= 8 for r in range(8))  # every question once
    with pytest.raises(ValueError, match="train_vqa"):
        ImageTextDataModule(root=str(tmp_path / "w"), train_vqa=-1)


def test_vqa_majority_prior():
    from lit_vlm.callbacks.vqa import majority_answers

    anns = [{"question_type": "how many", "multiple_choice_answer": a} for a in ("2", "3", "2")]
    anns += [{"question_type": "is there a", "multiple_choice_answer": a} for a in ("yes", "no")]
    assert majority_answers(anns) == {"how many": "2", "is there a": "no"}


# ---- MAE -------------------------------------------------------------------------------------------
def test_patchify_roundtrip_and_masking_by_argsort_of_noise():
    from lit_vlm.models.mae import patchify, unpatchify
    from lit_vlm.modules import random_masking

    images = torch.randn(2, 3, 16, 24)
    patches = patchify(images, 8)
    assert patches.shape == (2, 6, 192)
    torch.testing.assert_close(patches[0, 1], images[0, :, 0:8, 8:16].permute(1, 2, 0).reshape(-1))
    torch.testing.assert_close(unpatchify(patches, 8, (2, 3)), images)
    x = torch.arange(2 * 8, dtype=torch.float).view(2, 8, 1)
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.6], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]])
    kept, mask, restore = random_masking(x, 0.75, noise)
    assert kept[:, :, 0].tolist() == [[1.0, 5.0], [8.0, 9.0]]  # the two smallest noises, in noise order
    assert mask.tolist() == [[1, 0, 1, 1, 1, 0, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]]
    full = torch.cat([kept, torch.full((2, 6, 1), -1.0)], 1)
    back = torch.gather(full, 1, restore[:, :, None])
    assert (back[mask == 0] == x[mask == 0]).all() and (back[mask == 1] == -1).all()


def test_mae_loss_counts_masked_patches_only():
    from lit_vlm.losses import mae_loss

    target = torch.randn(2, 4, 6)
    pred = target.clone()
    mask = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0]])
    pred[0, 1] += 5  # a visible patch: not counted
    assert mae_loss(pred, target, mask, norm_pix_loss=False).item() == 0.0
    pred[0, 0] += 1.0  # a masked patch off by 1 everywhere: mean over 2 masked patches = 0.5
    assert mae_loss(pred, target, mask, norm_pix_loss=False).item() == pytest.approx(0.5)
    # per-patch normalised targets
    t = target[1, 2]
    normed = (t - t.mean()) / (t.var() + 1e-6) ** 0.5
    p2 = torch.zeros_like(target)
    want = ((p2[1, 2] - normed) ** 2).mean() / 2 + ((p2[0, 0] - (target[0, 0] - target[0, 0].mean()) / (target[0, 0].var() + 1e-6) ** 0.5) ** 2).mean() / 2
    assert mae_loss(p2, target, mask).item() == pytest.approx(want.item(), rel=1e-5)


def test_mae_encoder_sees_visible_patches_only_and_exports_the_tower(tmp_path):
    from lit_vlm.models import CLIP, MAE
    from lit_vlm.modules import TextTransformer

    torch.manual_seed(0)
    mae = MAE(VisionTransformer("tiny"), decoder_width=16, decoder_layers=1, decoder_heads=2)
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    tokens, mask, _ = mae.vision.forward_masked(images, 0.75, noise)
    assert tokens.shape == (2, 1 + 4, 32) and mask.sum(1).tolist() == [12, 12]
    # a masked patch's pixels change nothing the encoder computes
    altered = images.clone()
    r, c = divmod(int(mask[0].nonzero()[0]), 4)
    altered[0, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] += 10
    torch.testing.assert_close(mae.vision.forward_masked(altered, 0.75, noise)[0], tokens)
    out = mae.reconstruct(images, noise)
    assert out["pred"].shape == out["target"].shape == (2, 16, 192)
    grid = mae.reconstruction_grid(images[:1], noise[:1])
    assert grid.shape == (3, 32, 96)
    # the exported tower loads into CLIP with init_from_parts [vision]
    path = mae.export_vision(tmp_path / "vit.pt")
    clip = CLIP(VisionTransformer("tiny"), TextTransformer("tiny"), embed_dim=8, init_from=str(path), init_from_parts=["vision"])
    clip.load_initial_weights()
    for k, v in mae.vision.state_dict().items():
        torch.testing.assert_close(clip.vision.state_dict()[k], v)


# ---- PrefixLM --------------------------------------------------------------------------------------
def make_prefixlm(vocab: int = VOCAB, **kwargs):
    from lit_vlm.models import PrefixLM

    torch.manual_seed(0)
    return PrefixLM(VisionTransformer("tiny"), TextDecoder(vocab, CTX + 16, width=32, layers=2, heads=2, cross_attention_layers=0),
                    tokenizer="synth", **kwargs)


def test_generative_families_take_the_convnet_tower():
    """The ConvNet's tokens (its mean, then the map) stand in for a ViT's in CoCa, BLIP (with its
    momentum copy) and PrefixLM, and the tower stays out of the hyper-parameters. (That the CLI
    accepts it, through the union annotation, is checked by parsing the quickstart configs.)"""
    from lit_vlm.datamodules.tokenizer import Tokenizer
    from lit_vlm.models import BLIP, PrefixLM

    tok = Tokenizer.synthetic()
    images = torch.randn(2, 3, 32, 32)
    for cls, decoder_args, model_args in (
        (CoCa, {"cross_attention_layers": 1}, {"embed_dim": 16, "caption_queries": 4, "pooler_heads": 2}),
        (BLIP, {}, {"embed_dim": 16, "queue_size": 12}),
        (PrefixLM, {"cross_attention_layers": 0}, {}),
    ):
        torch.manual_seed(0)
        vision = ConvNet(channels=(8, 32), strides=(2, 2), image_size=32)
        decoder = TextDecoder(tok.vocab_size, CTX + 16, width=32, layers=2, heads=2, **decoder_args)
        model = cls(vision, decoder, tokenizer="synth", generation={"max_new_tokens": 5}, **model_args).train()
        batch = make_batch(2)
        terms = model(batch)
        terms["loss"].backward()
        assert torch.isfinite(terms["loss"]) and next(vision.parameters()).grad is not None
        model.eval()
        assert model.generate(images, num_beams=2) == model.generate(images, num_beams=2, use_cache=False)
        assert not any(isinstance(v, torch.nn.Module) for v in model.hparams.values())  # towers are not hparams


def test_prefixlm_attention_is_bidirectional_in_the_prefix_causal_after():
    model = make_prefixlm().eval()
    lm = model.lm
    ids = torch.tensor([[2, 7, 8, 9, 10, 3]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    ctx = model.generation_context(torch.randn(1, 3, 32, 32))[0]
    S = ctx.shape[1]
    _, _, allowed = lm.sequence(ids, mask, ctx, None, torch.tensor([3]))
    a = allowed[0, 0]
    assert a[S + 0, S + 2] and a[0, S + 2]  # prefix text and image tokens see the whole prefix
    assert not a[S + 1, S + 3] and not a[S + 2, S + 4]  # ... but not the suffix
    assert a[S + 4, S + 3] and not a[S + 3, S + 4]  # the suffix is causal
    # generation: cached and uncached decoding agree (the uncached pass is told where the prompt ends)
    from lit_vlm.datamodules.tokenizer import Tokenizer

    tok = Tokenizer.synthetic()
    model = make_prefixlm(vocab=tok.vocab_size, generation={"max_new_tokens": 6})
    images = torch.randn(3, 3, 32, 32)
    for options in ({"num_beams": 1}, {"num_beams": 3}):
        assert model.generate(images, **options) == model.generate(images, use_cache=False, **options)
    prompts = ["what colour is the star?", "where is it?", "how many shapes are there?"]
    assert model.generate(images, prompts, num_beams=2) == model.generate(images, prompts, num_beams=2, use_cache=False)


def test_prefixlm_loss_is_on_the_suffix_and_text_only_rows_see_no_image():
    model = make_prefixlm(prefix_sampling="none").train()
    batch = make_batch(4)
    batch["text_ids"][:, 0] = 2
    full = model(batch)["loss"]
    # prefix "none" = captioning: the same as the decoder's plain caption loss over [image, text]
    ctx = model.vision(batch["image"]).tokens
    ids, mask = batch["text_ids"], batch["text_mask"]
    out = model.lm(ids[:, :1], mask[:, :1], context=ctx, use_cache=True)
    rest = model.lm(ids[:, 1:], mask[:, 1:], cache=out.cache)
    logits = torch.cat([out.logits, rest.logits], 1)
    sums, counts = caption_loss(logits, ids, mask)
    torch.testing.assert_close(full, sums.sum() / counts.sum(), rtol=1e-5, atol=1e-5)
    # caption_ratio 1: every random split falls on the start token, which is captioning again;
    # with 0 the random splits shorten the targets, so the loss differs
    for ratio, same in ((1.0, True), (0.0, False)):
        mixed = make_prefixlm(prefix_sampling="random", caption_ratio=ratio).train()
        assert torch.allclose(mixed(batch)["loss"], full, rtol=1e-5, atol=1e-5) == same
    with pytest.raises(ValueError, match="caption_ratio"):
        make_prefixlm(caption_ratio=1.5)
    # a text-only row: changing its image changes nothing
    batch["has_image"] = torch.tensor([False, True, True, True])
    model.eval()
    a = model(batch)["loss"]
    batch["image"][0] += 5
    torch.testing.assert_close(model(batch)["loss"], a)
    with pytest.raises(ValueError, match="cross_attention_layers: 0"):
        from lit_vlm.models import PrefixLM

        PrefixLM(VisionTransformer("tiny"), TextDecoder(VOCAB, CTX, width=32, layers=2, heads=2))


# ---- FLAVA -----------------------------------------------------------------------------------------
def make_flava(**kwargs):
    from lit_vlm.models import FLAVA
    from lit_vlm.modules import TextTransformer

    torch.manual_seed(0)
    text = TextTransformer("tiny", vocab_size=VOCAB, context_length=CTX, causal=False, pool="first")
    return FLAVA(VisionTransformer("tiny"), text, mm_width=32, mm_layers=1, mm_heads=2, embed_dim=16, mask_id=4, **kwargs)


def test_bert_masking_rates_and_specials():
    from lit_vlm.losses import bert_mask

    torch.manual_seed(0)
    ids = torch.randint(5, 100, (400, 50))
    ids[:, 0] = 2
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 40:] = False
    out, sel = bert_mask(ids, mask, mask_id=4, vocab_size=100, probability=0.15, special_ids=(2,))
    assert not sel[:, 0].any() and not sel[:, 40:].any()
    rate = sel.float().sum() / (400 * 39)
    assert 0.13 < rate < 0.17
    as_mask = (out[sel] == 4).float().mean()
    unchanged = (out[sel] == ids[sel]).float().mean()
    assert 0.76 < as_mask < 0.84 and 0.07 < unchanged < 0.14
    assert torch.equal(out[~sel], ids[~sel])


def test_flava_losses_are_weighted_and_switchable():
    model = make_flava().train()
    batch = make_batch(4)
    terms = model(batch)
    names = {"contrastive_loss", "mim_loss", "mlm_loss", "mmm_image_loss", "mmm_text_loss", "itm_loss"}
    assert names <= set(terms)
    torch.testing.assert_close(terms["loss"], sum(terms[n] for n in names))
    only_mlm = make_flava(contrastive_weight=0, mim_weight=0, mmm_image_weight=0, mmm_text_weight=0, itm_weight=0).train()
    t = only_mlm(batch)
    assert set(k for k in t if k.endswith("_loss")) == {"mlm_loss"}
    torch.testing.assert_close(t["loss"], t["mlm_loss"])
    # unimodal rows: an image-only row adds to MIM but to none of the paired losses
    batch["has_text"] = torch.tensor([True, True, True, False])
    torch.manual_seed(1)
    a = model(batch)
    assert {"mim_loss", "mlm_loss", "contrastive_loss"} <= set(a)
    batch["text_ids"][3, 1:3] = 7  # the text-less row's text is ignored by the paired losses
    torch.manual_seed(1)
    b = model(batch)
    torch.testing.assert_close(a["contrastive_loss"], b["contrastive_loss"])
    scores = model.score_pairs(model.pair_features(batch["image"]), batch["text_ids"], batch["text_mask"])
    assert scores.shape == (4,)


# ---- DDP ---------------------------------------------------------------------------------------------
COCA_DDP_WORKER = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from test_generative_family import coca_fit

torch.set_num_threads(1)
model = coca_fit(devices=2, batch_size=4)
if model.trainer.global_rank == 0:
    torch.save(model.synced_grads, sys.argv[1])
"""


def coca_fit(devices: int, batch_size: int):
    """One CoCa optimiser step over the same 8 samples (the whole data set, whatever order the
    distributed sampler picks); the gradients the optimiser
    receives (after DDP's all-reduce) are kept in ``model.synced_grads``."""
    from test_contrastive_family import Pairs, trainer
    from torch.utils.data import DataLoader

    model = make_coca(warmup_steps=0)

    def keep(optimizer):
        model.synced_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    model.on_before_optimizer_step = keep
    strategy = {"strategy": "ddp", "devices": 2} if devices == 2 else {}
    trainer(max_steps=1, gradient_clip_val=None, **strategy).fit(model, DataLoader(Pairs(8), batch_size=batch_size))
    return model


@pytest.mark.slow
@pytest.mark.ddp
def test_coca_step_under_ddp_equals_one_process(tmp_path):
    """2 CPU processes x 4 samples give the optimiser the gradients of 1 process x 8 samples: the
    contrastive term scores the gathered batch and the caption term is the token mean over the
    global batch (the ranks hold different numbers of caption tokens). Gradients, not the updated
    weights, are compared: Adam's first step is lr * sign(g), which flips on parameters whose
    gradient is ~1e-9 of rounding noise."""
    import os

    script = tmp_path / "worker.py"
    script.write_text(COCA_DDP_WORKER)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ddp.pt"), str(Path(__file__).parent)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = torch.load(tmp_path / "ddp.pt")
    single = coca_fit(devices=1, batch_size=8).synced_grads
    assert set(ddp) == set(single) and "cls_embedding" in single
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, atol=1e-6, rtol=1e-4, msg=key)
    assert max(v.abs().max().item() for v in single.values()) > 1e-3


def test_nearest_neighbour_baseline_takes_the_nearest_training_images_captions():
    from lit_vlm.callbacks import CaptionEvaluation

    cb = CaptionEvaluation(baseline="nearest_neighbour", baseline_k=1)
    bank = torch.randn(3, 3, 16, 16)
    cb._bank = (cb._features(None, bank), [["a red circle", "one red circle", "a red circle on the left"],
                                            ["a blue star"], ["two green squares", "green squares"]])
    query = bank[[2, 0]] + 0.01 * torch.randn(2, 3, 16, 16)  # near bank images 2 and 0
    assert cb._baseline_captions(None, query) == ["two green squares", "a red circle"]
    cb.baseline_k = 2  # the two nearest images' captions compete: the consensus of their union
    second = int((cb._features(None, bank[:1]) @ cb._bank[0].T)[0].argsort(descending=True)[1])
    pool = cb._bank[1][0] + cb._bank[1][second]
    assert cb._baseline_captions(None, bank[:1]) == [consensus_caption(pool)]
    with pytest.raises(ValueError, match="baseline_split"):
        CaptionEvaluation(baseline="nearest_neighbour", baseline_split="val")
