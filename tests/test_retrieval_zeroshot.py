"""Retrieval and zero-shot evaluation: chunked metrics against a plain full-argsort reference,
hand-worked cases, the tie rule, the callbacks' empty-rank path and their TensorBoard logs."""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger

import lit_vlm.callbacks.base as base
from lit_vlm.callbacks import RetrievalEvaluation, ZeroShotEvaluation
from lit_vlm.callbacks.visuals import image_grid, make_thumbnail, ranked
from lit_vlm.callbacks.zeroshot import class_embeddings
from lit_vlm.errors import UserError
from lit_vlm.metrics import (
    confusion_matrix,
    retrieval_metrics,
    retrieval_metrics_from_ranks,
    retrieval_metrics_from_similarity,
    retrieval_ranks,
    retrieval_ranks_from_similarity,
    zeroshot_metrics,
    zeroshot_predictions,
)

# --------------------------------------------------------------------------------------------
# Reference: full argsort of every row of the full similarity matrix
# --------------------------------------------------------------------------------------------


def argsort_reference(sim: list[list[float]], owner: list[int]) -> tuple[list[int], list[int]]:
    """0-based ranks by sorting every row / column completely.

    Tie rule written out: at equal score, wrong candidates are placed before correct ones.
    i2t rank = position of the first own caption in the image's sorted row;
    t2i rank = position of the own image in the caption's sorted column."""
    n_img, n_txt = len(sim), len(sim[0])
    i2t = []
    for i in range(n_img):
        order = sorted(range(n_txt), key=lambda j: (-sim[i][j], owner[j] == i))
        i2t.append(next(pos for pos, j in enumerate(order) if owner[j] == i))
    t2i = []
    for j in range(n_txt):
        order = sorted(range(n_img), key=lambda i: (-sim[i][j], i == owner[j]))
        t2i.append(order.index(owner[j]))
    return i2t, t2i


def reference_metrics(i2t: list[int], t2i: list[int], ks=(1, 5, 10)) -> dict[str, float]:
    out = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = sum(x < k for x in r) / len(r)
        out[f"{name}_medr"] = statistics.median(x + 1 for x in r)
        out[f"{name}_meanr"] = sum(x + 1 for x in r) / len(r)
    recalls = [out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks]
    out["rsum"] = sum(recalls)
    out["rmean"] = sum(recalls) / len(recalls)
    out["mean_R@1"] = (out["i2t_R@1"] + out["t2i_R@1"]) / 2
    return out


def random_problem(seed: int, ties: bool, n_img: int = 17, dim: int = 6):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 8, (n_img,), generator=g)  # 1..7 captions per image, varying
    owner = torch.repeat_interleave(torch.arange(n_img), counts)  # [T]
    owner = owner[torch.randperm(len(owner), generator=g)]  # captions in any order
    if ties:  # small integers: exact dot products, many exact ties
        img = torch.randint(-1, 2, (n_img, dim), generator=g).float()
        txt = torch.randint(-1, 2, (len(owner), dim), generator=g).float()
    else:
        img = F.normalize(torch.randn(n_img, dim, generator=g), dim=-1)
        txt = F.normalize(torch.randn(len(owner), dim, generator=g), dim=-1)
    return img, txt, owner


CHUNKS = (1, 2, 5, 16, 1000)  # 1, uneven, and larger than the whole set


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_chunked_ranks_equal_full_argsort(seed, ties):
    img, txt, owner = random_problem(seed, ties)
    sim = img @ txt.T  # [I, T]
    ref_i2t, ref_t2i = argsort_reference(sim.tolist(), owner.tolist())
    if ties:
        # the case really has ties that matter: a naive stable argsort by index would differ
        assert (sim.unsqueeze(-1) == sim.unsqueeze(-2)).sum() > sim.numel()
    for chunk in CHUNKS:
        i2t, t2i = retrieval_ranks_from_similarity(sim, owner, chunk_size=chunk)
        assert i2t.tolist() == ref_i2t and t2i.tolist() == ref_t2i, chunk
        i2t, t2i = retrieval_ranks(img, txt, owner, chunk_size=chunk)
        assert i2t.tolist() == ref_i2t and t2i.tolist() == ref_t2i, chunk
        expected = reference_metrics(ref_i2t, ref_t2i)
        for got in (
            retrieval_metrics(img, txt, owner, chunk_size=chunk),
            retrieval_metrics_from_similarity(sim, owner, chunk_size=chunk),
        ):
            assert got.keys() == expected.keys()
            for key, value in expected.items():
                assert got[key] == pytest.approx(value, abs=1e-12), (chunk, key)


