"""Interleaved documents (MMC4, OBELICS): parsing, image placement and the token layout, by hand."""

from __future__ import annotations

import base64
import json
from collections import Counter

import pytest

from lit_vlm.datamodules.interleaved import (
    IGNORE_INDEX,
    DocumentLayout,
    assign_images,
    chunk_labels,
    document_ids,
    parse_document,
)
from lit_vlm.datamodules.transforms import BadSample
from lit_vlm.errors import UserError

IMG, END, BOS, EOS = 100, 101, 1, 2


def mmc4(similarity, matched=None, sentences=("s0", "s1", "s2"), with_bytes=True):
    info = []
    for i, row in enumerate(similarity):
        j = matched[i] if matched else max(range(len(row)), key=row.__getitem__)
        entry = {"image_name": f"im{i}.jpg", "raw_url": f"http://x/{i}", "matched_text_index": j, "matched_sim": row[j]}
        if with_bytes:
            entry["image_base64"] = base64.b64encode(f"bytes{i}".encode()).decode()
        info.append(entry)
    doc = {"text_list": list(sentences), "image_info": info, "similarity_matrix": similarity, "url": "http://x"}
    return {"__key__": "k", "json": json.dumps(doc).encode()}


def test_hungarian_assignment_is_one_to_one_and_the_threshold_is_on_the_cosine_scale():
    # Greedy by row would give image 0 and image 1 sentence 0; the best one-to-one assignment
    # (total 0.8 + 0.85 + 0.25 = 1.90 against 0.9 + 0.1 + 0.25) gives image 0 sentence 1.
    sim = [[0.9, 0.8, 0.1], [0.85, 0.1, 0.1], [0.3, 0.2, 0.25]]
    drops = Counter()
    kept = assign_images(parse_document(mmc4(sim)), "hungarian", 0.24, drops)
    assert [(im["index"], im["sentence"]) for im in kept] == [(1, 0), (0, 1), (2, 2)]  # reading order
    assert [im["similarity"] for im in kept] == [0.85, 0.8, 0.25]
    assert drops == Counter()
    drops = Counter()
    kept = assign_images(parse_document(mmc4(sim)), "hungarian", 0.3, drops)
    assert [im["index"] for im in kept] == [1, 0] and drops == Counter(below_threshold=1)
    # More images than sentences: the surplus image has no sentence left.
    drops = Counter()
    kept = assign_images(parse_document(mmc4([[0.5, 0.4], [0.6, 0.3], [0.2, 0.9]], sentences=("a", "b"))),
                         "hungarian", 0.24, drops)
    assert [(im["index"], im["sentence"]) for im in kept] == [(1, 0), (2, 1)] and drops == Counter(unassigned=1)


def test_matched_assignment_follows_matched_text_index_and_may_stack_images():
    sim = [[0.3, 0.1, 0.1], [0.1, 0.2, 0.1], [0.5, 0.1, 0.1]]
    drops = Counter()
    kept = assign_images(parse_document(mmc4(sim, matched=[0, 1, 0])), "matched", 0.24, drops)
    assert [(im["index"], im["sentence"]) for im in kept] == [(0, 0), (2, 0)]
    assert drops == Counter(below_threshold=1)  # image 1: 0.2 < 0.24


def test_the_token_layout_is_openflamingos():
    enc = {"a b": [10, 11], "c": [12], "d e": [13, 14], "t": [15]}.__getitem__
    # text before the first image, two images before "c" (no empty chunk between them), one before "d"
    ids = document_ids(["a b", "c", "d", "e"], [1, 1, 2], lambda s: enc(s), IMG, END, BOS, EOS)
    assert ids == [BOS, 10, 11, IMG, IMG, 12, END, IMG, 13, 14, END, EOS]
    labels = chunk_labels(ids, IMG, END)
    assert labels == [IGNORE_INDEX] * 5 + [12, END, IGNORE_INDEX, 13, 14, END, IGNORE_INDEX]
    # an image first: no leading text, nothing masked but the image and what follows the last chunk
    ids = document_ids(["t"], [0], lambda s: enc(s), IMG, END, None, None)
    assert ids == [IMG, 15, END] and chunk_labels(ids, IMG, END) == [IGNORE_INDEX, 15, END]


