"""Dataset converters (Karpathy COCO/Flickr30k, VQAv2) and reading their output with the DataModule."""

from __future__ import annotations

import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from lit_vlm.datamodules import convert
from lit_vlm.datamodules.convert import (
    ConversionError,
    convert_karpathy,
    convert_vqav2,
    karpathy_main,
    vqav2_main,
)
from lit_vlm.datamodules.image_text import IMAGE_TEXT_SKIP_REASONS, ImageTextDataModule
from lit_vlm.datamodules.stream import STREAM_SKIP_REASONS
from lit_vlm.datamodules.tokenizer import Tokenizer

SKIP_REASONS = STREAM_SKIP_REASONS + IMAGE_TEXT_SKIP_REASONS

WORDS = "a an the dog cat runs sits on red blue mat man bike rides two what color is how many there".split()


def save_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (24, 20), fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, fmt, quality=90)


def members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def all_members(out: Path, split: str) -> dict[str, bytes]:
    manifest = json.loads((out / "manifest.json").read_text())
    found: dict[str, bytes] = {}
    for shard in manifest["splits"][split]["shards"]:
        found.update(members(out / shard))
    return found


def sentence(raw: str) -> dict[str, Any]:
    return {"raw": raw, "tokens": raw.lower().strip(" .").split(), "imgid": 0, "sentid": 0}


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.from_words(WORDS).save(path)
    return str(path)


def coco_karpathy(root: Path) -> tuple[Path, Path]:
    """A tiny dataset_coco.json with every kind of problem, and its image folder."""
    images = root / "coco"

    def entry(cocoid: int, split: str, folder: str, captions: list[str], **extra: Any) -> dict[str, Any]:
        return {
            "filepath": folder,
            "filename": f"COCO_{folder}_{cocoid:012d}.jpg",
            "split": split,
            "imgid": cocoid + 100,
            "cocoid": cocoid,
            "sentids": list(range(len(captions))),
            "sentences": [sentence(c) for c in captions],
            **extra,
        }

    entries = [
        entry(1, "train", "train2014", ["a dog runs.", "the dog runs"]),
        entry(2, "restval", "val2014", ["a cat sits."]),
        entry(3, "val", "val2014", ["  a red  bike\n", "a man rides a bike", "two bike"]),
        entry(4, "val", "val2014", ["a blue mat"]),
        entry(5, "test", "val2014", ["a cat on a mat", "the cat sits on the mat"]),
        entry(6, "test", "val2014", ["a dog"]),  # image file missing
        entry(7, "val", "val2014", ["x"], sentences=None),  # malformed: no sentences
        entry(8, "dev", "val2014", ["a dog"]),  # malformed: unknown split
        entry(3, "test", "val2014", ["a duplicate"]),  # malformed: duplicate cocoid
        "not an entry",  # malformed
        entry(10, "test", "val2014", ["a man on a bike"]),  # file lies flat in the folder (fallback)
        entry(11, "val", "val2014", ["a broken picture"]),  # unreadable image
    ]
    for cocoid, colour in ((1, (200, 0, 0)), (2, (0, 200, 0)), (3, (0, 0, 200)), (4, (90, 90, 0)), (5, (0, 90, 90))):
        folder = "train2014" if cocoid == 1 else "val2014"
        save_image(images / folder / f"COCO_{folder}_{cocoid:012d}.jpg", colour, size=(20 + cocoid, 16))
    save_image(images / "COCO_val2014_000000000010.jpg", (50, 60, 70))
    (images / "val2014" / "COCO_val2014_000000000011.jpg").write_bytes(b"this is not a jpeg")
    (images / "val2014" / "COCO_val2014_000000000008.jpg").write_bytes(b"")  # entry is malformed anyway
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path, images


def flickr_karpathy(root: Path, with_dataset: bool = True) -> tuple[Path, Path]:
    images = root / "flickr"
    entries = []
    for imgid, (split, name) in enumerate([("train", "1000"), ("val", "2000"), ("test", "3000"), ("test", "4000")]):
        entries.append({
            "filename": f"{name}.jpg",
            "imgid": imgid,
            "split": split,
            "sentids": [imgid * 5],
            "sentences": [sentence(f"a dog {name}"), sentence("a cat")],
        })
        save_image(images / f"{name}.jpg", (imgid * 50, 10, 10))
    save_image(images / "3000.jpg", (1, 2, 3), fmt="PNG")  # a PNG behind a .jpg name: kept as png
    data: dict[str, Any] = {"images": entries}
    if with_dataset:
        data["dataset"] = "flickr30k"
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps(data))
    return path, images


