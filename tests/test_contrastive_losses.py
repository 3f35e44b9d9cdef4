"""SigLIP, focal and FILIP losses against hand-computed cases and plain reference implementations."""

import math

import pytest
import torch
import torch.nn.functional as F

from lit_vlm.distributed import gather_no_grad, ppermute
from lit_vlm.losses import clip_loss, filip_loss, filip_similarity, focal_clip_loss, get_loss, siglip_loss


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# 2 x 2 case shared by the hand computations: dot products [[1, 0.6], [0, 0.8]]
IMG = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
TXT = torch.tensor([[1.0, 0.0], [0.6, 0.8]])


def reference_siglip(img, txt, scale, bias):
    """-1/|B| sum_ij log sigmoid(z_ij (t x_i.y_j + b)), the formula of the paper with plain ops."""
    n = img.shape[0]
    z = 2 * torch.eye(n) - 1  # [n, n] +1 diagonal, -1 elsewhere
    logits = scale * img @ txt.T + bias  # [n, n]
    return -torch.log(torch.sigmoid(z * logits)).sum() / n


def random_case(n=8, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g) + 0.8 * img, dim=-1)  # correlated with the pairs
    return img, txt


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


# ------------------------------------------------------------------ siglip


def test_siglip_hand_computed_2x2():
    # t = 2, b = -1: logits = 2 * dots - 1 = [[1, 0.2], [-1, 0.6]]; z = +1 on the diagonal
    expected = -(log_sigmoid(1.0) + log_sigmoid(-0.2) + log_sigmoid(1.0) + log_sigmoid(0.6)) / 2
    out = siglip_loss(IMG, TXT, torch.tensor(2.0), torch.tensor(-1.0))
    assert out["loss"].item() == pytest.approx(expected, abs=1e-6)
    for chunk in (1, 2, 3):
        chunked = siglip_loss(IMG, TXT, torch.tensor(2.0), torch.tensor(-1.0), chunk_size=chunk)
        assert chunked["loss"].item() == pytest.approx(expected, abs=1e-6)
    # the bias matters: b = 0 gives another value
    no_bias = siglip_loss(IMG, TXT, torch.tensor(2.0), torch.tensor(0.0))["loss"].item()
    assert no_bias != pytest.approx(expected, abs=1e-3)


def test_siglip_matches_plain_formula_and_its_gradients():
    img, txt = random_case()
    a = leaves(img, txt, torch.tensor(10.0), torch.tensor(-3.0))
    b = leaves(img, txt, torch.tensor(10.0), torch.tensor(-3.0))
    got = siglip_loss(*a)["loss"]
    ref = reference_siglip(*b)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    got.backward()
    ref.backward()
    for x, y in zip(a, b):
        assert torch.allclose(x.grad, y.grad, atol=1e-6), (x.grad, y.grad)


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 8, 100])
@pytest.mark.parametrize("mode", ["gather", "ring"])
def test_siglip_chunked_equals_unchunked(chunk, mode):
    img, txt = random_case(n=8, d=6, seed=3)
    a = leaves(img, txt, torch.tensor(7.0), torch.tensor(-2.5))
    b = leaves(img, txt, torch.tensor(7.0), torch.tensor(-2.5))
    full = siglip_loss(*a, mode=mode)["loss"]
    chunked = siglip_loss(*b, mode=mode, chunk_size=chunk)["loss"]
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    full.backward()
    chunked.backward()
    for name, x, y in zip(["image", "text", "scale", "bias"], a, b):
        assert torch.allclose(x.grad, y.grad, atol=1e-6, rtol=1e-5), name