def test_obelics_documents_keep_their_places_and_read_images_from_members():
    doc = {"texts": ["intro", None, "after", None], "images": [None, "http://x/cat.jpg", None, "http://x/dog.png"]}
    raw = {"__key__": "k", "json": json.dumps(doc).encode(), "1.jpg": b"cat-bytes", "dog.png": b"dog-bytes"}
    parsed = parse_document(raw)
    assert parsed.sentences == ["intro", "after"]
    assert [(im["sentence"], im["data"]) for im in parsed.images] == [(1, b"cat-bytes"), (2, b"dog-bytes")]
    assert [im["sentence"] for im in assign_images(parsed, "hungarian", 0.24, Counter())] == [1, 2]


@pytest.mark.parametrize("doc, reason", [
    ({"texts": ["a", "b"], "images": [None, "x"]}, "bad_json"),  # position 1 has both
    ({"texts": ["a"], "images": [None, None]}, "bad_json"),  # lengths differ
    ({"text_list": ["a"], "image_info": [{}], "similarity_matrix": [[0.1, 0.2]]}, "bad_json"),  # 1 x 2 for 1 x 1
    ({"text_list": ["", " "], "image_info": []}, "no_text"),
    ({"caption": "a pair, not a document"}, "bad_json"),
])
def test_malformed_documents_are_bad_samples_by_reason(doc, reason):
    with pytest.raises(BadSample) as err:
        parse_document({"__key__": "k", "json": json.dumps(doc).encode()})
    assert err.value.reason == reason


def test_a_threshold_off_the_cosine_scale_is_refused_with_the_reason():
    with pytest.raises(UserError, match="off the scale.*0.24"):
        DocumentLayout(threshold=30).check()


# ---- streaming documents from shards -------------------------------------------------------------


def _jpeg(colour) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(out, format="JPEG")
    return out.getvalue()


def _write_tar(path, samples):
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _mmc4_doc(sentences, sims, images):
    """MMC4 as OpenFlamingo's conversion writes it: the document with each image's base64 added."""
    info = []
    for i, (row, data) in enumerate(zip(sims, images)):
        j = max(range(len(row)), key=row.__getitem__)
        entry = {"image_name": f"{i}.jpg", "raw_url": f"http://x/{i}.jpg", "matched_text_index": j, "matched_sim": row[j]}
        if data is not None:
            entry["image_base64"] = base64.b64encode(data).decode()
        info.append(entry)
    return json.dumps({"text_list": sentences, "image_info": info, "similarity_matrix": sims, "url": "http://x"}).encode()


def test_mmc4_and_obelics_shards_stream_with_documents_and_images_counted_by_reason(tmp_path):
    from lit_vlm.datamodules import InterleavedDataModule

    red, blue = _jpeg((255, 0, 0)), _jpeg((0, 0, 255))
    samples = [
        # 3 images, 3 sentences: image 2 is under 0.24 -> 2 images kept
        ("a", {"json": _mmc4_doc(["a red circle", "a blue square", "a green star"],
                                 [[0.30, 0.1, 0.1], [0.1, 0.28, 0.1], [0.1, 0.1, 0.2]], [red, blue, red])}),
        # every image under the threshold -> too_few_images (2 below_threshold)
        ("b", {"json": _mmc4_doc(["a red circle", "a blue square"], [[0.1, 0.2], [0.2, 0.1]], [red, blue])}),
        # one image without bytes (missing_image), one fine -> kept with 1 image (evaluation keeps those)
        ("c", {"json": _mmc4_doc(["a red circle", "a blue square"], [[0.5, 0.1], [0.1, 0.5]], [None, blue])}),
        # OBELICS, images as members by position; the second does not decode (image_decode)
        ("d", {"json": json.dumps({"texts": ["a red circle", None, "a blue square", None, "a green star"],
                                    "images": [None, "x.jpg", None, "y.jpg", None]}).encode(),
               "1.jpg": red, "3.jpg": b"not a jpeg"}),
        ("e", {"json": b"{not json"}),  # bad_json
        ("f", {"jpg": blue, "txt": b"a blue square"}),  # an image-text pair: one chunk
    ]
    _write_tar(tmp_path / "docs-000000.tar", samples)
    dm = InterleavedDataModule(tokenizer="synth", image_size=16, val_shards=str(tmp_path / "docs-000000.tar"),
                               batch_size=8, num_workers=0)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    for b in batches:
        dm.on_after_batch_transfer(b, 0)
    (batch,) = batches
    assert batch["sample_id"] == ["a", "c", "d", "f"]
    assert batch["images"].shape == (4, 2, 3, 16, 16)
    assert batch["media_mask"].tolist() == [[True, True], [True, False], [True, False], [True, False]]
    assert batch["media_locations"].sum(1).tolist() == [2, 1, 1, 1]
    tok = dm.tokenizer
    img, end = tok.token_to_id("<image>"), tok.token_to_id("<|endofchunk|>")
    enc = lambda text: tok.backend.encode(text, add_special_tokens=False).ids  # noqa: E731
    # images 0 and 1 open a chunk before sentences 0 and 1; sentence 2 (its image dropped) joins chunk 2
    want = [tok.bos_id, img, *enc("a red circle"), end, img, *enc("a blue square a green star"), end, tok.eos_id]
    assert batch["input_ids"][0, : len(want)].tolist() == want and batch["attention_mask"][0].sum() == len(want)
    # no target on the start token, the images and the end token after the last chunk
    assert batch["labels"][0, : len(want)].tolist() == [-100, -100, *(-100 if t == img else t for t in want[2:-1]), -100]
    pair = [tok.bos_id, img, *enc("a blue square"), end, tok.eos_id]
    assert batch["input_ids"][3, : len(pair)].tolist() == pair and batch["attention_mask"][3].sum() == len(pair)
    assert dm.skip_counts("val")["too_few_images"] == 1 and dm.skip_counts("val")["bad_json"] == 1
    assert dm.drop_counts("val") == {"below_threshold": 3, "missing_image": 1, "image_decode": 1}


