"""Tests of the embedded synthetic world (lit_vlm.datamodules.synth)."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lit_vlm.datamodules import synth
from lit_vlm.datamodules.synth import (
    CLASSNAMES,
    COLOURS,
    SHAPES,
    TEMPLATES,
    Background,
    Scene,
    SceneObject,
    SynthConfig,
    captions,
    generate,
    is_generated,
    load_manifest,
    main,
    make_scene,
    questions,
    render,
    vocabulary,
)
from lit_vlm.errors import UserError

TINY = dict(num_train=40, num_val=20, num_test=20, shard_size=16, image_size=64)


def tiny_config(**overrides) -> SynthConfig:
    return SynthConfig(**{**TINY, **overrides})


def read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_shard(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def samples(root: Path, split: str) -> list[dict]:
    """Every sample of a split as {"jpg": bytes, "txt": str, "json": dict}, in order."""
    manifest = load_manifest(root)
    out: dict[str, dict] = {}
    for shard in manifest["splits"][split]["shards"]:
        for member, data in read_shard(root / shard):
            key, ext = member.name.split(".", 1)
            out.setdefault(key, {})[ext] = data
    return [
        {"jpg": v["jpg"], "txt": v["txt"].decode("utf-8"), "json": json.loads(v["json"])}
        for _, v in sorted(out.items())
    ]


_COUNT = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
          "eight": 8, "nine": 9}
_MENTION = re.compile(
    rf"\b(?:({'|'.join(_COUNT)}) )?(?:(?:small|little|large|big) )?({'|'.join(COLOURS)}) "
    rf"({'|'.join(SHAPES)})(e?s)?\b"
)


def mentioned(caption: str) -> Counter:
    """The multiset of (colour, shape) a caption states, e.g. "two red circles" -> 2 x red circle."""
    out: Counter = Counter()
    for count, colour, shape, plural in _MENTION.findall(caption):
        n = _COUNT.get(count, 1)
        assert (n > 1) == bool(plural), f"number agreement broken in {caption!r}"
        out[(colour, shape)] += n
    return out


def signature(record: dict) -> tuple:
    return tuple(sorted((o["colour"], o["shape"]) for o in record["objects"]))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "world"
    generate(root, tiny_config(holdout=["red star", "Blue  Heart"]), num_workers=1, progress=False)
    return root


# ----------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes(world, tmp_path):
    again = tmp_path / "again"
    generate(again, tiny_config(holdout=["red star", "blue heart"]), num_workers=1, progress=False)
    assert read_tree(world) == read_tree(again)


def test_output_does_not_depend_on_num_workers(world, tmp_path):
    parallel = tmp_path / "parallel"
    generate(parallel, tiny_config(holdout=["red star", "blue heart"]), num_workers=2, progress=False)
    assert read_tree(world) == read_tree(parallel)


def test_different_seed_gives_different_data(world, tmp_path):
    other = tmp_path / "other"
    generate(other, tiny_config(seed=1, holdout=["red star", "blue heart"]), num_workers=1, progress=False)
    a, b = read_tree(world), read_tree(other)
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith(".tar"):
            assert a[name] != b[name], name


def test_per_sample_rng_is_order_independent():
    cfg = tiny_config()
    first = synth._build_sample(cfg, "train", 7, None, frozenset())
    synth._build_sample(cfg, "train", 3, None, frozenset())
    assert synth._build_sample(cfg, "train", 7, None, frozenset()) == first


# ----------------------------------------------------------------------------------------
# Layout and formats
# ----------------------------------------------------------------------------------------


def test_manifest_layout(world):
    assert is_generated(world)
    m = load_manifest(world)
    assert m["format"] == "lit-vlm-synth" and m["version"] == 4
    assert m["config"] == {**SynthConfig().to_dict(), **TINY, "holdout": ["red star", "blue heart"]}
    assert m["classnames"] == CLASSNAMES == list(SHAPES)
    assert m["templates"] == TEMPLATES and all("{}" in t for t in TEMPLATES)
    assert json.loads((world / m["zeroshot"]).read_text()) == {"classnames": CLASSNAMES, "templates": TEMPLATES}
    for split, n in (("train", 40), ("val", 20), ("test", 20)):
        info = m["splits"][split]
        assert info["num_samples"] == n
        assert info["shards"] == [f"{split}/shard-{i:06d}.tar" for i in range(-(-n // 16))]
        assert sorted(p.name for p in (world / split).iterdir()) == [Path(s).name for s in info["shards"]]
    for name in ("captions_val", "captions_test", "vqa_val_questions", "vqa_val_annotations",
                 "vqa_test_questions", "vqa_test_annotations", "compositional_val", "compositional_test"):
        assert m["annotations"][name] == f"annotations/{name}.json"
        assert (world / m["annotations"][name]).is_file()
    assert not (world / synth._MARKER).exists()
    assert not [p for p in world.rglob("*") if p.name.endswith(".tmp")]
    assert synth.shard_paths(world, "val") == [str((world / s).resolve()) for s in m["splits"]["val"]["shards"]]


def test_tar_members_are_deterministic_webdataset_samples(world):
    m = load_manifest(world)
    for split in ("train", "val", "test"):
        names = []
        for shard in m["splits"][split]["shards"]:
            for member, _ in read_shard(world / shard):
                assert member.isreg() and member.mtime == 0 and member.mode == 0o644
                assert member.uid == member.gid == 0 and member.uname == member.gname == ""
                names.append(member.name)
        n = m["splits"][split]["num_samples"]
        assert names == [f"{split}_{i:07d}.{ext}" for i in range(n) for ext in ("jpg", "txt", "json")]


def test_sample_json_schema(world):
    ids = set()
    for split, offset in (("train", 1), ("val", 1_000_000), ("test", 2_000_000)):
        for i, s in enumerate(samples(world, split)):
            r = s["json"]
            assert set(r) == {"key", "image_id", "split", "width", "height", "caption", "captions", "label",
                              "classname", "objects", "background", "questions", "negatives", "conversations",
                              "pretrain_conversations"}
            turns = r["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            answers = {t["value"] for t in turns[1::2]}
            assert {q["multiple_choice_answer"] for q in r["questions"]} <= answers  # every VQA question is asked
            assert "<image>" in turns[0]["value"] and not any("<image>" in t["value"] for t in turns[1:])
            assert r["pretrain_conversations"][1]["value"].lower() == r["caption"]
            assert len(r["negatives"]) == len(r["captions"]) and all(isinstance(n, dict) for n in r["negatives"])
            assert r["key"] == f"{split}_{i:07d}" and "." not in r["key"]
            assert r["image_id"] == offset + i and r["split"] == split
            assert r["width"] == r["height"] == 64
            assert s["txt"] == r["caption"] == r["captions"][0]
            assert CLASSNAMES[r["label"]] == r["classname"]
            assert isinstance(r["background"], str) and r["background"]
            assert 1 <= len(r["objects"]) <= 4
            for o in r["objects"]:
                assert set(o) == {"shape", "colour", "size", "row", "col"}
                assert o["shape"] in SHAPES and o["colour"] in COLOURS and o["size"] in synth.SIZES
                assert o["row"] in synth.ROWS and o["col"] in synth.COLS
            assert len({(o["row"], o["col"]) for o in r["objects"]}) == len(r["objects"])
            image = Image.open(io.BytesIO(s["jpg"]))
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 64)
            ids.add(r["image_id"])
    assert len(ids) == 80


def test_coco_and_vqa_files_match_the_shards(world):
    m = load_manifest(world)
    question_ids = [q["question_id"] for split in ("train", "val", "test") for s in samples(world, split)
                    for q in s["json"]["questions"]]
    assert len(question_ids) == len(set(question_ids))
    for split in ("val", "test"):
        records = [s["json"] for s in samples(world, split)]
        coco = json.loads((world / m["annotations"][f"captions_{split}"]).read_text())
        assert set(coco) == {"info", "licenses", "images", "annotations"} and coco["licenses"] == []
        assert coco["images"] == [{"id": r["image_id"], "file_name": r["key"] + ".jpg", "width": 64, "height": 64}
                                  for r in records]
        assert [(a["image_id"], a["caption"]) for a in coco["annotations"]] == [
            (r["image_id"], c) for r in records for c in r["captions"]]
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])

        vq = json.loads((world / m["annotations"][f"vqa_{split}_questions"]).read_text())
        va = json.loads((world / m["annotations"][f"vqa_{split}_annotations"]).read_text())
        assert vq["task_type"] == "Open-Ended" and vq["data_type"] == va["data_type"] == "synthetic"
        assert vq["data_subtype"] == va["data_subtype"] == split
        assert {"info", "license"} <= set(vq) and {"info", "license"} <= set(va)
        expected = [(r["image_id"], q) for r in records for q in r["questions"]]
        assert vq["questions"] == [{"image_id": i, "question": q["question"], "question_id": q["question_id"]}
                                   for i, q in expected]
        assert len(va["annotations"]) == len(expected)
        for ann, (image_id, q) in zip(va["annotations"], expected):
            assert ann["image_id"] == image_id and ann["question_id"] == q["question_id"]
            assert ann["question_type"] == q["question_type"] and ann["answer_type"] == q["answer_type"]
            assert ann["multiple_choice_answer"] == q["multiple_choice_answer"]
            assert [a["answer"] for a in ann["answers"]] == q["answers"]
            assert [a["answer_id"] for a in ann["answers"]] == list(range(1, 11))
            assert all(a["answer_confidence"] in ("yes", "maybe") for a in ann["answers"])


# ----------------------------------------------------------------------------------------
# Content
# ----------------------------------------------------------------------------------------


def test_captions_identify_the_scene(world):
    for split in ("train", "val", "test"):
        for s in samples(world, split):
            r = s["json"]
            caps = r["captions"]
            assert len(caps) == 5 and len(set(caps)) == 5
            objects = Counter((o["colour"], o["shape"]) for o in r["objects"])
            for c in caps:
                assert c == c.lower() and c.endswith(".") and "  " not in c
                assert mentioned(c) == objects, (c, objects)


def test_captions_many_distinct_and_varied():
    cfg = tiny_config()
    rng = np.random.default_rng(0)
    single = Scene((SceneObject("star", "red", "large", "top", "left"),), Background("solid", ("grey",)))
    assert len(set(captions(single, rng, 20))) == 20
    texts = [c for _ in range(200) for c in captions(make_scene(rng, cfg, True), rng, 5)]
    joined = " ".join(texts)
    for phrase in ("to the left of", "to the right of", "above", "below", "in the top left corner",
                   "in the middle", "there are two", "objects:"):
        assert phrase in joined, phrase


def test_eval_scene_signatures_unique_and_not_in_train(world):
    train = {signature(s["json"]) for s in samples(world, "train")}
    excluded = load_manifest(world)["eval_scenes_excluded_from_train"]
    assert excluded
    for split in ("val", "test"):
        sigs = [signature(s["json"]) for s in samples(world, split)]
        assert len(sigs) == len(set(sigs))
        assert not set(sigs) & train


def test_eval_uniqueness_near_capacity(tmp_path):
    # one object per scene: only 64 distinct scenes exist, so resampling must find all of them
    cfg = tiny_config(num_train=4, num_val=64, num_test=10, shard_size=64, min_objects=1, max_objects=1,
                      image_size=32)
    m = generate(tmp_path / "w", cfg, num_workers=1, progress=False)
    assert not m["eval_scenes_excluded_from_train"]  # would empty train: not done
    sigs = [signature(s["json"]) for s in samples(tmp_path / "w", "val")]
    assert len(set(sigs)) == 64


def test_holdout_respected_in_train(world):
    held = {("red", "star"), ("blue", "heart")}
    for s in samples(world, "train"):
        assert not {(o["colour"], o["shape"]) for o in s["json"]["objects"]} & held
    rng = np.random.default_rng(0)
    cfg = tiny_config(holdout=["red star"])
    cfg.validate()
    for _ in range(500):
        assert ("red", "star") not in make_scene(rng, cfg, allow_holdout=False).signature
    assert any(("red", "star") in make_scene(rng, cfg, allow_holdout=True).signature for _ in range(500))


def test_questions_vqa_style(world):
    records = [s["json"] for split in ("train", "val", "test") for s in samples(world, split)]
    answer_types, question_types, answers = Counter(), Counter(), []
    for r in records:
        qs = r["questions"]
        assert 5 <= len(qs) <= 8 and len({q["question"] for q in qs}) == len(qs)
        for q in qs:
            assert set(q) >= {"question_id", "question", "answers", "answer_type", "question_type",
                              "multiple_choice_answer"}
            assert q["question"].endswith("?") and q["question"] == q["question"].lower()
            assert len(q["answers"]) == 10
            assert q["question"].startswith(q["question_type"])
            counts = Counter(q["answers"])
            assert counts[q["multiple_choice_answer"]] == max(counts.values())
            answer_types[q["answer_type"]] += 1
            question_types[q["question_type"]] += 1
            answers += [(q["answer_type"], a) for a in q["answers"]]
            if q["answer_type"] == "yes/no":
                assert set(q["answers"]) <= {"yes", "no"}
    assert set(answer_types) == {"yes/no", "number", "other"}
    assert {"how many", "is there a", "where is the"} <= set(question_types)
    assert {"what color is the", "what is the color of the"} & set(question_types)
    assert {"what shape is the", "what is the shape of the"} & set(question_types)
    numbers = {a for t, a in answers if t == "number"}
    assert any(a.isdigit() for a in numbers) and any(a.isalpha() for a in numbers)
    yes_no = Counter(q["multiple_choice_answer"] for r in records for q in r["questions"]
                     if q["answer_type"] == "yes/no")
    assert 0.25 < yes_no["yes"] / sum(yes_no.values()) < 0.75


def test_question_answers_are_correct():
    rng = np.random.default_rng(3)
    scene = Scene(
        (SceneObject("circle", "red", "large", "top", "left"), SceneObject("circle", "red", "small", "bottom", "right"),
         SceneObject("star", "blue", "small", "middle", "center")),
        Background("solid", ("beige",)),
    )
    truth = {"what color is the star?": "blue", "what is the color of the star?": "blue",
             "what shape is the blue object?": "star", "what shape is the blue one?": "star",
             "how many objects are there?": "3", "how many circles are there?": "2",
             "how many red circles are there?": "2", "how many red objects are there?": "2",
             "where is the star?": "center", "where is the blue star?": "center", "is there a red circle?": "yes",
             "is there a blue circle?": "no", "is the blue star small?": "yes", "is the blue star large?": "no"}
    paraphrases = {"blue": {"blue one"}, "star": {"a star", "star shape"}, "3": {"three"}, "2": {"two"},
                   "center": {"middle", "in the middle", "centre"}, "yes": set(), "no": set()}
    seen = canonical = 0
    for _ in range(300):
        for q in questions(scene, rng):
            assert "what color is the circle" not in q["question"]  # circles are not unique
            assert "the red object" not in q["question"] and "where is the red circle" not in q["question"]
            if q["question"] in truth:
                seen += 1
                expected = truth[q["question"]]
                assert q["multiple_choice_answer"] in {expected} | paraphrases[expected], q
                canonical += q["multiple_choice_answer"] == expected
    assert canonical > 0.95 * seen
    assert seen > 100


def test_label_is_shape_of_largest_object():
    cfg = tiny_config()
    rng = np.random.default_rng(1)
    plain = Background("solid", ("grey",))
    for _ in range(15):
        scene = make_scene(rng, cfg, True)
        areas = [o.area for o in scene.objects]
        first_max = areas.index(max(areas))
        assert scene.label == CLASSNAMES.index(scene.objects[first_max].shape)
        # the analytic area agrees with the rendered area (each object rendered alone)
        pixels = []
        for obj in scene.objects:
            img = np.asarray(render(Scene((obj,), plain), 128, np.random.default_rng(0)), dtype=int)
            pixels.append(int((np.abs(img - np.asarray(synth.BACKGROUND_RGB["grey"])).sum(-1) > 60).sum()))
        assert pixels[first_max] >= 0.93 * max(pixels)
    tie = Scene((SceneObject("heart", "red", "large", "top", "left"),
                 SceneObject("heart", "blue", "large", "top", "right")), plain)
    assert tie.largest is tie.objects[0]
    mixed = Scene((SceneObject("circle", "red", "small", "top", "left", scale=0.5),
                   SceneObject("diamond", "blue", "large", "top", "right", scale=0.8)), plain)
    assert mixed.classname == "diamond"  # any large object beats any small one
    smallest_large = min(synth.UNIT_AREAS.values()) * synth._SCALE_RANGE["large"][0] ** 2
    largest_small = max(synth.UNIT_AREAS.values()) * synth._SCALE_RANGE["small"][1] ** 2
    assert smallest_large > largest_small


def test_large_objects_have_their_colour_at_cell_centre():
    rng = np.random.default_rng(0)
    size = 64
    for i, colour in enumerate(COLOURS):
        for j, shape in enumerate(SHAPES):
            row, col = synth.ROWS[(i + j) % 3], synth.COLS[(i * 3 + j) % 3]
            scene = make_scene(np.random.default_rng(i * 8 + j), tiny_config(), True)  # for a background
            dx, dy = rng.uniform(-0.05, 0.05, 2)  # the largest jitter of a large object
            obj = SceneObject(shape, colour, "large", row, col, scale=0.8, dx=dx, dy=dy, angle=rng.uniform(-6, 6))
            img = np.asarray(render(Scene((obj,), scene.background), size, rng), dtype=int)
            y = int((synth.ROWS.index(row) + 0.5) * size / 3)
            x = int((synth.COLS.index(col) + 0.5) * size / 3)
            diff = np.abs(img[y, x] - np.asarray(synth.COLOUR_RGB[colour])).max()
            assert diff <= 30, (colour, shape, img[y, x])


def test_jpeg_of_one_object_scenes_shows_object_colour(tmp_path):
    cfg = tiny_config(num_train=0, num_val=24, num_test=0, min_objects=1, max_objects=1, image_size=96)
    generate(tmp_path / "w", cfg, num_workers=1, progress=False)
    checked = 0
    for s in samples(tmp_path / "w", "val"):
        (obj,) = s["json"]["objects"]
        if obj["size"] != "large":
            continue
        checked += 1
        img = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), dtype=int)
        y = int((synth.ROWS.index(obj["row"]) + 0.5) * 32)
        x = int((synth.COLS.index(obj["col"]) + 0.5) * 32)
        assert np.abs(img[y, x] - np.asarray(synth.COLOUR_RGB[obj["colour"]])).max() <= 40, obj
    assert checked >= 5


def test_backgrounds_are_muted():
    for rgb in synth.BACKGROUND_RGB.values():
        assert 90 <= sum(rgb) / 3 <= 190 and max(rgb) - min(rgb) <= 40
        for colour in synth.COLOUR_RGB.values():
            assert np.abs(np.asarray(rgb) - np.asarray(colour)).max() > 60


def test_vocabulary_is_complete(world):
    vocab = set(vocabulary())
    assert vocabulary() == sorted(vocab)
    assert {".", "?", ",", "red", "circles", "two", "2", "left"} <= vocab

    def check(text: str) -> None:
        missing = set(re.findall(r"\w+|[^\w\s]", text.lower())) - vocab
        assert not missing, (missing, text)

    texts = CLASSNAMES + [t.format(c) for t in TEMPLATES for c in CLASSNAMES]
    for split in ("train", "val", "test"):
        for s in samples(world, split):
            texts += s["json"]["captions"]
            for q in s["json"]["questions"]:
                texts += [q["question"], *q["answers"], q["multiple_choice_answer"]]
    rng = np.random.default_rng(5)
    cfg = tiny_config(max_objects=9, duplicate_prob=0.5)
    for _ in range(300):
        scene = make_scene(rng, cfg, True)
        texts += captions(scene, rng, 5)
        for q in questions(scene, rng, 10, 10):
            texts += [q["question"], *q["answers"]]
    for text in texts:
        check(text)


# ----------------------------------------------------------------------------------------
# Robustness: atomic manifest, overwrite, errors, CLI
# ----------------------------------------------------------------------------------------


def test_interrupted_generation_leaves_no_manifest(tmp_path, monkeypatch):
    out = tmp_path / "w"
    calls = {"n": 0}
    real_render = synth.render

    def flaky_render(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 30:
            raise KeyboardInterrupt("simulated crash")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(synth, "render", flaky_render)
    with pytest.raises(KeyboardInterrupt):
        generate(out, tiny_config(), num_workers=1, progress=False)
    assert not (out / "manifest.json").exists() and not is_generated(out)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # temp shard removed
    with pytest.raises(FileNotFoundError, match=str(out)):
        load_manifest(out)
    monkeypatch.setattr(synth, "render", real_render)
    generate(out, tiny_config(), num_workers=1, progress=False)  # an incomplete world may be regenerated
    assert is_generated(out)


def test_regenerating_smaller_world_removes_stale_shards(tmp_path):
    out = tmp_path / "w"
    generate(out, tiny_config(), num_workers=1, progress=False)
    assert len(list((out / "train").iterdir())) == 3
    m = generate(out, tiny_config(num_train=10), num_workers=1, progress=False)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["shard-000000.tar"]
    assert m == load_manifest(out) and m["splits"]["train"]["num_samples"] == 10


def test_load_manifest_errors(tmp_path):
    assert not is_generated(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_manifest(tmp_path / "missing")
    (tmp_path / "manifest.json").write_text("{not json")
    assert not is_generated(tmp_path)
    with pytest.raises(ValueError, match="manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    assert not is_generated(tmp_path)
    with pytest.raises(ValueError, match="lit-vlm-synth"):
        load_manifest(tmp_path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"holdout": ["red"]}, "holdout"),
        ({"holdout": ["pink star"]}, "holdout"),
        ({"holdout": ["star red"]}, "holdout"),
        ({"min_objects": 3, "max_objects": 2}, "min_objects"),
        ({"max_objects": 10}, "max_objects"),
        ({"max_objects": 1, "num_val": 65}, "num_val"),
        ({"max_objects": 1, "num_test": 100}, "num_test"),
        ({"image_size": 8}, "image_size"),
        ({"shard_size": 0}, "shard_size"),
        ({"num_captions": 0}, "num_captions"),
        ({"jpeg_quality": 101}, "jpeg_quality"),
        ({"seed": -1}, "seed"),
        ({"num_train": 1_000_000}, "num_train"),
        ({"duplicate_prob": 2.0}, "duplicate_prob"),
        ({"min_questions": 6, "max_questions": 5}, "questions"),
    ],
)
def test_bad_config_raises(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        generate(tmp_path / "w", tiny_config(**overrides), num_workers=1, progress=False)
    assert not (tmp_path / "w").exists()


def test_generate_refuses_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="not empty and is not a lit-vlm-synth folder"):
        generate(tmp_path, tiny_config(), num_workers=1, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_config_roundtrip():
    cfg = tiny_config(holdout=["red star"])
    assert SynthConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        SynthConfig.from_dict({"bogus": 1})


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--num-train", "6", "--num-val", "4", "--num-test", "4", "--shard-size", "4",
            "--image-size", "32", "--holdout", "red star", "blue heart", "--seed", "3", "--num-workers", "1",
            "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "train" in printed and str(out) in printed
    m = load_manifest(out)
    assert m["config"]["holdout"] == ["red star", "blue heart"] and m["config"]["seed"] == 3
    assert m["config"]["image_size"] == 32 and m["splits"]["train"]["num_samples"] == 6

    assert main(args) == 1  # an existing world needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--num-train", "2", "--overwrite"]) == 0
    assert load_manifest(out)["splits"]["train"]["num_samples"] == 2

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    assert main(["--out", str(foreign), "--num-train", "2", "--overwrite", "--quiet"]) == 1
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]

    assert main(["--out", str(tmp_path / "bad"), "--min-objects", "5", "--max-objects", "2", "--quiet"]) == 2
    assert "min_objects" in capsys.readouterr().err


def test_main_object_makes_the_zero_shot_label_well_defined():
    """One large object per scene: its shape is the label, and every caption names it with its
    colour, so the label is determined by what the text says (the flag off draws sizes freely)."""
    rng = np.random.default_rng(0)
    config = synth.SynthConfig()
    for _ in range(300):
        scene = synth.make_scene(rng, config, allow_holdout=True)
        large = [o for o in scene.objects if o.size == "large"]
        assert len(large) == 1
        assert scene.classname == large[0].shape
    free = synth.SynthConfig(main_object=False)
    counts = Counter(sum(o.size == "large" for o in synth.make_scene(rng, free, True).objects) for _ in range(300))
    assert any(n != 1 for n in counts)