def vqa_files(root: Path) -> tuple[Path, Path, Path]:
    """Official-format VQAv2 questions + annotations for 4 images (one image file missing)."""
    images = root / "val2014"
    info = {"description": "tiny VQA", "version": "2.0"}

    def answers(words: list[str]) -> list[dict[str, Any]]:
        return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]

    questions = [
        {"image_id": 42, "question": "what color is the mat?", "question_id": 421},
        {"image_id": 7, "question": "is there a dog?", "question_id": 71},
        {"image_id": 42, "question": "how many cats?", "question_id": 420},
        {"image_id": 9, "question": "what is there?", "question_id": 91},  # image file missing
        {"image_id": 7, "question": 12, "question_id": 72},  # malformed question text
        {"image_id": 7, "question": "is the dog red?", "question_id": 73},  # no annotation
        {"image_id": 5, "question": "how many dogs?", "question_id": 51},  # malformed annotation
    ]
    anns = [
        {"question_type": "what color is the", "multiple_choice_answer": "red",
         "answers": answers(["red"] * 9 + ["blue"]), "image_id": 42, "answer_type": "other", "question_id": 421},
        {"question_type": "is there a", "multiple_choice_answer": "yes", "answers": answers(["yes"] * 10),
         "image_id": 7, "answer_type": "yes/no", "question_id": 71},
        {"question_type": "how many", "multiple_choice_answer": "2", "answers": answers(["2"] * 8 + ["two", "3"]),
         "image_id": 42, "answer_type": "number", "question_id": 420},
        {"question_type": "what is", "multiple_choice_answer": "dog", "answers": answers(["dog"] * 10),
         "image_id": 9, "answer_type": "other", "question_id": 91},
        {"question_type": "how many", "multiple_choice_answer": "1", "answers": "one",
         "image_id": 5, "answer_type": "number", "question_id": 51},
        {"question_type": "what", "multiple_choice_answer": "x", "answers": answers(["x"] * 10),
         "image_id": 8, "answer_type": "other", "question_id": 999},  # no such question
    ]
    for image_id, colour in ((42, (10, 200, 10)), (7, (200, 200, 10)), (5, (1, 1, 1))):
        save_image(images / f"COCO_val2014_{image_id:012d}.jpg", colour)
    q_path, a_path = root / "questions.json", root / "annotations.json"
    q_path.write_text(json.dumps({"info": info, "task_type": "Open-Ended", "data_type": "mscoco",
                                  "data_subtype": "val2014", "license": {}, "questions": questions}))
    a_path.write_text(json.dumps({"info": info, "data_type": "mscoco", "data_subtype": "val2014", "license": {},
                                  "annotations": anns}))
    return q_path, a_path, images


def eval_batches(out: Path, tokenizer_file: str, split: str = "val", **kwargs: Any) -> tuple[ImageTextDataModule, list]:
    dm = ImageTextDataModule(root=str(out), synthesize=False, tokenizer=tokenizer_file, image_size=16,
                             eval_batch_size=2, num_workers=0, **kwargs)
    dm.prepare_data()
    loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
    return dm, [dm.on_after_batch_transfer(b, 0) for b in loader]


def flat(batches: list[dict[str, Any]], key: str) -> list[Any]:
    return [x for b in batches for x in b[key]]


# ------------------------------------------------------------------------------------------ Karpathy


