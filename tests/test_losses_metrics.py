"""Losses and metrics against hand-computed cases and brute-force references."""

import math

import pytest
import torch
import torch.nn.functional as F

from lit_vlm.losses import clip_loss
from lit_vlm.metrics import retrieval_metrics, retrieval_ranks, zeroshot_metrics
from lit_vlm.optim import param_groups, warmup_cosine


def test_clip_loss_hand_computed():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(2.0)
    # logits image->text: [[2*1, 2*0.6], [2*0, 2*0.8]] = [[2, 1.2], [0, 1.6]]
    l_i2t = (-math.log(math.exp(2) / (math.exp(2) + math.exp(1.2))) - math.log(math.exp(1.6) / (1 + math.exp(1.6)))) / 2
    # text->image: transpose: [[2, 0], [1.2, 1.6]]
    l_t2i = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))) / 2
    out = clip_loss(img, txt, scale)
    assert out["loss_i2t"].item() == pytest.approx(l_i2t, abs=1e-6)
    assert out["loss_t2i"].item() == pytest.approx(l_t2i, abs=1e-6)
    assert out["loss"].item() == pytest.approx((l_i2t + l_t2i) / 2, abs=1e-6)
    assert out["acc_i2t"].item() == 1.0 and out["acc_t2i"].item() == 1.0


def test_clip_loss_perfect_and_collapsed():
    e = torch.eye(4)
    assert clip_loss(e, e, torch.tensor(100.0))["loss"].item() < 1e-10
    same = F.normalize(torch.ones(4, 3), dim=-1)
    assert clip_loss(same, same, torch.tensor(10.0))["loss"].item() == pytest.approx(math.log(4), abs=1e-6)


def brute_force(sim, owner):
    """Reference ranks by explicit sorting (pessimistic ties: wrong items at equal score go first)."""
    n_img, n_txt = len(sim), len(sim[0])
    i2t, t2i = [], []
    for i in range(n_img):
        best = max(sim[i][j] for j in range(n_txt) if owner[j] == i)
        i2t.append(sum(1 for j in range(n_txt) if owner[j] != i and sim[i][j] >= best))
    for j in range(n_txt):
        pos = sim[owner[j]][j]
        t2i.append(sum(1 for i in range(n_img) if i != owner[j] and sim[i][j] >= pos))
    return torch.tensor(i2t), torch.tensor(t2i)


@pytest.mark.parametrize("seed", range(4))
def test_retrieval_ranks_match_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n_img = 23
    counts = torch.randint(1, 8, (n_img,), generator=g)  # 1..7 captions per image
    owner = torch.repeat_interleave(torch.arange(n_img), counts)
    img = F.normalize(torch.randn(n_img, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(len(owner), 8, generator=g), dim=-1)
    if seed == 3:  # small integers: dot products are exact, so there are many exact ties
        img = torch.randint(-1, 2, img.shape, generator=g).float()
        txt = torch.randint(-1, 2, txt.shape, generator=g).float()
    ref_i2t, ref_t2i = brute_force((img @ txt.T).tolist(), owner.tolist())
    for chunk in (1, 5, 1024):
        i2t, t2i = retrieval_ranks(img, txt, owner, chunk_size=chunk)
        assert torch.equal(i2t, ref_i2t) and torch.equal(t2i, ref_t2i)


def test_retrieval_metrics_hand_made():
    # 3 images; captions 0,1 -> image 0; caption 2 -> image 1; caption 3 -> image 2
    sim = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.0],  # image 0: best own caption (0.9) ranks first -> rank 0
            [0.8, 0.0, 0.7, 0.0],  # image 1: caption 0 (0.8) beats own 0.7 -> rank 1
            [0.3, 0.2, 0.9, 0.4],  # image 2: caption 2 (0.9) beats own 0.4 -> rank 1
        ]
    )
    owner = torch.tensor([0, 0, 1, 2])
    # express sim as a dot product: image_emb = sim rows, text_emb = identity columns
    m = retrieval_metrics(sim, torch.eye(4), owner, ks=(1, 2))
    assert m["i2t_R@1"] == pytest.approx(1 / 3)
    assert m["i2t_R@2"] == pytest.approx(1.0)
    # text->image: caption0 column [0.1,0.8,0.3] own image 0 -> rank 2; caption1 [0.9,0,0.2] -> 0;
    # caption2 [0.5,0.7,0.9] own image 1 -> rank 1; caption3 [0,0,0.4] own image 2 -> 0
    assert m["t2i_R@1"] == pytest.approx(2 / 4)
    assert m["t2i_R@2"] == pytest.approx(3 / 4)
    assert m["mean_R@1"] == pytest.approx((1 / 3 + 0.5) / 2)
    assert m["rmean"] == pytest.approx((1 / 3 + 1 + 0.5 + 0.75) / 4)
    assert m["t2i_medr"] == pytest.approx(1.5)  # ranks+1 = [3,1,2,1]


def test_retrieval_collapsed_model_gets_no_free_hits():
    img = torch.ones(5, 4)
    txt = torch.ones(10, 4)
    m = retrieval_metrics(img, txt, torch.arange(10) // 2, ks=(1,))
    assert m["i2t_R@1"] == 0.0 and m["t2i_R@1"] == 0.0


def test_retrieval_rejects_images_without_captions():
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 1]))


def test_zeroshot_metrics_hand_made():
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: top1
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 1: rank 1 -> top5 only
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # label 0: rank 5 -> miss
            [0.2, 0.2, 0.0, 0.0, 0.0, 0.0],  # label 1: tie with class 0 -> pessimistic rank 1
        ]
    )
    labels = torch.tensor([0, 1, 0, 1])
    m = zeroshot_metrics(logits, labels)
    assert m["top1"] == pytest.approx(0.25)
    assert m["top5"] == pytest.approx(0.75)
    assert m["mean_per_class_recall"] == pytest.approx((0.5 + 0.0) / 2)
    assert "top5" not in zeroshot_metrics(logits[:, :4], labels)


def test_param_groups_and_schedule():
    from lit_vlm.models import CLIP
    from lit_vlm.modules import TextTransformer, VisionTransformer

    model = CLIP(VisionTransformer("tiny"), TextTransformer("tiny"), embed_dim=16)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    for expected in ("logit_scale", "vision.class_embedding", "vision.positional_embedding", "text.token_embedding.weight"):
        assert expected in no_decay_names
    assert not any(n.endswith(".bias") or "ln" in n.split(".")[-2] for n in decay_names if n.count("."))
    assert "image_projection.weight" in decay_names
    f = warmup_cosine(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0, abs=1e-12)
