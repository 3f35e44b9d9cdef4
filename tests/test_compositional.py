"""Compositional hard negatives (exact from the synthetic scenes, rule-based from text), their
batches and loss, and the ARO/SugarCrepe-style evaluation on hand-made and synthetic cases."""

from __future__ import annotations

import json
import re
import tarfile
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lit_vlm.callbacks import CompositionalEvaluation
from lit_vlm.datamodules import negatives
from lit_vlm.datamodules.synth import COLOURS, NEGATIVE_KINDS, SHAPES, SynthConfig, captions, captions_with_negatives, make_scene
from lit_vlm.errors import UserError

_PLURAL = {s + ("es" if s.endswith(("s", "x")) else "s"): s for s in SHAPES}
_PAIR = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join([*SHAPES, *_PLURAL])})\b")


def mentioned(text: str) -> set[tuple[str, str]]:
    """The colour-shape pairs a synthetic caption names."""
    return {(c, _PLURAL.get(s, s)) for c, s in _PAIR.findall(text)}


def test_synthetic_negatives_are_exact_and_leave_the_world_unchanged():
    config = SynthConfig()
    counts = dict.fromkeys(NEGATIVE_KINDS, 0)
    for seed in range(150):
        scene = make_scene(np.random.default_rng(seed), config, True)
        pairs = {(o.colour, o.shape) for o in scene.objects}
        caps, negs = captions_with_negatives(scene, np.random.default_rng(1000 + seed), 5, np.random.default_rng(seed))
        assert caps == captions(scene, np.random.default_rng(1000 + seed), 5)  # same texts from the same stream
        for caption, found in zip(caps, negs):
            assert mentioned(caption) == pairs  # every caption names every pair
            for kind, negative in found.items():
                counts[kind] += 1
                assert negative != caption
                if kind == "swap_objects":  # the same objects, in other places
                    assert mentioned(negative) == pairs
                else:  # names a colour-shape pair the scene lacks: false of the scene
                    assert mentioned(negative) - pairs, (caption, negative)
    assert all(n > 50 for n in counts.values()), counts


def test_rule_based_negatives_of_real_captions():
    g = torch.Generator().manual_seed(0)
    text = "A man in a red shirt rides a blue bicycle next to a dog."
    assert negatives.rule_based(text, "swap_attributes", g) == "a man in a blue shirt rides a red bicycle next to a dog."
    replaced = negatives.rule_based(text, "replace_attribute", g)
    assert replaced != text.lower() and len(replaced.split()) == len(text.split())
    assert negatives.rule_based("a cat on the left of the sofa", "swap_objects", g) == "a cat on the right of the sofa"
    assert negatives.rule_based("a photo", "replace_object", g) is None  # nothing to change
    picked = negatives.pick(text, None, 2, list(NEGATIVE_KINDS), g)
    assert len(picked) == 2 and len(set(picked)) == 2
    stored = {"replace_object": "x", "swap_objects": "y"}
    assert sorted(negatives.pick(text, stored, 5, list(NEGATIVE_KINDS), g)) == ["x", "y"]  # the stored ones only
    with pytest.raises(ValueError, match="replace_object"):
        negatives.check_kinds(["swap_everything"], "data negative_kinds")