def test_karpathy_coco_packed(tmp_path, tokenizer_file):
    json_path, images = coco_karpathy(tmp_path)
    out = tmp_path / "out"
    report = convert_karpathy(json_path, images, out, shard_size=1, progress=False)

    assert report.dataset == "coco" and report.samples == {"train": 2, "val": 2, "test": 2}
    assert report.missing_images == ["val2014/COCO_val2014_000000000006.jpg"]
    assert len(report.unreadable_images) == 1 and report.unreadable_images[0].startswith(
        "val2014/COCO_val2014_000000000011.jpg: "
    )
    assert len(report.malformed) == 4
    assert "images[6] (COCO_val2014_000000000007.jpg): 'sentences'" in report.malformed[0]
    assert "images[7] (COCO_val2014_000000000008.jpg): 'split' is 'dev'" in report.malformed[1]
    assert "duplicate cocoid 3 (first at images[2])" in report.malformed[2]
    assert "images[9]: a str, not an object" in report.malformed[3]
    summary = report.summary()
    assert "1 missing image files" in summary and "COCO_val2014_000000000006.jpg" in summary
    assert "4 malformed entries" in summary and "1 unreadable images" in summary
    assert json.loads((out / "reports" / "karpathy.json").read_text())["malformed"] == report.malformed

    manifest = convert.load_manifest(out)
    assert convert.is_converted(out) and not (out / convert.MARKER).exists()
    assert manifest["splits"]["train"]["shards"] == ["train/shard-000000.tar", "train/shard-000001.tar"]
    assert manifest["splits"]["val"]["num_samples"] == 2 and manifest["splits"]["val"]["packed"] is True
    assert manifest["annotations"] == {"captions_val": "annotations/captions_val.json",
                                       "captions_test": "annotations/captions_test.json"}
    assert not list(out.glob(".convert-staging-*"))

    train = all_members(out, "train")
    assert sorted(train) == sorted(f"{k:012d}.{e}" for k in (1, 2) for e in ("jpg", "txt", "json"))
    meta = json.loads(train["000000000002.json"])
    assert meta["split"] == "train" and meta["karpathy_split"] == "restval" and meta["image_id"] == 2
    val = all_members(out, "val")
    assert val["000000000003.jpg"] == (images / "val2014" / "COCO_val2014_000000000003.jpg").read_bytes()
    assert val["000000000003.txt"] == b"a red bike"
    meta = json.loads(val["000000000003.json"])
    assert meta["key"] == "000000000003" and meta["filename"] == "COCO_val2014_000000000003.jpg"
    assert meta["captions"] == ["a red bike", "a man rides a bike", "two bike"]  # whitespace collapsed
    assert (meta["width"], meta["height"]) == (23, 16) and "image_path" not in meta
    assert "000000000010.jpg" in all_members(out, "test")  # found flat in the image folder

    # COCO caption format, as pycocotools / pycocoevalcap read it.
    from pycocotools.coco import COCO

    coco = COCO(str(out / "annotations" / "captions_val.json"))
    assert sorted(coco.getImgIds()) == [3, 4]
    assert [a["caption"] for a in coco.imgToAnns[3]] == ["a red bike", "a man rides a bike", "two bike"]
    assert coco.imgs[4]["file_name"] == "COCO_val2014_000000000004.jpg"
    ann_ids = [a["id"] for a in coco.dataset["annotations"]]
    assert len(ann_ids) == len(set(ann_ids)) == 4
    test_gt = json.loads((out / "annotations" / "captions_test.json").read_text())
    assert [im["id"] for im in test_gt["images"]] == [5, 10]

    # The DataModule reads it like a synthetic world.
    dm, batches = eval_batches(out, tokenizer_file)
    assert flat(batches, "sample_id") == ["000000000003", "000000000004"]
    assert flat(batches, "image_id") == [3, 4]
    assert flat(batches, "captions") == [["a red bike", "a man rides a bike", "two bike"], ["a blue mat"]]
    assert flat(batches, "question") == [] and batches[0]["question_owner"].shape == (0,)
    assert dm.eval_annotations("val") == {"captions": str(out / "annotations" / "captions_val.json")}
    assert dm.eval_annotations("test") == {"captions": str(out / "annotations" / "captions_test.json")}
    assert dm.classnames is None
    assert dm.skipped_total == 0