# ---- the world's documents and mixed sources -----------------------------------------------------


def test_world_documents_are_mmc4_pages_whose_weak_images_are_dropped_as_counted(tmp_path):
    import tarfile

    from lit_vlm.datamodules import InterleavedDataModule
    from lit_vlm.datamodules.world_docs import DocsConfig, generate

    generate(tmp_path / "docs", DocsConfig(num_train=0, num_val=12, num_test=0, image_size=32, shard_size=6,
                                            weak_image_prob=0.3), num_workers=1, progress=False)
    docs, images, weak, empty = [], 0, 0, 0
    for shard in sorted((tmp_path / "docs/val").glob("*.tar")):
        with tarfile.open(shard) as tar:
            docs += [json.loads(tar.extractfile(m).read()) for m in tar.getmembers()]
    for doc in docs:  # MMC4's converted layout, each image's own sentence its most similar one
        assert set(doc) >= {"text_list", "image_info", "similarity_matrix"}
        assert len(doc["similarity_matrix"]) == len(doc["image_info"]) and doc["page"] in ("captions", "questions", "labels", "story")
        sims = [info["matched_sim"] for info in doc["image_info"]]
        assert all(info["matched_text_index"] == max(range(len(row)), key=row.__getitem__)
                   for info, row in zip(doc["image_info"], doc["similarity_matrix"]))
        images, weak, empty = images + len(sims), weak + sum(s < 0.24 for s in sims), empty + all(s < 0.24 for s in sims)
    assert len(docs) == 12 and weak > 0
    dm = InterleavedDataModule(tokenizer="synth", image_size=32, root=str(tmp_path / "docs"), eval_batch_size=4, num_workers=0)
    dm.setup("validate")
    for b in dm.val_dataloader():
        dm.on_after_batch_transfer(b, 0)
    # Hungarian on these matrices keeps each image at its own sentence: exactly the weak ones are dropped
    assert dm.drop_counts("val") == {"below_threshold": weak}
    assert dm.skip_counts("val")["too_few_images"] == empty


def test_world_writers_refuse_a_foreign_folder_and_redo_an_interrupted_write(tmp_path):
    from lit_vlm.datamodules.world_docs import FORMAT, DocsConfig, generate, is_generated
    from lit_vlm.errors import UserError

    config = DocsConfig(num_train=3, num_val=0, num_test=0, image_size=32, shard_size=2)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="mine is not empty and holds no world documents; refusing"):
        generate(tmp_path / "mine", config, num_workers=1, progress=False)
    assert (tmp_path / "mine/notes.txt").read_text() == "keep me"
    out = tmp_path / "docs"
    (out / "train").mkdir(parents=True)
    (out / f".{FORMAT}-incomplete").touch()  # a write that died: no manifest, its marker left
    (out / "train/shard-000000.tar").write_bytes(b"cut short")
    assert not is_generated(out)
    manifest = generate(out, config, num_workers=1, progress=False)
    assert is_generated(out) and not (out / f".{FORMAT}-incomplete").exists()
    assert manifest["splits"]["train"] == {"shards": ["train/shard-000000.tar", "train/shard-000001.tar"], "num_samples": 3}
    assert all((out / s).stat().st_size > 1000 for s in manifest["splits"]["train"]["shards"])
    generate(out, config, num_workers=1, progress=False)  # a complete write may be written again


