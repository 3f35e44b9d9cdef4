"""The contrastive family: SigLIP / focal (loss options of CLIP), LiT (locking, init_from), FLIP
(patch dropout schedule), FILIP (token-wise retrieval), exact contrastive gradient accumulation,
gradient checkpointing, and a smoke run of every variant's tiny config through the CLI."""

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lit_vlm.callbacks import RetrievalEvaluation
from lit_vlm.errors import UserError
from lit_vlm.metrics import retrieval_metrics_from_ranks
from lit_vlm.models import CLIP, FILIP
from lit_vlm.modules import TextTransformer, VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
VOCAB, CTX = 50, 8


def make(cls=CLIP, patch_dropout: float = 0.0, image_size: int = 32, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    vision = VisionTransformer("tiny", image_size=image_size, patch_dropout=patch_dropout)
    text = TextTransformer("tiny", vocab_size=VOCAB, context_length=CTX)
    return cls(vision, text, embed_dim=16, **kwargs)


def make_batch(n: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, CTX), generator=g)
    lengths = torch.randint(3, CTX + 1, (n,), generator=g)
    mask = torch.arange(CTX)[None] < lengths[:, None]  # [n, CTX] right padding
    ids[~mask] = 0
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "text_ids": ids, "text_mask": mask}


def split(batch: dict, k: int) -> list[dict]:
    n = batch["image"].shape[0] // k
    return [{key: v[i * n : (i + 1) * n] for key, v in batch.items()} for i in range(k)]


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class Pairs(Dataset):
    def __init__(self, n: int) -> None:
        self.batch = make_batch(n, seed=3)

    def __len__(self) -> int:
        return self.batch["image"].shape[0]

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.batch.items()}


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, gradient_clip_val=1.0, max_epochs=1,
    )
    return pl.Trainer(**{**defaults, **kwargs})