def test_siglip_chunked_saves_only_its_inputs():
    """The chunked Function keeps O(B*D + N*D) for backward; plain autograd keeps [B, N] tensors."""
    n, d = 64, 4
    img, txt = random_case(n=n, d=d)

    def saved_numel(chunk):
        total = []

        def pack(t):
            total.append(t.numel())
            return t

        a = leaves(img, txt, torch.tensor(5.0), torch.tensor(-1.0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            siglip_loss(*a, chunk_size=chunk)["loss"].backward()
        return sum(total)

    assert saved_numel(None) >= n * n  # at least one full logit matrix
    assert saved_numel(8) <= 2 * n * d + 2  # the embeddings, scale and bias — nothing of size B x N


def test_siglip_rejects_bad_options():
    with pytest.raises(ValueError, match="mode must be one of .*'gather', 'ring'.*got 'allgather'"):
        siglip_loss(IMG, TXT, torch.tensor(1.0), torch.tensor(0.0), mode="allgather")
    with pytest.raises(ValueError, match="chunk_size"):
        siglip_loss(IMG, TXT, torch.tensor(1.0), torch.tensor(0.0), chunk_size=0)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        siglip_loss(IMG, TXT[:1], torch.tensor(1.0), torch.tensor(0.0))


def test_single_process_helpers_are_no_ops():
    x = torch.randn(3, 2)
    assert ppermute(x) is x
    assert gather_no_grad(x) is x
    img, txt = random_case()
    ring = siglip_loss(img, txt, torch.tensor(3.0), torch.tensor(-1.0), mode="ring")["loss"]
    gather = siglip_loss(img, txt, torch.tensor(3.0), torch.tensor(-1.0), mode="gather")["loss"]
    assert ring.item() == gather.item()


# ------------------------------------------------------------------ focal


def test_focal_sigmoid_hand_computed_2x2():
    # s = 2: logits [[2, 1.2], [0, 1.6]]; p = sigmoid(l) on the diagonal, 1 - sigmoid(l) off it
    gamma = 2.0
    terms = 0.0
    for logit, positive in [(2.0, True), (1.2, False), (0.0, False), (1.6, True)]:
        p = sigmoid(logit) if positive else 1 - sigmoid(logit)
        terms += -((1 - p) ** gamma) * math.log(p)
    expected = terms / 2  # -1/B sum_ij; the T2I direction sums the same four pairs
    out = focal_clip_loss(IMG, TXT, torch.tensor(2.0), gamma=gamma)
    assert out["loss"].item() == pytest.approx(expected, abs=1e-6)
    assert out["loss_i2t"].item() == pytest.approx(expected, abs=1e-6)
    assert out["loss_t2i"].item() == pytest.approx(expected, abs=1e-6)


def test_focal_softmax_hand_computed_2x2():
    gamma = 2.0
    # image rows [[2, 1.2], [0, 1.6]], text rows (transpose) [[2, 0], [1.2, 1.6]]
    def focal_row(pos, neg):
        p = math.exp(pos) / (math.exp(pos) + math.exp(neg))
        return -((1 - p) ** gamma) * math.log(p)

    i2t = (focal_row(2.0, 1.2) + focal_row(1.6, 0.0)) / 2
    t2i = (focal_row(2.0, 0.0) + focal_row(1.6, 1.2)) / 2
    out = focal_clip_loss(IMG, TXT, torch.tensor(2.0), gamma=gamma, form="softmax")
    assert out["loss_i2t"].item() == pytest.approx(i2t, abs=1e-6)
    assert out["loss_t2i"].item() == pytest.approx(t2i, abs=1e-6)
    assert out["loss"].item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)


def test_focal_gamma_zero_reduces_to_clip_and_siglip():
    img, txt = random_case()
    a, b = leaves(img, txt, torch.tensor(5.0)), leaves(img, txt, torch.tensor(5.0))
    focal = focal_clip_loss(*a, gamma=0.0, form="softmax")["loss"]
    clip = clip_loss(*b)["loss"]
    assert focal.item() == pytest.approx(clip.item(), rel=1e-6)
    focal.backward()
    clip.backward()
    for x, y in zip(a, b):
        assert torch.allclose(x.grad, y.grad, atol=1e-6)

    a, b = leaves(img, txt, torch.tensor(5.0)), leaves(img, txt, torch.tensor(5.0))
    focal = focal_clip_loss(*a, gamma=0.0, form="sigmoid")["loss"]
    sig = siglip_loss(*b, torch.tensor(0.0))["loss"]
    assert focal.item() == pytest.approx(sig.item(), rel=1e-6)
    focal.backward()
    sig.backward()
    for x, y in zip(a, b):
        assert torch.allclose(x.grad, y.grad, atol=1e-6)


@pytest.mark.parametrize("form", ["sigmoid", "softmax"])
def test_focal_down_weights(form):
    img, txt = random_case()
    values = [focal_clip_loss(img, txt, torch.tensor(5.0), gamma=g, form=form)["loss"].item() for g in (0.0, 1.0, 2.0)]
    assert values[0] > values[1] > values[2] > 0


def test_focal_rejects_bad_options():
    with pytest.raises(ValueError, match="form must be one of .*'sigmoid', 'softmax'.*got 'ce'"):
        focal_clip_loss(IMG, TXT, torch.tensor(1.0), form="ce")
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        focal_clip_loss(IMG, TXT, torch.tensor(1.0), gamma=-1.0)


# ------------------------------------------------------------------ FILIP


def loop_filip(image_tokens, text_tokens, text_mask, image_mask=None):
    """FILIP similarities with explicit loops over images, texts, patches and tokens."""
    n_img, n_patch, _ = image_tokens.shape
    n_txt, n_tok, _ = text_tokens.shape
    i2t = torch.zeros(n_img, n_txt, dtype=torch.float64)
    t2i = torch.zeros(n_img, n_txt, dtype=torch.float64)
    for i in range(n_img):
        patches = [k for k in range(n_patch) if image_mask is None or image_mask[i, k]]
        for j in range(n_txt):
            tokens = [r for r in range(n_tok) if text_mask[j, r]]
            dot = lambda k, r: float(image_tokens[i, k] @ text_tokens[j, r])  # noqa: E731
            i2t[i, j] = sum(max(dot(k, r) for r in tokens) for k in patches) / len(patches)
            t2i[i, j] = sum(max(dot(k, r) for k in patches) for r in tokens) / len(tokens)
    return i2t, t2i


def random_tokens(n=5, p=4, l=6, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    image_tokens = F.normalize(torch.randn(n, p, d, generator=g), dim=-1)
    text_tokens = F.normalize(torch.randn(n, l, d, generator=g), dim=-1)
    lengths = torch.tensor([6, 2, 4, 1, 5])[:n]
    text_mask = torch.arange(l)[None, :] < lengths[:, None]  # [n, l] right padding of various lengths
    text_tokens = torch.where(text_mask[..., None], text_tokens, torch.full_like(text_tokens, 5.0))  # padding is loud
    return image_tokens, text_tokens, text_mask


def test_filip_similarity_hand_computed():
    # one image with 2 patches, one text with 2 real tokens and a padding token that would win every max
    image_tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [1, 2, 2]
    text_tokens = torch.tensor([[[0.6, 0.8], [1.0, 0.0], [9.0, 9.0]]])  # [1, 3, 2]
    text_mask = torch.tensor([[True, True, False]])
    i2t, t2i = filip_similarity(image_tokens, text_tokens, text_mask)
    # scores patch x token: [[0.6, 1.0], [0.8, 0.0]]
    # i2t: patch 0 best 1.0, patch 1 best 0.8 -> 0.9; t2i: token 0 best 0.8, token 1 best 1.0 -> 0.9
    assert i2t.item() == pytest.approx(0.9) and t2i.item() == pytest.approx(0.9)
    # drop patch 1: i2t = 1.0; t2i: token 0 -> 0.6, token 1 -> 1.0 -> 0.8
    i2t, t2i = filip_similarity(image_tokens, text_tokens, text_mask, image_mask=torch.tensor([[True, False]]))
    assert i2t.item() == pytest.approx(1.0) and t2i.item() == pytest.approx(0.8)


@pytest.mark.parametrize("chunk", [None, 1, 2, 5])
@pytest.mark.parametrize("with_image_mask", [False, True])
def test_filip_similarity_matches_loops(chunk, with_image_mask):
    image_tokens, text_tokens, text_mask = random_tokens()
    image_mask = None
    if with_image_mask:
        image_mask = torch.ones(5, 4, dtype=torch.bool)
        image_mask[1, 1:] = False
        image_mask[3, 0] = False
    i2t, t2i = filip_similarity(image_tokens, text_tokens, text_mask, image_mask, chunk_size=chunk)
    ref_i2t, ref_t2i = loop_filip(image_tokens, text_tokens, text_mask, image_mask)
    assert torch.allclose(i2t.double(), ref_i2t, atol=1e-6)
    assert torch.allclose(t2i.double(), ref_t2i, atol=1e-6)
    assert not torch.allclose(i2t, t2i)  # the two directions are different quantities


def test_filip_loss_is_infonce_over_filip_similarities():
    image_tokens, text_tokens, text_mask = random_tokens(seed=2)
    a = leaves(image_tokens, text_tokens)
    out = filip_loss(a[0], a[1], text_mask, torch.tensor(4.0))
    ref_i2t, ref_t2i = loop_filip(image_tokens, text_tokens, text_mask)
    labels = torch.arange(5)
    l_i = F.cross_entropy(4.0 * ref_i2t, labels)  # image i against texts j: rows of s^I
    l_t = F.cross_entropy(4.0 * ref_t2i.T, labels)  # text j against images i: columns of s^T
    assert out["loss_i2t"].item() == pytest.approx(l_i.item(), abs=1e-6)
    assert out["loss_t2i"].item() == pytest.approx(l_t.item(), abs=1e-6)
    assert out["loss"].item() == pytest.approx((l_i + l_t).item() / 2, abs=1e-6)
    out["loss"].backward()
    assert a[1].grad[~text_mask].abs().max().item() == 0.0  # padding gets no gradient
    assert a[1].grad[text_mask].abs().max().item() > 0
    # chunking does not change the value
    chunked = filip_loss(image_tokens, text_tokens, text_mask, torch.tensor(4.0), chunk_size=2)
    assert chunked["loss"].item() == pytest.approx(out["loss"].item(), abs=1e-6)


def test_filip_rejects_empty_and_misshaped_masks():
    image_tokens, text_tokens, text_mask = random_tokens()
    empty = text_mask.clone()
    empty[2] = False
    with pytest.raises(ValueError, match=r"text_mask rows \[2\] have no valid token"):
        filip_similarity(image_tokens, text_tokens, empty)
    with pytest.raises(ValueError, match=r"text_mask must have shape \[5, 6\]"):
        filip_similarity(image_tokens, text_tokens, text_mask[:, :3])
    with pytest.raises(ValueError, match=r"image_mask rows \[0, 1, 2, 3, 4\] have no valid token"):
        filip_similarity(image_tokens, text_tokens, text_mask, image_mask=torch.zeros(5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="same D"):
        filip_similarity(image_tokens, text_tokens[..., :2], text_mask)


# ------------------------------------------------------------------ lookup


def test_hard_negatives_are_extra_image_to_text_columns_hand_computed():
    # IMG x TXT dot products [[1, 0.6], [0, 0.8]]; one negative per caption, the second row masked out
    neg = torch.tensor([[[0.8, 0.6]], [[0.0, -1.0]]])  # [B=2, K=1, D]
    valid = torch.tensor([[True], [False]])
    out = clip_loss(IMG, TXT, torch.tensor(1.0), negative_emb=neg, negative_valid=valid)
    # image 0: logits [1, 0.6 | 0.8]; image 1: [0, 0.8 | 0.6] (the masked negative is not a column)
    i2t = (-math.log(math.e / (math.e + math.exp(0.6) + math.exp(0.8)))
           - math.log(math.exp(0.8) / (1 + math.exp(0.8) + math.exp(0.6)))) / 2
    t2i = (-math.log(math.e / (math.e + 1)) - math.log(math.exp(0.8) / (math.exp(0.6) + math.exp(0.8)))) / 2  # unchanged
    assert out["loss_i2t"].item() == pytest.approx(i2t, abs=1e-6)
    assert out["loss_t2i"].item() == pytest.approx(t2i, abs=1e-6)
    assert out["loss"].item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    # SigLIP: one more negative pair per image (bias 0, scale 1): -log sigmoid(-0.8) - log sigmoid(-0.6), / B
    base = siglip_loss(IMG, TXT, 1.0, 0.0)["loss"].item()
    more = siglip_loss(IMG, TXT, 1.0, 0.0, negative_emb=neg, negative_valid=valid)["loss"].item()
    assert more - base == pytest.approx(-(log_sigmoid(-0.8) + log_sigmoid(-0.6)) / 2, abs=1e-6)
    # focal softmax with gamma 0 is CLIP, negatives included
    focal = focal_clip_loss(IMG, TXT, torch.tensor(1.0), gamma=0.0, form="softmax", negative_emb=neg, negative_valid=valid)
    assert focal["loss"].item() == pytest.approx(out["loss"].item(), abs=1e-6)


def test_get_loss_by_name_and_errors_name_the_choices():
    assert get_loss("clip") is clip_loss
    assert get_loss("siglip") is siglip_loss
    assert get_loss("focal") is focal_clip_loss
    with pytest.raises(ValueError, match="unknown loss 'sigclip'; valid choices: clip, siglip, focal"):
        get_loss("sigclip")