def test_train_mix_reads_a_batch_per_source_and_resumes_mid_epoch_exactly(tmp_path):
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_vlm.datamodules import InterleavedDataModule
    from lit_vlm.datamodules.world_docs import DocsConfig, generate

    generate(tmp_path / "docs", DocsConfig(num_train=10, num_val=0, num_test=0, image_size=32, shard_size=5),
             num_workers=1, progress=False)
    _write_tar(tmp_path / "pairs-000000.tar", [(f"p{i}", {"jpg": _jpeg((20 * i, 0, 0)), "txt": b"a red circle"}) for i in range(9)])

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.steps = []

        def training_step(self, batch, batch_idx):
            assert batch["loss_weights"] == {"docs": 1.0, "pairs": 0.2}
            self.steps.append({n: list(b["sample_id"]) for n, b in batch["sources"].items()})
            return self.w * 0.0 + sum(w * b["images"].mean() for w, b in zip((1.0, 0.2), batch["sources"].values()))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def run(ckpt=None):
        dm = InterleavedDataModule(tokenizer="synth", image_size=16, root=str(tmp_path / "docs"), num_workers=0,
                                   shuffle_buffer=4, resampled=True, train_epoch_samples=20,
                                   train_mix={"docs": {"batch_size": 2}, "pairs": {"shards": str(tmp_path / "pairs-000000.tar"),
                                                                                  "batch_size": 3, "loss_weight": 0.2}})
        model = Recorder()
        every = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
        trainer = pl.Trainer(max_epochs=2, logger=False, callbacks=[every] if ckpt is None else [], enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                             default_root_dir=str(tmp_path))  # the resumed run's default checkpoints too
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
        return model.steps, dm

    whole, dm = run()
    assert len(whole) == 8 and all(len(s["docs"]) == 2 and len(s["pairs"]) == 3 for s in whole)  # 20 samples = 4 steps of 2 + 3
    assert sum(dm.stream_stats["train/pairs"]["skipped_by_reason"].values()) == 0
    tail, _ = run(str(tmp_path / "ckpt" / "step=3.ckpt"))  # saved in the middle of epoch 0
    assert whole[:3] + tail == whole


def test_mmc4_json_lines_and_images_convert_to_shards_that_stream(tmp_path):
    from lit_vlm.datamodules import InterleavedDataModule
    from lit_vlm.datamodules.mmc4 import convert_mmc4

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(_jpeg((255, 0, 0)))
    (tmp_path / "images" / "b.jpg").write_bytes(_jpeg((0, 0, 255)))
    doc = lambda names, sims: {"text_list": ["a red circle", "a blue square"], "url": "http://x",  # noqa: E731
                               "image_info": [{"image_name": n, "raw_url": "", "matched_text_index": i, "matched_sim": sims[i][i]}
                                              for i, n in enumerate(names)], "similarity_matrix": sims}
    lines = [json.dumps(doc(["a.jpg", "b.jpg"], [[0.3, 0.1], [0.1, 0.3]])), "{not json",
             json.dumps(doc(["gone.jpg", "../../etc/passwd"], [[0.3, 0.1], [0.1, 0.3]]))]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    report = convert_mmc4([tmp_path / "docs.jsonl"], tmp_path / "images", tmp_path / "out", progress=False)
    assert report.samples == {"train": 2} and len(report.malformed) == 1
    assert report.missing_images == ["gone.jpg"] and report.outside_images == ["../../etc/passwd"]
    dm = InterleavedDataModule(tokenizer="synth", image_size=16, root=str(tmp_path / "out"), val_shards=str(tmp_path / "out/train"),
                               eval_batch_size=4, num_workers=0)
    dm.setup("validate")
    for b in dm.val_dataloader():
        dm.on_after_batch_transfer(b, 0)
        assert b["media_mask"].tolist() == [[True, True]]
    assert dm.drop_counts("val") == {"missing_image": 2} and dm.skip_counts("val")["too_few_images"] == 1