# ---- loss options ------------------------------------------------------------------------------
def test_loss_options_and_siglip_parameters():
    clip = make()
    assert clip.logit_bias is None and "logit_bias" not in dict(clip.named_parameters())
    assert clip.logit_scale.exp().item() == pytest.approx(1 / 0.07)
    sig = make(loss="siglip")
    assert sig.logit_scale.exp().item() == pytest.approx(10.0) and sig.logit_bias.item() == -10.0
    assert make(loss="siglip", init_logit_scale=1.0, init_logit_bias=-3.0).logit_bias.item() == -3.0
    # the SigLIP terms are the reference loss of the same embeddings
    from lit_vlm.losses import focal_clip_loss, siglip_loss

    batch = make_batch(6)
    sig.eval()
    with torch.no_grad():
        terms = sig(batch)
        img, txt = sig.encode_image(batch["image"]), sig.encode_text(batch["text_ids"], batch["text_mask"])
        logits = 10.0 * img @ txt.T - 10.0  # [6, 6]
        labels = 2 * torch.eye(6) - 1
        assert terms["loss"].item() == pytest.approx(-torch.nn.functional.logsigmoid(labels * logits).sum().item() / 6, rel=1e-5)
        assert terms["loss"].item() == pytest.approx(siglip_loss(img, txt, torch.tensor(10.0), torch.tensor(-10.0))["loss"].item(), rel=1e-6)
        assert {"acc_i2t", "acc_t2i", "logit_bias"} <= set(terms)
    focal = make(loss="focal", focal_gamma=1.5).eval()  # the softmax form by default, no bias
    assert focal.focal_form == "softmax" and focal.logit_bias is None
    with torch.no_grad():
        img, txt = focal.encode_image(batch["image"]), focal.encode_text(batch["text_ids"], batch["text_mask"])
        want = focal_clip_loss(img, txt, focal.logit_scale.exp(), gamma=1.5, form="softmax")["loss"]
        assert focal(batch)["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    pairwise = make(loss="focal", focal_form="sigmoid").eval()  # SigLIP's bias and scale
    assert (pairwise.logit_bias.item(), pairwise.logit_scale.exp().item()) == pytest.approx((-10.0, 10.0))
    with torch.no_grad():
        img, txt = pairwise.encode_image(batch["image"]), pairwise.encode_text(batch["text_ids"], batch["text_mask"])
        want = focal_clip_loss(img, txt, torch.tensor(10.0), form="sigmoid", logit_bias=torch.tensor(-10.0))["loss"]
        assert pairwise(batch)["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    assert make(loss="focal", focal_form="sigmoid", focal_bias=False).logit_bias is None  # the published, bias-free form
    # bad options name themselves
    with pytest.raises(ValueError, match="loss must be one of"):
        make(loss="infonce")
    with pytest.raises(ValueError, match="init_logit_bias is only used by the sigmoid losses"):
        make(init_logit_bias=-10.0)
    with pytest.raises(ValueError, match="siglip_mode"):
        make(loss="siglip", siglip_mode="all")
    with pytest.raises(ValueError, match="lock_image"):
        make(lock_image_unlocked_groups=1)


# ---- contrastive gradient accumulation ---------------------------------------------------------
@pytest.mark.parametrize("loss", ["clip", "siglip", "focal", "filip"])
def test_accumulated_gradients_equal_one_large_batch(loss):
    """accum_freq=4 on micro-batches of 4 gives the gradients of one batch of 16 (1e-5)."""
    kwargs = {} if loss == "filip" else {"loss": loss}
    model = make(FILIP if loss == "filip" else CLIP, accum_freq=4, **kwargs).train()
    batch = make_batch(16)
    model(batch)["loss"].backward()
    want = grads(model)
    model.zero_grad()
    terms = model.accumulated_backward(split(batch, 4), backward=torch.Tensor.backward)
    got = grads(model)
    assert set(got) == set(want) and "logit_scale" in got
    assert (loss == "siglip") == ("logit_bias" in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():
        assert terms["loss"].item() == pytest.approx(model(batch)["loss"].item(), rel=1e-5)


def test_accumulation_replays_the_same_patch_dropout():
    """With patch dropout, each micro-batch's replay uses the masks of its first pass."""
    model = make(patch_dropout=0.5, accum_freq=2).train()
    micro = split(make_batch(8), 2)
    torch.manual_seed(7)
    feats = [model.features(b) for b in micro]  # the masks the first pass draws, in the same order
    ref = model.loss_from_features({k: torch.cat([f[k] for f in feats]) for k in feats[0]})
    ref["loss"].backward()
    want = grads(model)
    model.zero_grad()
    torch.manual_seed(7)
    model.accumulated_backward(micro, backward=torch.Tensor.backward)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_accumulation_in_a_fit_steps_optimizer_and_scheduler_once_per_group():
    model = make(accum_freq=4, warmup_steps=1, accum_clip_val=0.7)
    clipped = []
    original = model.clip_gradients
    model.clip_gradients = lambda *a, **k: (clipped.append(k["gradient_clip_val"]), original(*a, **k))
    t = trainer(max_epochs=2, gradient_clip_val=None)
    t.fit(model, DataLoader(Pairs(40), batch_size=4))  # 10 micro-batches/epoch: 2 groups, 2 dropped
    assert model.num_optimizer_steps() == 4
    assert t.global_step == 4 and t.lr_scheduler_configs[0].scheduler.last_epoch == 4
    assert clipped == [0.7] * 4  # one clip per accumulated step, by the module
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0)  # the cosine ran to its end
    assert "train/loss" in t.callback_metrics


DDP_WORKER = """
import sys
import torch

sys.path.insert(0, sys.argv[2])
from test_contrastive_family import accum_fit

out = sys.argv[1]
torch.set_num_threads(1)
model = accum_fit(devices=2, batch_size=4)
if model.trainer.global_rank == 0:
    torch.save(model.state_dict(), out)
"""


def accum_fit(devices: int, batch_size: int):
    """One accumulated SigLIP step (accum_freq=2, clipping on) over the same 16 samples."""
    model = make(loss="siglip", accum_freq=2, warmup_steps=0, accum_clip_val=0.5)
    strategy = {"strategy": "ddp", "devices": 2} if devices == 2 else {}
    trainer(max_steps=1, gradient_clip_val=None, **strategy).fit(model, DataLoader(Pairs(16), batch_size=batch_size))
    return model


@pytest.mark.slow
@pytest.mark.ddp
def test_accumulation_under_ddp_equals_one_process(tmp_path):
    """2 CPU processes x micro-batches of 4, accum_freq=2 (only the last replay syncs gradients) take
    the same optimiser step as 1 process x micro-batches of 8: the same 16 samples (DistributedSampler
    gives rank r samples r, r+2, ...; the loss does not depend on the order of the pairs)."""
    import os

    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ddp.pt"), str(Path(__file__).parent)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = torch.load(tmp_path / "ddp.pt")
    start = make(loss="siglip").state_dict()
    single = accum_fit(devices=1, batch_size=8).state_dict()
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, atol=1e-6, rtol=1e-5, msg=key)
    assert max((single[k] - start[k]).abs().max().item() for k in single) > 1e-4  # the step moved the weights


def test_trainer_accumulate_grad_batches_is_refused():
    with pytest.raises(ValueError, match="--model.init_args.accum_freq 2"):
        trainer(accumulate_grad_batches=2, max_steps=1).fit(make(), DataLoader(Pairs(8), batch_size=4))


def test_accumulation_clipping_options():
    # the trainer cannot clip manual steps: Lightning refuses its clipping under accum_freq (the CLI
    # moves it to accum_clip_val, tested below)
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="gradient clipping is not supported for manual optimization"):
        trainer(max_steps=1).fit(make(accum_freq=2), DataLoader(Pairs(8), batch_size=4))
    with pytest.raises(ValueError, match="accum_clip_val only acts with accum_freq > 1"):
        make(accum_clip_val=1.0)
    with pytest.raises(ValueError, match="accum_clip_algorithm"):
        make(accum_freq=2, accum_clip_val=1.0, accum_clip_algorithm="l2")
    # the clip acts: after it, the global gradient norm is the cap
    model = make(accum_freq=2, accum_clip_val=1e-3, warmup_steps=0)
    seen = []
    original = model.clip_gradients

    def spy(optimizer, **kwargs):
        original(optimizer, **kwargs)
        seen.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])))

    model.clip_gradients = spy
    trainer(max_steps=1, gradient_clip_val=None).fit(model, DataLoader(Pairs(8), batch_size=4))
    assert len(seen) == 1 and seen[0].item() == pytest.approx(1e-3, rel=1e-3)