def test_karpathy_no_pack_gives_identical_batches(tmp_path, tokenizer_file, caplog):
    json_path, images = coco_karpathy(tmp_path)
    packed, unpacked = tmp_path / "packed", tmp_path / "unpacked"
    convert_karpathy(json_path, images, packed, progress=False)
    assert karpathy_main(["--json", str(json_path), "--images", str(images), "--out", str(unpacked),
                          "--no-pack", "--quiet", "--shard-size", "2"]) == 0

    manifest = convert.load_manifest(unpacked)
    assert manifest["splits"]["val"]["image_root"] == str(images.resolve())
    assert manifest["splits"]["val"]["packed"] is False
    val = all_members(unpacked, "val")
    assert not [name for name in val if name.endswith(".jpg")]
    assert json.loads(val["000000000004.json"])["image_path"] == "val2014/COCO_val2014_000000000004.jpg"
    assert json.loads(all_members(unpacked, "test")["000000000010.json"])["image_path"] == (
        "COCO_val2014_000000000010.jpg"
    )
    assert (packed / "annotations" / "captions_val.json").read_bytes() == (
        unpacked / "annotations" / "captions_val.json"
    ).read_bytes()

    for split in ("val", "test"):
        _, a = eval_batches(packed, tokenizer_file, split)
        _, b = eval_batches(unpacked, tokenizer_file, split)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            for key in x:
                if isinstance(x[key], torch.Tensor):
                    assert torch.equal(x[key], y[key]), key
                else:
                    assert x[key] == y[key], key

    # An explicit image_root overrides the manifest's; a wrong one makes every image missing.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with caplog.at_level(logging.WARNING, logger="lit_vlm.data"):
        _, batches = eval_batches(unpacked, tokenizer_file, image_root=str(elsewhere))
    assert batches == []  # (skip counts travel with batches, so here only the log tells)
    skips = [r.getMessage() for r in caplog.records if "(missing_image)" in r.getMessage()]
    assert len(skips) == 2 and "elsewhere/val2014/COCO_val2014_000000000003.jpg" in skips[0]


def test_karpathy_flickr_and_restval(tmp_path, tokenizer_file):
    json_path, images = flickr_karpathy(tmp_path, with_dataset=False)
    report = convert_karpathy(json_path, images, tmp_path / "out", progress=False)
    assert report.dataset == "flickr30k" and any("assumed 'flickr30k'" in n for n in report.notes)
    assert report.samples == {"train": 1, "val": 1, "test": 2} and report.problems == 0
    test = all_members(tmp_path / "out", "test")
    assert len(test) == 6
    assert "000000000002.png" in test and "000000000003.jpg" in test  # real format decides the extension
    meta = json.loads(test["000000000002.json"])
    assert meta["image_id"] == 2 and meta["filename"] == "3000.jpg" and meta["captions"] == ["a dog 3000", "a cat"]
    _, batches = eval_batches(tmp_path / "out", tokenizer_file, "test")
    assert flat(batches, "image_id") == [2, 3]

    json_path, images = coco_karpathy(tmp_path / "c")
    report = convert_karpathy(json_path, images, tmp_path / "no-restval", restval_to_train=False, progress=False)
    assert report.samples["train"] == 1 and report.skipped == {"restval (restval_to_train=False)": 1}


def test_karpathy_strict_names_the_file(tmp_path, capsys):
    json_path, images = flickr_karpathy(tmp_path)
    (images / "2000.jpg").unlink()
    out = tmp_path / "out"
    code = karpathy_main(["--json", str(json_path), "--images", str(images), "--out", str(out), "--strict"])
    assert code == 1
    err = capsys.readouterr().err
    assert "strict mode: image file missing: 2000.jpg" in err
    assert not out.exists()  # nothing written

    save_image(images / "2000.jpg", (1, 1, 1))
    (images / "3000.jpg").write_bytes(b"\xff\xd8 truncated")  # found only while writing
    with pytest.raises(ConversionError, match=r"image unreadable: 3000\.jpg"):
        convert_karpathy(json_path, images, out, strict=True, progress=False)
    assert not out.exists()

    with pytest.raises(ConversionError, match="not a Karpathy split file"):
        bad = tmp_path / "bad.json"
        bad.write_text("[1, 2]")
        convert_karpathy(bad, images, out, progress=False)
    with pytest.raises(ConversionError, match="does not exist"):
        convert_karpathy(tmp_path / "nope.json", images, out, progress=False)