def test_training_batches_carry_exact_negatives_and_clip_scores_them(tmp_path):
    from lit_vlm.datamodules import ImageTextDataModule
    from lit_vlm.models import CLIP
    from lit_vlm.modules import TextTransformer, VisionTransformer

    dm = ImageTextDataModule(
        root=str(tmp_path / "world"), synth_config={"num_train": 16, "num_val": 4, "num_test": 4, "shard_size": 8, "image_size": 32},
        image_size=32, context_length=48, batch_size=8, num_workers=0, hard_negatives=2,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["negative_ids"].shape[:2] == (8, 2) and batch["negative_valid"].shape == (8, 2)
    assert batch["negative_valid"].sum() >= 12  # most captions have two kinds of negative
    stored = {}
    for shard in sorted((tmp_path / "world" / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    rec = json.loads(tar.extractfile(m).read())
                    stored[rec["key"]] = {t for ns in rec["negatives"] for t in ns.values()}
    tok = dm.tokenizer
    for row, key in enumerate(batch["sample_id"]):
        for j in range(2):
            if batch["negative_valid"][row, j]:
                text = tok.decode(batch["negative_ids"][row, j].tolist())  # word tokens, spaced
                assert text.replace(" ", "") in {t.replace(" ", "") for t in stored[key]}
    torch.manual_seed(0)
    model = CLIP(VisionTransformer("tiny"), TextTransformer("tiny", vocab_size=dm.vocab_size, context_length=48), embed_dim=16)
    with_negatives = model(batch)["loss"]
    plain = model({k: v for k, v in batch.items() if not k.startswith("negative_")})["loss"]
    assert torch.isfinite(with_negatives) and with_negatives.item() > plain.item()  # more negatives, larger loss
    with pytest.raises(UserError, match="hard_negatives"):
        ImageTextDataModule(root=str(tmp_path / "world"), hard_negatives=-1)
    with pytest.raises(UserError, match="negative_kinds"):
        ImageTextDataModule(root=str(tmp_path / "world"), hard_negatives=1, negative_kinds=["nonsense"])


class TableTokenizer:
    """Each text is one token: its index in a fixed list."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def encode(self, texts, context_length):
        ids = torch.tensor([[self.texts.index(t)] for t in texts])
        return ids, torch.ones_like(ids, dtype=torch.bool)


class TableModel(torch.nn.Module):
    """Images are their own embeddings; texts look theirs up in a table."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.device = torch.device("cpu")

    def encode_image(self, images, normalize=True):
        return images

    def encode_text(self, ids, mask=None, normalize=True):
        return self.table[ids[:, 0]]


def test_compositional_accuracy_hand_made(tmp_path):
    texts = ["red circle", "blue circle", "red square", "green circle", "a", "b"]
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.6, 0.8], [0.8, 0.6], [0.8, 0.6]])
    items = [  # image 1 = [1, 0]: right (1 > 0), a tie (0.6 = 0.6: wrong); image 2 = [0, 1]: wrong (0.6 < 0.8)
        {"image_id": 1, "kind": "replace_attribute", "caption": "red circle", "negative": "blue circle", "heldout": False},
        {"image_id": 1, "kind": "replace_object", "caption": "red square", "negative": "green circle", "heldout": False},
        {"image_id": 2, "kind": "replace_attribute", "caption": "a", "negative": "b", "heldout": True},
        {"image_id": 9, "kind": "replace_attribute", "caption": "a", "negative": "b", "heldout": False},  # not evaluated
    ]
    items[2]["negative"] = "red square"
    path = tmp_path / "compositional.json"
    path.write_text(json.dumps({"kinds": ["replace_object", "replace_attribute"], "items": items}))
    callback = CompositionalEvaluation(annotations=str(path))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(tokenizer=TableTokenizer(texts), context_length=1))
    model = TableModel(table)
    assert callback.setup_epoch(trainer, model, "test")
    batch = {"image": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "image_id": [1, 2], "sample_id": ["k1", "k2"]}
    records = callback.collect(trainer, model, batch)
    metrics = callback.compute([records["k1"], records["k2"]])
    assert metrics == {"replace_object": 0.0, "replace_attribute": 0.5, "seen/replace_object": 0.0,
                       "seen/replace_attribute": 1.0, "heldout/replace_attribute": 0.0, "mean": 0.25,
                       "seen/mean": 0.5, "heldout/mean": 0.0}
    scores = callback.sample_scores([records["k1"], records["k2"]])
    assert scores["replace_attribute"] == ([1.0, 0.0], [1.0, 1.0]) and scores["replace_object"] == ([0.0, 0.0], [1.0, 0.0])
    with pytest.raises(UserError, match="no compositional annotation file"):
        CompositionalEvaluation().setup_epoch(SimpleNamespace(datamodule=None), model, "test")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"items": [{"image_id": 1}]}))
    with pytest.raises(UserError, match="item 0 of .*bad.json lacks"):
        CompositionalEvaluation(annotations=str(bad)).setup_epoch(trainer, model, "test")


def test_tiny_clip_on_a_world_with_held_out_pairs(tmp_path):
    from lit_vlm.datamodules import ImageTextDataModule
    from lit_vlm.models import CLIP
    from lit_vlm.modules import TextTransformer, VisionTransformer

    holdout = [f"red {s}" for s in SHAPES]
    dm = ImageTextDataModule(
        root=str(tmp_path / "world"),
        synth_config={"num_train": 8, "num_val": 24, "num_test": 2, "shard_size": 8, "image_size": 32, "holdout": holdout},
        image_size=32, context_length=48, eval_batch_size=8, num_workers=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = CLIP(VisionTransformer("tiny"), TextTransformer("tiny", vocab_size=dm.vocab_size, context_length=48), embed_dim=16)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[CompositionalEvaluation(splits=["val"])],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    (result,) = trainer.validate(model, datamodule=dm)
    for kind in NEGATIVE_KINDS:
        assert 0 <= result[f"val/compositional/{kind}"] <= 1
    assert {"val/compositional/seen/mean", "val/compositional/heldout/mean"} <= set(result)
    data = json.loads((tmp_path / "world" / "annotations" / "compositional_val.json").read_text())
    assert any(i["heldout"] for i in data["items"]) and not all(i["heldout"] for i in data["items"])
    with tarfile.open(next((tmp_path / "world" / "train").glob("*.tar"))) as tar:  # training text never names a held-out pair
        texts = [t for m in tar.getmembers() if m.name.endswith(".json")
                 for rec in [json.loads(tar.extractfile(m).read())] for t in [*rec["captions"], *(v for n in rec["negatives"] for v in n.values())]]
    assert texts and not any(re.search(r"\bred\b", t) for t in texts)


def test_a_world_of_an_older_version_is_regenerated_in_place(tmp_path):
    from lit_vlm.datamodules import ImageTextDataModule, synth

    config = {"num_train": 8, "num_val": 4, "num_test": 4, "shard_size": 8, "image_size": 32}
    synth.generate(tmp_path / "world", synth.SynthConfig(**config), progress=False)
    manifest = json.loads((tmp_path / "world" / "manifest.json").read_text())
    manifest["version"] = 1  # as release 0.1 wrote it: no negatives, no compositional files
    (tmp_path / "world" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "world" / "annotations" / "compositional_test.json").unlink()
    dm = ImageTextDataModule(root=str(tmp_path / "world"), synth_config=config, image_size=32, num_workers=0)
    dm.prepare_data()
    assert synth.load_manifest(tmp_path / "world")["version"] == synth.VERSION
    assert (tmp_path / "world" / "annotations" / "compositional_test.json").is_file()