def test_cli_moves_trainer_clipping_to_the_model():
    from jsonargparse import Namespace

    from lit_vlm.cli import move_gradient_clipping

    def cfg(accum, model_clip=None, trainer_clip=1.0):
        init = Namespace(accum_freq=accum, accum_clip_val=model_clip, accum_clip_algorithm="norm")
        return Namespace(
            model=Namespace(class_path="lit_vlm.models.CLIP", init_args=init),
            trainer=Namespace(gradient_clip_val=trainer_clip, gradient_clip_algorithm="value"),
        )

    c = cfg(4)
    move_gradient_clipping(c)
    assert c.trainer.gradient_clip_val is None
    assert (c.model.init_args.accum_clip_val, c.model.init_args.accum_clip_algorithm) == (1.0, "value")
    c = cfg(4, model_clip=0.3)  # the model's own value wins; the trainer's is dropped
    move_gradient_clipping(c)
    assert c.trainer.gradient_clip_val is None and c.model.init_args.accum_clip_val == 0.3
    c = cfg(1)  # no accumulation: nothing moves
    move_gradient_clipping(c)
    assert c.trainer.gradient_clip_val == 1.0 and c.model.init_args.accum_clip_val is None


def test_gradient_checkpointing_leaves_gradients_unchanged():
    batch = make_batch(6)
    out = []
    for flag in (False, True):
        model = make(grad_checkpointing=flag).train()
        assert model.vision.transformer.grad_checkpointing is flag and model.text.transformer.grad_checkpointing is flag
        model(batch)["loss"].backward()
        out.append(grads(model))
    for name in out[0]:
        torch.testing.assert_close(out[1][name], out[0][name], atol=1e-6, rtol=1e-5, msg=name)


# ---- LiT -----------------------------------------------------------------------------------------
def save_run(model, run_dir: Path) -> Path:
    """A fake fit run: a Lightning-style checkpoint and its checkpoints/index.json."""
    ckpt = run_dir / "version_0" / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": model.state_dict(), "epoch": 0}, ckpt)
    (ckpt.parent / "index.json").write_text(json.dumps({"best": str(ckpt), "last": str(ckpt)}))
    return ckpt