def test_integer_similarity_ties_and_ordering_helper():
    """Integer-valued similarity (many ties): chunked ranks = reference, and the display order used
    by the example logs puts the first correct item exactly at the metric's rank."""
    g = torch.Generator().manual_seed(7)
    owner = torch.repeat_interleave(torch.arange(9), torch.randint(1, 8, (9,), generator=g))  # [T]
    sim = torch.randint(0, 3, (9, len(owner)), generator=g).float()  # [I, T]
    ref_i2t, ref_t2i = argsort_reference(sim.tolist(), owner.tolist())
    for scores in (sim, sim.long(), sim.double()):  # integer matrices are compared exactly too
        i2t, t2i = retrieval_ranks_from_similarity(scores, owner, chunk_size=4)
        assert i2t.tolist() == ref_i2t and t2i.tolist() == ref_t2i
    for i in range(sim.shape[0]):
        correct = owner == i
        assert int(correct[ranked(sim[i], correct)].nonzero()[0, 0]) == ref_i2t[i]
    for j in range(sim.shape[1]):
        correct = torch.arange(sim.shape[0]) == owner[j]
        assert int(correct[ranked(sim[:, j], correct)].nonzero()[0, 0]) == ref_t2i[j]


def test_plain_counting_path_for_very_long_rows(monkeypatch):
    """Rows of >= 2**24 candidates are counted without the float32 buffer (exactness); exercise
    that path by lowering the threshold, with float32 and float64 inputs."""
    import lit_vlm.metrics as metrics

    img, txt, owner = random_problem(5, ties=True)
    ref_i2t, ref_t2i = argsort_reference((img @ txt.T).tolist(), owner.tolist())
    monkeypatch.setattr(metrics, "_FLOAT32_EXACT", 1)
    for a, b in ((img, txt), (img.double(), txt.double())):
        i2t, t2i = retrieval_ranks(a, b, owner, chunk_size=3)
        assert i2t.tolist() == ref_i2t and t2i.tolist() == ref_t2i
        i2t, t2i = retrieval_ranks_from_similarity(a @ b.T, owner, chunk_size=3)
        assert i2t.tolist() == ref_i2t and t2i.tolist() == ref_t2i


# 3 images, 6 captions: captions 0,1 -> image 0; 2,3,4 -> image 1; 5 -> image 2
HAND_SIM = torch.tensor(
    [
        [0.9, 0.2, 0.5, 0.7, 0.0, 0.3],
        [0.4, 0.6, 0.8, 0.7, 0.2, 0.8],
        [0.5, 0.1, 0.3, 0.2, 0.6, 0.4],
    ]
)
HAND_OWNER = torch.tensor([0, 0, 1, 1, 1, 2])


def test_hand_made_3x6():
    # i2t: image 0: best own 0.9, nothing higher -> 0.
    #      image 1: best own 0.8 (caption 2) TIED with caption 5 of image 2 -> pessimistic rank 1.
    #      image 2: own 0.4; captions 0 (0.5) and 4 (0.6) higher -> 2.
    # t2i: c0 [.9,.4,.5] own 0 -> 0;  c1 [.2,.6,.1] own 0 -> 1;  c2 [.5,.8,.3] own 1 -> 0;
    #      c3 [.7,.7,.2] own 1, TIED with image 0 -> 1;  c4 [0,.2,.6] own 1 -> 1;  c5 [.3,.8,.4] own 2 -> 1.
    i2t, t2i = retrieval_ranks_from_similarity(HAND_SIM, HAND_OWNER)
    assert i2t.tolist() == [0, 1, 2]
    assert t2i.tolist() == [0, 1, 0, 1, 1, 1]
    expected = {
        "i2t_R@1": 1 / 3, "i2t_R@5": 1.0, "i2t_R@10": 1.0,
        "i2t_medr": 2.0, "i2t_meanr": 2.0,  # 1-based [1, 2, 3]
        "t2i_R@1": 2 / 6, "t2i_R@5": 1.0, "t2i_R@10": 1.0,
        "t2i_medr": 2.0,  # 1-based sorted [1, 1, 2, 2, 2, 2]: middle two are 2 and 2
        "t2i_meanr": 10 / 6,
        "rsum": 1 / 3 + 1 + 1 + 1 / 3 + 1 + 1,  # = 14/3, fractions (LAVIS/VSE report x100)
        "rmean": 14 / 18,
        "mean_R@1": 1 / 3,
    }  # fmt: skip
    for m in (
        retrieval_metrics_from_similarity(HAND_SIM, HAND_OWNER, chunk_size=2),
        retrieval_metrics(HAND_SIM, torch.eye(6), HAND_OWNER, chunk_size=1),  # image rows . identity = sim
    ):
        assert m.keys() == expected.keys()
        for key, value in expected.items():
            assert m[key] == pytest.approx(value, abs=1e-12), key