def test_output_folder_rules_and_interrupted_conversion(tmp_path, tokenizer_file, monkeypatch):
    json_path, images = flickr_karpathy(tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty and is not a converted dataset"):
        convert_karpathy(json_path, images, foreign, progress=False)

    out = tmp_path / "out"
    convert_karpathy(json_path, images, out, progress=False)
    with pytest.raises(ConversionError, match=r"already holds split\(s\) \['train', 'val', 'test'\]"):
        convert_karpathy(json_path, images, out, progress=False)

    # A conversion killed while moving files: no manifest, a marker; never synthesized over.
    real_replace = os.replace
    moved = []

    def dying_replace(src: Any, dst: Any) -> None:
        if Path(dst).name.startswith("shard-") and Path(dst).parent.parent == out:
            moved.append(dst)
            if len(moved) == 2:
                raise KeyboardInterrupt  # stands in for a kill
        real_replace(src, dst)

    monkeypatch.setattr(convert.os, "replace", dying_replace)
    monkeypatch.setattr(convert._Output, "abort", lambda self: None)  # a kill cleans nothing up
    with pytest.raises(KeyboardInterrupt):
        convert_karpathy(json_path, images, out, overwrite=True, progress=False)
    monkeypatch.undo()
    assert not (out / "manifest.json").exists() and (out / convert.MARKER).exists()
    with pytest.raises(ValueError, match="interrupted dataset conversion"):
        ImageTextDataModule(root=str(out), tokenizer=tokenizer_file)
    with pytest.raises(FileNotFoundError, match="interrupted"):
        convert.load_manifest(out)

    report = convert_karpathy(json_path, images, out, progress=False)  # a rerun completes it
    assert report.samples == {"train": 1, "val": 1, "test": 2}
    assert convert.is_converted(out) and not (out / convert.MARKER).exists()
    assert not list(out.glob(".convert-staging-*"))

    synth_like = tmp_path / "synth"
    synth_like.mkdir()
    (synth_like / "manifest.json").write_text(json.dumps({"format": "lit-vlm-synth", "version": 1}))
    with pytest.raises(ConversionError, match="holds another dataset"):
        convert_karpathy(json_path, images, synth_like, progress=False)


# ------------------------------------------------------------------------------------------ VQAv2


def test_vqav2_conversion(tmp_path, tokenizer_file):
    q_path, a_path, images = vqa_files(tmp_path)
    out = tmp_path / "out"
    report = convert_vqav2(q_path, images, out, "val", annotations=a_path, shard_size=1, progress=False)

    assert report.dataset == "vqav2 val2014"
    assert report.samples == {"val": 2} and report.questions == {"val": 3}
    assert report.missing_images == ["COCO_val2014_000000000009.jpg"]
    assert len(report.malformed) == 3
    assert "questions[4] (question_id 72): 'question' is 12" in report.malformed[0]
    assert "annotations[4] (question_id 51): 'answers'" in report.malformed[1]
    assert "question_id 73 has no annotation" in report.malformed[2]
    assert report.skipped == {"annotations whose question_id is not among the questions": 1}

    val = all_members(out, "val")
    assert sorted(val) == ["000000000007.jpg", "000000000007.json", "000000000042.jpg", "000000000042.json"]
    meta = json.loads(val["000000000042.json"])
    assert meta["image_id"] == 42 and meta["filename"] == "COCO_val2014_000000000042.jpg" and "captions" not in meta
    assert [q["question_id"] for q in meta["questions"]] == [420, 421]
    q420 = meta["questions"][0]
    assert q420["question"] == "how many cats?" and q420["answers"] == ["2"] * 8 + ["two", "3"]
    assert q420["answer_type"] == "number" and q420["question_type"] == "how many"
    assert q420["multiple_choice_answer"] == "2" and q420["answer_confidences"] == ["yes"] * 10

    # Copies of the official files restricted to the converted questions, other fields kept.
    original_q, original_a = json.loads(q_path.read_text()), json.loads(a_path.read_text())
    q_copy = json.loads((out / "annotations" / "vqa_val_questions.json").read_text())
    a_copy = json.loads((out / "annotations" / "vqa_val_annotations.json").read_text())
    assert q_copy["questions"] == [original_q["questions"][i] for i in (0, 1, 2)]
    assert a_copy["annotations"] == [original_a["annotations"][i] for i in (0, 1, 2)]
    assert {k: v for k, v in q_copy.items() if k != "questions"} == {
        k: v for k, v in original_q.items() if k != "questions"
    }
    manifest = convert.load_manifest(out)
    assert manifest["annotations"] == {"vqa_val_questions": "annotations/vqa_val_questions.json",
                                       "vqa_val_annotations": "annotations/vqa_val_annotations.json"}

    dm, batches = eval_batches(out, tokenizer_file)
    assert flat(batches, "image_id") == [7, 42]
    assert flat(batches, "question_id") == [71, 420, 421]
    assert flat(batches, "question") == ["is there a dog?", "how many cats?", "what color is the mat?"]
    (batch,) = batches
    assert batch["question_owner"].tolist() == [0, 1, 1] and batch["question_owner"].dtype == torch.long
    assert batch["captions"] == [[], []] and batch["caption_ids"].shape[0] == 0
    assert dm.eval_annotations("validate") == {
        "vqa_questions": str(out / "annotations" / "vqa_val_questions.json"),
        "vqa_annotations": str(out / "annotations" / "vqa_val_annotations.json"),
    }
    assert dm.skipped_total == 0

    unpacked = tmp_path / "unpacked"
    assert vqav2_main(["--questions", str(q_path), "--annotations", str(a_path), "--images", str(images),
                       "--split", "val", "--out", str(unpacked), "--no-pack", "--quiet"]) == 0
    _, other = eval_batches(unpacked, tokenizer_file)
    assert torch.equal(other[0]["image"], batch["image"]) and other[0]["question_id"] == batch["question_id"]
    assert json.loads(all_members(unpacked, "val")["000000000007.json"])["image_path"] == (
        "COCO_val2014_000000000007.jpg"
    )


def test_vqav2_clean_copy_test_dev_and_patterns(tmp_path, tokenizer_file, capsys):
    images = tmp_path / "imgs"
    for image_id in (3, 4):
        save_image(images / f"img-{image_id:05d}.jpg", (image_id * 40, 0, 0))
    questions = {"data_subtype": "test-dev2015", "questions": [
        {"image_id": 4, "question": "what color is it?", "question_id": 40},
        {"image_id": 3, "question": "is it red?", "question_id": 30},
        {"image_id": 3, "question": "how many?", "question_id": 31},
    ]}
    q_path = tmp_path / "test-dev.json"
    q_path.write_text(json.dumps(questions, indent=1))
    assert convert.default_image_pattern("test-dev2015") == "COCO_test2015_%012d.jpg"
    assert vqav2_main(["--questions", str(q_path), "--images", str(images), "--split", "test",
                       "--out", str(tmp_path / "bad"), "--strict"]) == 1
    assert "strict mode: image file missing: COCO_test2015_000000000003.jpg" in capsys.readouterr().err

    out = tmp_path / "out"
    report = convert_vqav2(q_path, images, out, "test", image_pattern="img-{image_id:05d}.jpg", progress=False)
    assert report.problems == 0 and report.questions == {"test": 3}
    # Nothing was left out: the official file is copied byte for byte; there are no annotations.
    assert (out / "annotations" / "vqa_test_questions.json").read_bytes() == q_path.read_bytes()
    assert not (out / "annotations" / "vqa_test_annotations.json").exists()
    meta = json.loads(all_members(out, "test")["000000000003.json"])
    assert meta["questions"] == [{"question_id": 30, "question": "is it red?"},
                                 {"question_id": 31, "question": "how many?"}]
    dm, batches = eval_batches(out, tokenizer_file, "test")
    assert flat(batches, "question_id") == [30, 31, 40] and flat(batches, "image_id") == [3, 4]
    assert dm.eval_annotations("test") == {"vqa_questions": str(out / "annotations" / "vqa_test_questions.json")}
    assert dm.eval_annotations("val") == {} and dm.val_dataloader() == []

    with pytest.raises(ConversionError, match="image_pattern 'same.jpg' must take the image id"):
        convert_vqav2(q_path, images, tmp_path / "o2", "test", image_pattern="same.jpg", progress=False)
    with pytest.raises(ConversionError, match="does not use the image id"):
        convert_vqav2(q_path, images, tmp_path / "o2", "test", image_pattern="img%.0s.jpg", progress=False)
    with pytest.raises(ConversionError, match="split must be one of"):
        convert_vqav2(q_path, images, tmp_path / "o2", "dev", progress=False)


def test_merging_conversions_into_one_root(tmp_path, tokenizer_file):
    json_path, images = coco_karpathy(tmp_path)
    q_path, a_path, vqa_images = vqa_files(tmp_path / "vqa")
    out = tmp_path / "out"
    convert_karpathy(json_path, images, out, progress=False)
    with pytest.raises(ConversionError, match=r"already holds split\(s\) \['val'\]"):
        convert_vqav2(q_path, vqa_images, out, "val", annotations=a_path, progress=False)
    convert_vqav2(q_path, vqa_images, out, "val", annotations=a_path, overwrite=True, progress=False)

    manifest = convert.load_manifest(out)
    assert manifest["splits"]["train"]["source"] == "karpathy" and manifest["splits"]["val"]["source"] == "vqav2"
    assert manifest["splits"]["test"]["num_samples"] == 2
    assert manifest["annotations"] == {
        "captions_test": "annotations/captions_test.json",
        "vqa_val_questions": "annotations/vqa_val_questions.json",
        "vqa_val_annotations": "annotations/vqa_val_annotations.json",
    }
    assert not (out / "annotations" / "captions_val.json").exists()  # described the replaced val split
    assert [p.name for p in sorted((out / "val").iterdir())] == ["shard-000000.tar"]
    dm, batches = eval_batches(out, tokenizer_file)
    assert flat(batches, "image_id") == [7, 42]
    assert set(dm.eval_annotations("val")) == {"vqa_questions", "vqa_annotations"}
    assert set(dm.eval_annotations("test")) == {"captions"}


def test_datamodule_never_synthesizes_over_a_converted_root(tmp_path, tokenizer_file):
    json_path, images = flickr_karpathy(tmp_path)
    out = tmp_path / "out"
    convert_karpathy(json_path, images, out, progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    dm = ImageTextDataModule(root=str(out), tokenizer=tokenizer_file, image_size=16, batch_size=1,
                             num_workers=0, shuffle_buffer=0)  # synthesize=True by default
    dm.prepare_data()
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    (batch,) = list(dm.train_dataloader())
    assert batch["sample_id"] == ["000000000000"] and set(batch) == {"image", "sample_id", "text_ids", "text_mask",
                                                                     "data_stats"}
    with pytest.raises(ValueError, match="converted dataset, not a synthetic world"):
        ImageTextDataModule(root=str(out), tokenizer=tokenizer_file, synth_config={"num_train": 4})
    assert dm.skip_counts() == dict.fromkeys(SKIP_REASONS, 0)


@pytest.mark.parametrize("pack", [True, False])
def test_paths_outside_the_image_folder_are_skipped_and_listed(tmp_path, pack):
    """``../`` and absolute paths in an entry (Karpathy ``filepath`` / ``filename``, a VQAv2 image
    pattern) are never read or packed: skipped, counted and listed in the report; fatal under
    --strict."""
    json_path, images = flickr_karpathy(tmp_path)
    save_image(tmp_path / "secret.jpg", (7, 7, 7))  # beside the image folder, not in it
    data = json.loads(json_path.read_text())
    outside = [
        {"filename": "../secret.jpg"},
        {"filepath": "..", "filename": "secret.jpg"},
        {"filename": str(tmp_path / "secret.jpg")},
        {"filepath": "sub/../..", "filename": "secret.jpg"},
    ]
    for i, where in enumerate(outside):
        data["images"].append({"imgid": 100 + i, "split": "test", "sentences": [sentence("a secret")], **where})
    json_path.write_text(json.dumps(data))
    out = tmp_path / "out"
    report = convert_karpathy(json_path, images, out, pack=pack, progress=False)
    assert report.outside_images == ["../secret.jpg", "../secret.jpg", str(tmp_path / "secret.jpg"), "sub/../../secret.jpg"]
    assert report.samples == {"train": 1, "val": 1, "test": 2} and report.problems == 4
    saved = json.loads((out / "reports" / "karpathy.json").read_text())
    assert saved["outside_images"] == report.outside_images
    secret = (tmp_path / "secret.jpg").read_bytes()
    for split in ("train", "val", "test"):
        for name, payload in all_members(out, split).items():
            assert payload != secret, name
            if name.endswith(".json"):
                record = json.loads(payload)
                assert "secret" not in record.get("caption", "") and ".." not in record.get("image_path", "")
    with pytest.raises(ConversionError, match=r"strict mode: image path outside the image folder: \.\./secret\.jpg"):
        convert_karpathy(json_path, images, tmp_path / "strict", pack=pack, strict=True, progress=False)
    assert not (tmp_path / "strict").exists()

    q_path, a_path, vqa_images = vqa_files(tmp_path / "vqa")
    report = convert_vqav2(q_path, vqa_images, tmp_path / "vqa-out", "val", annotations=a_path, pack=pack, progress=False,
                           image_pattern="../val2014/COCO_val2014_%012d.jpg")
    assert report.samples == {"val": 0} and len(report.outside_images) == 3  # the three images with questions left
    assert report.outside_images[0] == "../val2014/COCO_val2014_000000000007.jpg"