def test_lit_locks_the_image_tower_through_a_fit(tmp_path):
    source = make(seed=5)
    save_run(source, tmp_path / "clip-run")
    model = make(lock_image=True, init_from=str(tmp_path / "clip-run"), init_from_parts=["vision", "image_projection"])
    assert all(not p.requires_grad for p in [*model.vision.parameters(), *model.image_projection.parameters()])
    text_before = {k: v.clone() for k, v in model.text.state_dict().items()}
    modes = []
    model.vision.register_forward_hook(lambda m, i, o: modes.append(m.training))
    t = trainer(max_steps=3)
    t.fit(model, DataLoader(Pairs(12), batch_size=4))
    assert modes and not any(modes)  # the locked tower ran in eval mode while training
    for key, value in source.state_dict().items():
        if key.startswith(("vision.", "image_projection.")):
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)  # loaded, untouched
    assert any(not torch.equal(model.text.state_dict()[k], v) for k, v in text_before.items())  # text trained
    optimizer = t.optimizers[0]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    locked = [*model.vision.parameters(), *model.image_projection.parameters()]
    assert not any(id(p) in in_optimizer for p in locked)
    assert not any(id(p) in {id(q) for q in optimizer.state} for p in locked)  # no AdamW state
    assert all(id(p) in in_optimizer for p in model.text.parameters())
    model.train()
    assert not model.vision.training and model.text.training


def test_save_frozen_false_leaves_the_locked_tower_out_of_checkpoints(tmp_path):
    source = make(seed=5)
    save_run(source, tmp_path / "clip-run")
    model = make(lock_image=True, init_from=str(tmp_path / "clip-run"), init_from_parts=["vision", "image_projection"],
                 save_frozen=False)
    t = trainer(max_steps=2, default_root_dir=str(tmp_path))
    t.fit(model, DataLoader(Pairs(8), batch_size=4))
    t.save_checkpoint(tmp_path / "lean.ckpt")
    saved = torch.load(tmp_path / "lean.ckpt", weights_only=False)
    assert not any(k.startswith(("vision.", "image_projection.")) for k in saved["state_dict"])  # only what trains
    assert any(k.startswith("text.") for k in saved["state_dict"])
    loaded = CLIP.load_from_checkpoint(tmp_path / "lean.ckpt", vision=make().vision, text=make().text)
    for key, value in model.state_dict().items():  # the frozen tower came back from init_from, the rest from the file
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    with pytest.raises(UserError, match="save_frozen=false re-reads"):
        make(lock_image=True, save_frozen=False)


def test_lit_unlocked_groups_and_norms():
    model = make(lock_image=True, lock_image_unlocked_groups=2)  # [last block, ln_post] and the projection
    v = model.vision
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith(("vision.", "image_projection."))}
    assert trainable == {f"vision.{n}" for n, _ in v.transformer.blocks[-1].named_parameters(prefix="transformer.blocks.1")} | {
        "vision.ln_post.weight", "vision.ln_post.bias", "image_projection.weight"
    }
    model.train()
    assert v.training and not v.transformer.blocks[0].training and v.transformer.blocks[1].training
    normed = make(lock_image=True, lock_image_unlock_norms=True)
    for name, module in normed.vision.named_modules():
        for p in module.parameters(recurse=False):
            assert p.requires_grad == isinstance(module, torch.nn.LayerNorm), name
    with pytest.raises(ValueError, match=r"lock_image_unlocked_groups must be in \[0, 4\]"):
        make(lock_image=True, lock_image_unlocked_groups=5)


def test_init_from_parts_resizes_positions_and_names_errors(tmp_path):
    source = make(seed=5)
    ckpt = save_run(source, tmp_path / "run")
    model = make(image_size=48, init_from=str(ckpt), init_from_parts=["vision"])
    loaded = model.load_initial_weights()
    assert "vision.positional_embedding" in loaded and model.vision.positional_embedding.shape == (1 + 36, 32)
    torch.testing.assert_close(model.vision.positional_embedding[0], source.vision.positional_embedding[0])
    torch.testing.assert_close(model.vision.conv1.weight, source.vision.conv1.weight)
    assert not torch.equal(model.text_projection.weight, source.text_projection.weight)  # not a loaded part
    with pytest.raises(ValueError, match="no part named 'visual'"):
        make(init_from=str(ckpt), init_from_parts=["visual"]).load_initial_weights()
    siglip_ckpt = save_run(make(loss="siglip"), tmp_path / "sig")  # has logit_bias, which CLIP lacks
    with pytest.raises(ValueError, match=r"1 unexpected key\(s\) in the checkpoint \(logit_bias\)"):
        make(init_from=str(siglip_ckpt)).load_initial_weights()
    with pytest.raises(FileNotFoundError, match="init_from"):
        make(init_from=str(tmp_path / "nothing.ckpt")).load_initial_weights()
    with pytest.raises(FileNotFoundError, match=r"init_from=.*runs/never-trained: no such file or directory.*train that run"):
        make(init_from=str(tmp_path / "runs" / "never-trained")).load_initial_weights()  # a run directory not there yet
    with pytest.raises(FileNotFoundError, match="index.json"):
        (tmp_path / "empty").mkdir()
        make(init_from=str(tmp_path / "empty")).load_initial_weights()