def test_median_of_even_count_and_optional_mean_r1():
    m = retrieval_metrics_from_ranks(torch.tensor([0, 3]), torch.tensor([0, 0, 1, 5]), ks=(2,))
    assert m["i2t_medr"] == 2.5 and m["t2i_medr"] == 1.5  # mean of the middle two (1-based)
    assert "mean_R@1" not in m and m["rsum"] == pytest.approx(0.5 + 0.75) and m["rmean"] == pytest.approx(1.25 / 2)


def test_retrieval_bad_input_is_named():
    with pytest.raises(ValueError, match=r"image rows \[1\]"):
        retrieval_metrics_from_similarity(torch.zeros(3, 2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="out of range"):
        retrieval_metrics_from_similarity(torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        retrieval_metrics_from_similarity(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same D"):
        retrieval_metrics(torch.zeros(2, 4), torch.zeros(2, 3), torch.tensor([0, 1]))
    sim = HAND_SIM.clone()
    sim[2, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN similarity for image row 2"):
        retrieval_metrics_from_similarity(sim, HAND_OWNER, chunk_size=2)
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics_from_similarity(HAND_SIM, HAND_OWNER, chunk_size=0)
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics_from_similarity(HAND_SIM, HAND_OWNER, ks=(0,))


# --------------------------------------------------------------------------------------------
# Zero-shot
# --------------------------------------------------------------------------------------------


class PromptTokenizer:
    """Tokenises a prompt to its index in a fixed list (one id per prompt)."""

    def __init__(self, prompts: list[str]) -> None:
        self.prompts = prompts

    def encode(self, texts, context_length):
        ids = torch.tensor([[self.prompts.index(t)] + [0] * (context_length - 1) for t in texts])  # [N, L]
        return ids, torch.ones_like(ids, dtype=torch.bool)


class PromptEncoder:
    device = torch.device("cpu")

    def __init__(self, vectors: torch.Tensor) -> None:
        self.vectors = vectors  # [P, E]

    def encode_text(self, ids, mask):
        return self.vectors[ids[:, 0]]  # [N, E]


def test_class_embeddings_mean_of_normalised_templates_renormalised():
    prompts = ["a cat", "the cat", "a dog", "the dog"]
    vectors = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    emb = class_embeddings(PromptEncoder(vectors), PromptTokenizer(prompts), 4, ["cat", "dog"], ["a {}", "the {}"])
    # cat: mean([.6, .8, 0], [0, 0, 1]) = [.3, .4, .5], norm sqrt(.5)   (raw mean [1.5, 2, 1] points elsewhere)
    # dog: mean([1, 0, 0], [0, 1, 0]) = [.5, .5, 0], norm sqrt(.5)      (raw mean [.5, 5, 0] points elsewhere)
    s = 0.5**0.5
    expected = torch.tensor([[0.3 / s, 0.4 / s, 0.5 / s], [0.5 / s, 0.5 / s, 0.0]])
    assert torch.allclose(emb, expected, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        class_embeddings(PromptEncoder(vectors), PromptTokenizer(prompts), 4, ["cat"], ["{} {}"])


def test_zeroshot_top5_only_with_five_classes_and_mean_per_class_recall():
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0],  # label 0: hit
            [0.8, 0.1, 0.9, 0.0, 0.0],  # label 0: rank 1 (class 2 higher)
            [0.5, 0.2, 0.1, 0.0, 0.0],  # label 0: hit
            [0.3, 0.3, 0.0, 0.0, 0.0],  # label 1: tied with class 0 -> pessimistic miss
        ]
    )
    labels = torch.tensor([0, 0, 0, 1])
    m = zeroshot_metrics(logits, labels)
    assert m["top1"] == pytest.approx(2 / 4)
    assert m["top5"] == pytest.approx(1.0)
    # per-class recall over the classes present (0 and 1; classes 2-4 have no samples): (2/3 + 0) / 2
    assert m["mean_per_class_recall"] == pytest.approx(1 / 3)
    assert "top5" not in zeroshot_metrics(logits[:, :4], labels)
    preds = zeroshot_predictions(logits, labels)
    assert preds.tolist() == [0, 2, 0, 0]  # the tie goes against the true class
    assert (preds == labels).double().mean().item() == m["top1"]
    cm = confusion_matrix(labels, preds, 5)
    assert cm[0].tolist() == [2, 0, 1, 0, 0] and cm[1].tolist() == [1, 0, 0, 0, 0] and int(cm.sum()) == 4
    with pytest.raises(ValueError, match=r"labels out of range \[0, 5\) at rows \[1\]"):
        zeroshot_metrics(logits, torch.tensor([0, 7, 0, 1]))


# --------------------------------------------------------------------------------------------
# Callbacks: fake family and data
# --------------------------------------------------------------------------------------------

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
CLASSES = ["red", "green", "blue", "grey", "black"]


class FakeFamily(pl.LightningModule):
    """encode_image: mean colour per channel projected; encode_text: embedding of the first token."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3, 4)
        self.tok = torch.nn.Embedding(64, 4)

    def encode_image(self, images):
        return F.normalize(self.proj(images.mean(dim=(2, 3))), dim=-1)  # [B, 4]

    def encode_text(self, ids, mask):
        return F.normalize(self.tok(ids[:, 1]), dim=-1)  # [N, 4]

    def validation_step(self, batch, batch_idx):
        return None

    def test_step(self, batch, batch_idx):
        return None


class FakeTokenizer:
    def encode(self, texts, context_length):
        ids = torch.zeros(len(texts), context_length, dtype=torch.long)  # [N, L]
        for row, t in enumerate(texts):
            ids[row, 1] = sum(map(ord, t)) % 64
        return ids, ids >= 0


def make_batches(n_images: int = 13, batch_size: int = 4, seed: int = 0, unlabelled: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, n_images, batch_size):
        rows = range(start, min(start + batch_size, n_images))
        raw = torch.rand(len(rows), 3, 8, 8, generator=g)  # [B, 3, 8, 8] in [0, 1]
        images = (raw - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)  # [B, 3, 8, 8] normalised
        captions = [[f"caption {k} of image {i}" for k in range(1 + i % 3)] for i in rows]
        flat = [c for cs in captions for c in cs]
        ids, mask = FakeTokenizer().encode(flat, 6)  # [N, 6]
        owner = torch.tensor([r for r, cs in enumerate(captions) for _ in cs])  # [N]
        labels = torch.tensor([-1 if unlabelled or i % 4 == 3 else i % 5 for i in rows])  # [B]
        batches.append(
            {
                "image": images,
                "sample_id": [f"s{i:03d}" for i in rows],
                "caption_ids": ids,
                "caption_mask": mask,
                "caption_owner": owner,
                "captions": captions,
                "label": labels,
            }
        )
    return batches


class FakeData(pl.LightningDataModule):
    def __init__(self, batches: list[dict]) -> None:
        super().__init__()
        self.batches = batches
        self.tokenizer = FakeTokenizer()
        self.context_length = 6
        self.classnames = CLASSES
        self.templates = ["a {} photo", "the {} one"]
        self.mean, self.std = MEAN, STD

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.batches, batch_size=None)


def fake_trainer(dm, tmp_path: Path | None = None) -> SimpleNamespace:
    loggers = [TensorBoardLogger(str(tmp_path))] if tmp_path is not None else []
    return SimpleNamespace(sanity_checking=False, datamodule=dm, loggers=loggers, is_global_zero=True, global_step=0)


class Recorder:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def __call__(self, name, value, **kwargs):
        self.logged[name] = value


def run_epoch(cb, trainer, module, batches) -> None:
    cb.on_validation_epoch_start(trainer, module)
    for n, b in enumerate(batches):
        cb.on_validation_batch_end(trainer, module, None, b, n)
    cb.on_validation_epoch_end(trainer, module)


def test_thumbnail_and_grid():
    raw = torch.rand(3, 128, 96)  # [3, H, W] in [0, 1]
    norm = (torch.tensor(MEAN), torch.tensor(STD))
    x = (raw - norm[0].view(3, 1, 1)) / norm[1].view(3, 1, 1)
    thumb = make_thumbnail(x, norm, size=128)
    assert thumb.dtype == torch.uint8 and thumb.shape == (3, 128, 96)
    assert (thumb.int() - (raw * 255).round().int()).abs().max() <= 1  # de-normalised exactly
    small = make_thumbnail(x, norm, size=64)
    assert small.shape == (3, 64, 48)
    flat = make_thumbnail(torch.full((3, 4, 4), 7.0), None)  # min-max of a constant image: black
    assert int(flat.max()) == 0
    grid = image_grid([small, None], [(0, 255, 0), (9, 9, 9)], size=64, border=3)
    assert grid.shape == (3, 70, 140)
    assert grid[:, 0, 0].tolist() == [0, 255, 0] and grid[:, 0, 70].tolist() == [9, 9, 9]


def test_thumbnails_only_for_first_records_per_rank_and_unlabelled_ignored(tmp_path):
    dm = FakeData(make_batches())
    trainer, module = fake_trainer(dm, tmp_path), FakeFamily()
    module.log = Recorder()
    retrieval = RetrievalEvaluation(splits=["val"], thumbnails=3)
    zeroshot = ZeroShotEvaluation(splits=["val"], num_examples=2)
    seen: dict[str, list] = {}
    for cb in (retrieval, zeroshot):
        original = cb.compute

        def spy(records, cb=cb, original=original):
            seen[type(cb).__name__] = records
            return original(records)

        cb.compute = spy
        run_epoch(cb, trainer, module, dm.batches)
    r = seen["RetrievalEvaluation"]
    assert [x["id"] for x in r if "thumb" in x] == ["s000", "s001", "s002"]
    for x in r:
        i = int(x["id"][1:])
        assert x["texts"] == [f"caption {k} of image {i}" for k in range(1 + i % 3)]
    z = seen["ZeroShotEvaluation"]
    assert [x["id"] for x in z if "thumb" in x] == ["s000", "s001"]
    labelled = [f"s{i:03d}" for i in range(13) if i % 4 != 3]
    assert [x["id"] for x in z] == labelled  # the -1 samples are left out
    logits = torch.stack([x["logits"] for x in z])
    expected = zeroshot_metrics(logits, torch.tensor([int(s[1:]) % 5 for s in labelled]))
    assert {k: module.log.logged[f"val/zeroshot/{k}"] for k in expected} == expected
    assert module.log.logged["val/zeroshot/num_samples"] == len(labelled)


def test_callback_bad_input_names_the_sample():
    batches = make_batches(n_images=4)
    dm, module = FakeData(batches), FakeFamily()
    zeroshot = ZeroShotEvaluation(splits=["val"])
    zeroshot.setup_epoch(fake_trainer(dm), module, "val")
    bad = dict(batches[0], label=torch.tensor([0, 9, 1, 2]))
    with pytest.raises(ValueError, match="sample s001 has label 9 but there are 5 class names"):
        zeroshot.collect(fake_trainer(dm), module, bad)
    retrieval = RetrievalEvaluation(splits=["val"])
    retrieval.setup_epoch(fake_trainer(dm), module, "val")
    orphan = dict(batches[0], caption_owner=torch.tensor([0, 1, 1, 3, 3, 3, 3]))  # image row 2 owns nothing
    records = retrieval.collect(fake_trainer(dm), module, orphan)
    with pytest.raises(ValueError, match=r"without any caption, e.g. sample ids \['s002'\]"):
        retrieval.compute([records[k] for k in sorted(records)])
    short = dict(batches[0], caption_owner=torch.tensor([0, 1, 1, 3, 3, 3]))
    with pytest.raises(ValueError, match=r"caption_owner has 6 entries for 7 caption rows \(batch s000 .. s003\)"):
        retrieval.collect(fake_trainer(dm), module, short)
    with pytest.raises(UserError, match="caption_owner"):
        retrieval.collect(fake_trainer(dm), module, {k: v for k, v in batches[0].items() if k != "caption_owner"})


def test_rank_without_samples(monkeypatch, caplog):
    """A rank whose local record dict is empty still takes part (its gathered part is {}), and an
    empty merged set skips compute with a warning instead of failing."""
    batches = make_batches()
    dm = FakeData(batches)
    module = FakeFamily()

    # reference: one rank sees every sample
    single = RetrievalEvaluation(splits=["val"])
    module.log = Recorder()
    run_epoch(single, fake_trainer(dm), module, batches)
    reference = single.metrics["val"]

    # the samples all live on the "other" rank; this rank collects nothing
    other = RetrievalEvaluation(splits=["val"])
    other._start(fake_trainer(dm), module, "val")
    for b in batches:
        other._batch(fake_trainer(dm), module, b)
    remote = dict(other._records)
    gathered = []

    def two_ranks(obj):
        gathered.append(obj)
        return [obj, (remote, [])]  # (records, ids seen twice) of each rank

    monkeypatch.setattr(base, "all_gather_objects", two_ranks)
    empty_rank = RetrievalEvaluation(splits=["val"])
    module.log = Recorder()
    run_epoch(empty_rank, fake_trainer(dm), module, [])
    assert gathered == [({}, [])]
    assert empty_rank.metrics["val"] == reference
    assert module.log.logged["val/retrieval/num_samples"] == 13

    # nothing anywhere: compute is skipped with a warning, nothing logged
    monkeypatch.setattr(base, "all_gather_objects", lambda obj: [obj, ({}, [])])
    nothing = RetrievalEvaluation(splits=["val"])
    nothing.compute = lambda records: pytest.fail("compute called on an empty set")
    module.log = Recorder()
    with caplog.at_level(logging.WARNING, logger="lit_vlm.eval"):
        run_epoch(nothing, fake_trainer(dm), module, [])
    assert "no samples to evaluate on the val split" in caplog.text
    assert module.log.logged == {} and "val" not in nothing.metrics


# --------------------------------------------------------------------------------------------
# Real Trainer runs: metrics and TensorBoard logs
# --------------------------------------------------------------------------------------------


def read_events(run_dir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def text_of(acc, tag: str) -> str:
    return acc.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def test_trainer_validate_writes_metrics_and_examples(tmp_path, caplog):
    dm = FakeData(make_batches())
    logger = TensorBoardLogger(str(tmp_path), name="run", default_hp_metric=False)
    callbacks = [RetrievalEvaluation(splits=["val"], thumbnails=3), ZeroShotEvaluation(splits=["val"], num_examples=3)]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="lit_vlm.eval"):
        trainer.validate(FakeFamily(), datamodule=dm)
    assert "could not log examples" not in caplog.text
    acc = read_events(logger.log_dir)
    scalars = set(acc.Tags()["scalars"])
    for name in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_medr", "i2t_meanr", "rmean", "rsum", "mean_R@1"):
        assert f"val/retrieval/{name}" in scalars
    assert {"val/zeroshot/top1", "val/zeroshot/top5", "val/zeroshot/mean_per_class_recall"} <= scalars
    images = set(acc.Tags()["images"])
    assert {f"val/retrieval/t2i_example_{n}" for n in range(4)} | {"val/retrieval/i2t_example_images"} <= images
    assert {"val/zeroshot/confusion_matrix", "val/zeroshot/examples"} <= images
    grid = acc.Images("val/retrieval/t2i_example_0")[-1]
    assert (grid.width, grid.height) == (5 * 54, 54)  # five 48-px tiles with 3-px frames
    t2i = text_of(acc, "val/retrieval/t2i_examples")
    assert '"caption 0 of image 0"' in t2i and "ground truth" in t2i and "`s000`" in t2i
    i2t = text_of(acc, "val/retrieval/i2t_examples")
    assert "caption" in i2t and i2t.count("**Image") == 4
    cm = text_of(acc, "val/zeroshot/confusion_matrix")
    assert "| **red** |" in cm
    examples = text_of(acc, "val/zeroshot/examples")
    assert examples.count("true **") == 3


def test_trainer_all_unlabelled_zeroshot_is_skipped_with_warning(tmp_path, caplog):
    dm = FakeData(make_batches(n_images=6, unlabelled=True))
    callbacks = [RetrievalEvaluation(splits=["val"]), ZeroShotEvaluation(splits=["val"])]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="lit_vlm.eval"):
        (result,) = trainer.validate(FakeFamily(), datamodule=dm)
    assert "ZeroShotEvaluation: no samples to evaluate on the val split" in caplog.text
    assert result["val/retrieval/num_samples"] == 6
    assert not any(k.startswith("val/zeroshot/") for k in result)


def test_tiny_clip_on_synthetic_world_logs_examples(tmp_path):
    """The real DataModule and a tiny CLIP through ``Trainer.validate``: metrics and example logs."""
    from lit_vlm.datamodules import ImageTextDataModule
    from lit_vlm.models import CLIP
    from lit_vlm.modules import TextTransformer, VisionTransformer

    dm = ImageTextDataModule(
        root=str(tmp_path / "world"),
        synth_config={"num_train": 4, "num_val": 10, "num_test": 2, "shard_size": 8, "image_size": 32},
        image_size=32, context_length=32, eval_batch_size=4, num_workers=0,
    )  # fmt: skip
    torch.manual_seed(0)
    text = TextTransformer("tiny", vocab_size=dm.vocab_size, context_length=32)
    model = CLIP(VisionTransformer("tiny"), text, embed_dim=16)
    logger = TensorBoardLogger(str(tmp_path), name="run", default_hp_metric=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=logger,
        callbacks=[RetrievalEvaluation(splits=["val"]), ZeroShotEvaluation(splits=["val"])],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    (result,) = trainer.validate(model, datamodule=dm)
    assert result["val/retrieval/num_samples"] == 10 and 0 <= result["val/retrieval/i2t_R@1"] <= 1
    assert "val/zeroshot/top5" in result  # the synthetic world has 8 classes
    acc = read_events(logger.log_dir)
    assert {"val/retrieval/t2i_example_0", "val/retrieval/i2t_example_images", "val/zeroshot/examples"} <= set(
        acc.Tags()["images"]
    )
    # the batch contract's raw `captions` strings reach the example logs (not the "caption k of id" fallback)
    i2t = text_of(acc, "val/retrieval/i2t_examples")
    assert i2t.count('"') >= 2 * 5 and "caption 0 of" not in i2t


def test_a_sample_seen_twice_is_counted_once_and_named(caplog):
    batches = make_batches()
    dm = FakeData(batches)
    module = FakeFamily()
    module.log = Recorder()
    once = RetrievalEvaluation(splits=["val"])
    run_epoch(once, fake_trainer(dm), module, batches)
    module.log = Recorder()
    twice = RetrievalEvaluation(splits=["val"])
    with caplog.at_level(logging.WARNING, logger="lit_vlm.eval"):
        run_epoch(twice, fake_trainer(dm), module, batches + batches[:1])  # the first batch again
    assert twice.metrics["val"] == once.metrics["val"]  # never double-counted
    first_ids = list(batches[0]["sample_id"])
    assert f"{len(first_ids)} sample(s) of the val split came more than once" in caplog.text
    assert all(repr(i) in caplog.text for i in first_ids)


def test_markdown_escaping_of_user_text():
    """Escaped user text shows exactly as written in TensorBoard's own Markdown renderer (no stray
    backslashes, no markup, the table intact); line breaks become spaces."""
    import html
    import re

    from tensorboard.plugin_util import markdown_to_safe_html

    from lit_vlm.callbacks.base import md_code, md_escape

    texts = ["a <script>alert(1)</script> | **bold** _x_ [link](http://e) `c` #h", "&amp; 1 < 2 > 0 \\ end", "<b>x</b>"]
    for text in texts:
        rendered = markdown_to_safe_html(f"| caption | id |\n|---|---|\n| {md_escape(text)} | z |")
        cell = re.search(r"<tbody>\s*<tr>\s*<td>(.*?)</td>\s*<td>z</td>", rendered, re.S)
        assert cell is not None, rendered  # still one row of two cells
        assert html.unescape(cell.group(1)) == text  # shown as written: no markup, no backslashes
    escaped = md_escape("next\nline\u2028sep")
    assert escaped == "next line sep"
    assert md_code("id`1\n2") == "`id'1 2`"


class AudioFamily(pl.LightningModule):
    """A test double with a third modality: ``encode_audio`` of a clip [B, 6] (with a mask) and
    ``encode_text``; audio clip i and caption i share a direction, so retrieval is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.seen_mask = False

    def encode_audio(self, clips, mask):
        self.seen_mask = True
        return F.normalize(clips * mask, dim=-1)  # [B, 6]

    def encode_text(self, ids, mask):
        return F.normalize(torch.nn.functional.one_hot(ids[:, 1] % 6, 6).float() + 0.1, dim=-1)  # [N, 6]

    def encode_image(self, images):  # not used by an audio evaluation
        raise AssertionError("the audio evaluation must not encode images")


def audio_batches() -> list[dict]:
    batches = []
    for start in (0, 3):
        rows = list(range(start, start + 3))
        clips = torch.stack([F.one_hot(torch.tensor(i % 6), 6).float() for i in rows])  # [3, 6]
        ids = torch.zeros(3, 4, dtype=torch.long)
        ids[:, 1] = torch.tensor(rows)
        batches.append({
            "audio": clips, "audio_mask": torch.ones(3, 6), "sample_id": [f"a{i}" for i in rows],
            "caption_ids": ids, "caption_mask": torch.ones(3, 4, dtype=torch.bool), "caption_owner": torch.arange(3),
            "label": torch.tensor(rows) % 3,
        })
    return batches


def test_retrieval_and_zeroshot_of_a_third_modality_need_no_callback_change():
    """audio -> text retrieval and audio zero-shot through the unchanged callbacks, named a2t/t2a."""
    module, batches = AudioFamily(), audio_batches()
    dm = FakeData(batches)
    dm.classnames = ["c0", "c1", "c2"]
    cb = RetrievalEvaluation(splits=["val"], modalities=["audio", "text"], ks=[1, 5])
    rec = Recorder()
    module.log = rec
    run_epoch(cb, fake_trainer(dm), module, batches)
    assert module.seen_mask
    assert rec.logged["val/retrieval/a2t_R@1"] == 1.0 and rec.logged["val/retrieval/t2a_R@1"] == 1.0
    assert "val/retrieval/i2t_R@1" not in rec.logged and rec.logged["val/retrieval/mean_R@1"] == 1.0
    zs = ZeroShotEvaluation(splits=["val"], modality="audio")
    run_epoch(zs, fake_trainer(dm), module, batches)
    assert "val/zeroshot/top1" in rec.logged
    with pytest.raises(UserError, match=r"needs AudioFamily to implement encode_video"):
        RetrievalEvaluation(modalities=["video", "text"]).setup_epoch(fake_trainer(dm), module, "val")
    with pytest.raises(UserError, match="re-ranks image-text pairs only"):
        RetrievalEvaluation(modalities=["audio", "text"], rerank_k=4)


def test_missing_capability_names_the_protocol():
    from lit_vlm.capabilities import require

    with pytest.raises(UserError) as err:
        require(FakeFamily(), "pair_features", "score_pairs", by="RetrievalEvaluation")
    msg = str(err.value)
    assert "RetrievalEvaluation needs FakeFamily to implement pair_features, score_pairs" in msg
    assert "lit_vlm.capabilities.ScoresPairs" in msg and "\n" not in msg


def test_every_retrieved_image_shows_and_the_confusion_matrix_names_classes(tmp_path):
    """By default every evaluated image keeps a thumbnail, so no example tile is dark; the
    confusion-matrix image has a label column for the class names."""
    import io

    import numpy as np
    from PIL import Image

    dm = FakeData(make_batches(n_images=13))
    logger = TensorBoardLogger(str(tmp_path), name="run", default_hp_metric=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=logger, callbacks=[RetrievalEvaluation(splits=["val"]), ZeroShotEvaluation(splits=["val"])],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.validate(FakeFamily(), datamodule=dm)
    acc = read_events(logger.log_dir)
    for n in range(4):
        grid = np.asarray(Image.open(io.BytesIO(acc.Images(f"val/retrieval/t2i_example_{n}")[-1].encoded_image_string)))
        for tile in range(5):
            inner = grid[3:51, tile * 54 + 3 : tile * 54 + 51]  # [48, 48, 3] inside the frame
            assert not (inner == 60).all(), (n, tile)  # a thumbnail, not the dark placeholder
    cm = np.asarray(Image.open(io.BytesIO(acc.Images("val/zeroshot/confusion_matrix")[-1].encoded_image_string)))
    assert cm.shape[1] > cm.shape[0]  # the class-name column left of the square matrix