# ---- FLIP ----------------------------------------------------------------------------------------
def test_flip_patch_dropout_then_unmasked_tuning_then_full_eval():
    model = make(patch_dropout=0.5, unmasked_tuning_steps=0.25)  # 4 steps: the last one unmasked
    seen = []
    model.vision.register_forward_hook(lambda m, i, o: seen.append((m.training, o.tokens.shape[1])))
    logged = []
    model.on_train_batch_end = lambda *a: logged.append(model.patch_dropout_ratio())
    t = trainer(max_steps=4)
    t.fit(model, DataLoader(Pairs(16), batch_size=4))
    assert seen == [(True, 1 + 8)] * 3 + [(True, 1 + 16)]  # 16 patches, half dropped, then all
    assert logged == [0.5, 0.5, 0.5, 0.0] and t.callback_metrics["train/patch_dropout"] == 0.0
    seen.clear()
    model.eval()
    with torch.no_grad():
        model.encode_image(torch.randn(2, 3, 32, 32))
    assert seen == [(False, 1 + 16)]  # evaluation sees whole images


# ---- FILIP ---------------------------------------------------------------------------------------
def eval_batch(start: int, n_images: int, caption_counts: list[int], width: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = sum(caption_counts)
    lengths = torch.randint(2, width + 1, (n,), generator=g)
    mask = torch.arange(width)[None] < lengths[:, None]  # [n, width]
    ids = torch.randint(5, VOCAB, (n, width), generator=g)
    ids[~mask] = 0
    return {
        "image": torch.randn(n_images, 3, 32, 32, generator=g),
        "sample_id": [f"s{start + i:02d}" for i in range(n_images)],
        "caption_ids": ids,
        "caption_mask": mask,
        "caption_owner": torch.repeat_interleave(torch.arange(n_images), torch.tensor(caption_counts)),
    }


def test_filip_retrieval_uses_the_family_similarity():
    model = make(FILIP).eval()
    batches = [eval_batch(0, 5, [1, 2, 1, 3, 1], CTX, 11), eval_batch(5, 4, [2, 1, 1, 2], 5, 12)]
    cb = RetrievalEvaluation(token_chunk_size=3, num_examples=0, ks=(1, 2, 5))
    fake_trainer = SimpleNamespace(loggers=[], datamodule=None)
    assert cb.setup_epoch(fake_trainer, model, "val")
    records = {}
    with torch.no_grad():
        for b in batches:
            records.update(cb.collect(fake_trainer, model, b))
        got = cb.compute([records[k] for k in sorted(records)])

        # plain computation: every image and caption encoded alone, loops over token pairs
        images = [model.encode_image_tokens(b["image"][i : i + 1])[0][0] for b in batches for i in range(b["image"].shape[0])]
        captions, owner = [], []
        offset = 0
        for b in batches:
            for t in range(b["caption_ids"].shape[0]):
                m = b["caption_mask"][t : t + 1]
                tok, keep = model.encode_text_tokens(b["caption_ids"][t : t + 1], m)
                captions.append(tok[0][keep[0]])  # [valid, E]
                owner.append(offset + int(b["caption_owner"][t]))
            offset += b["image"].shape[0]
    n_img, n_txt = len(images), len(captions)
    s_i2t = torch.tensor([[float((img @ cap.T).max(dim=1).values.mean()) for cap in captions] for img in images])
    s_t2i = torch.tensor([[float((img @ cap.T).max(dim=0).values.mean()) for cap in captions] for img in images])
    i2t_ranks = torch.tensor([
        int(sum(s_i2t[i, t] >= max(s_i2t[i, u] for u in range(n_txt) if owner[u] == i) for t in range(n_txt) if owner[t] != i))
        for i in range(n_img)
    ])
    t2i_ranks = torch.tensor([int(sum(s_t2i[j, t] >= s_t2i[owner[t], t] for j in range(n_img) if j != owner[t])) for t in range(n_txt)])
    want = retrieval_metrics_from_ranks(i2t_ranks, t2i_ranks, (1, 2, 5))
    assert got == pytest.approx(want)
    torch.testing.assert_close(cb._sims[0], s_i2t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cb._sims[1], s_t2i, atol=1e-5, rtol=1e-5)
    # the qualitative logs rank with the same scores
    texts, images_logged = {}, []
    writer = SimpleNamespace(add_text=lambda tag, text, step: texts.update({tag: text}),
                             add_image=lambda tag, img, step, dataformats: images_logged.append(tag))
    cb.num_examples = 2
    cb.log_examples(writer, "val", 0, sorted(records), [records[k] for k in sorted(records)])
    best = int(s_i2t[0].argmax())
    assert f"1. caption {best - [i for i, o in enumerate(owner) if o == owner[best]][0]} of `s{owner[best]:02d}` score {float(s_i2t[0, best]):.4f}" in texts["val/retrieval/i2t_examples"]
    # zero-shot / predict use the mean of the normalised tokens
    with torch.no_grad():
        pooled = model.encode_image(batches[0]["image"][:1])[0]
    torch.testing.assert_close(pooled, torch.nn.functional.normalize(images[0].mean(0), dim=0))


def test_filip_text_tokens_drop_the_start_token_and_padding():
    model = make(FILIP).eval()
    ids = torch.tensor([[2, 7, 8, 3, 0, 0], [2, 3, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0]])
    tokens, keep = model.encode_text_tokens(ids, ids != 0)
    assert tokens.shape[:2] == (3, 4)  # trimmed to the longest caption
    assert keep.tolist() == [[False, True, True, True], [False, True, False, False], [True, False, False, False]]
    with pytest.raises(ValueError, match="FILIP trains with its own"):
        make(FILIP, loss="siglip")


# ---- every variant's tiny config through the CLI ------------------------------------------------
DRIVER = """
import json, sys, time
from lit_vlm.cli import main
for argv in json.loads(sys.argv[1]):
    start = time.time()
    code = main(argv)
    print(f"{time.time() - start:.1f}s", *argv[:3], flush=True)
    if code:
        sys.exit(code)
"""


def scalars(run_dir: Path) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_every_variant_tiny_config_fits_and_tests_through_the_cli(tmp_path):
    """fit (2 micro-batches) then test --ckpt_path best for siglip, focal, flip, filip and lit (LiT
    locks the image tower of the SigLIP run, found through its checkpoints/index.json), all in one
    process running the `lit-vlm` entry point (`lit_vlm.cli.main`) command after command."""
    common = ["--data.init_args.root", str(tmp_path / "world"), "--trainer.enable_progress_bar", "false",
              "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1"]
    runs = []
    for variant in ("siglip", "focal", "flip", "filip", "lit"):
        cfg = ["--config", str(ROOT / "configs" / variant / "tiny.yaml"), *common]
        extra = ["--model.init_args.init_from", "runs/siglip-tiny"] if variant == "lit" else []
        runs += [["fit", *cfg, "--trainer.limit_train_batches", "2", *extra], ["test", *cfg, "--ckpt_path", "best"]]
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stdout)
    for variant in ("siglip", "focal", "flip", "filip", "lit"):
        results = json.loads((tmp_path / "runs" / f"{variant}-tiny" / "version_1" / "results.json").read_text())
        metrics = results["metrics"]
        assert {"test/retrieval/mean_R@1", "test/retrieval/i2t_R@5", "test/zeroshot/top1", "test/loss"} <= set(metrics), variant
        assert all(math.isfinite(v) for v in metrics.values()), variant
        fit = scalars(tmp_path / "runs" / f"{variant}-tiny" / "version_0")
        assert "val/retrieval/mean_R@1" in fit and "val/zeroshot/top1" in fit and math.isfinite(fit["train/loss"]), variant
    assert "train/logit_bias" in scalars(tmp_path / "runs" / "siglip-tiny" / "version_0")
    assert "train/patch_dropout" in scalars(tmp_path / "runs" / "flip-tiny" / "version_0")
    # LiT: the image tower of its checkpoint is the SigLIP run's best one, untouched by training
    index = tmp_path / "runs" / "{}-tiny" / "version_0" / "checkpoints" / "index.json"
    sig = torch.load(json.loads(Path(str(index).format("siglip")).read_text())["best"], weights_only=False)["state_dict"]
    lit = torch.load(json.loads(Path(str(index).format("lit")).read_text())["last"], weights_only=False)["state_dict"]
    for key in sig:
        if key.startswith(("vision.", "image_projection.")):
            assert torch.equal(lit[key], sig[key]), key
