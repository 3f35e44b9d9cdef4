"""Caption metrics: parity with the official COCO caption evaluator (pycocoevalcap's COCOEvalCap on
the same files), hand-computed BLEU / ROUGE-L, set-level CIDEr-D, the file loaders' errors, the
`lit-vlm eval caption` entry point and the captioning callback's bookkeeping.

Every metric computation starts Java (the PTB tokenizer ~0.5 s, METEOR ~5-10 s to load its
paraphrase table), so METEOR runs only twice here: once through ``main`` and once through
COCOEvalCap, on the same files."""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import pytest
import torch

from lit_vlm import captioning
from lit_vlm.captioning import (
    JAVA_MISSING,
    align_captions,
    caption_metrics,
    load_caption_predictions,
    load_caption_references,
    main,
    ptb_tokenize,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java (apt-get install default-jre)")

# Small but awkward: upper case, punctuation, quotes, a newline, unicode, 1-3 references per image.
REFERENCES = {
    1: ["A man riding a horse on a beach.", "a person rides a brown horse", "Horse and rider by the sea!"],
    2: ["Two dogs play with a ball in the grass.", "two dogs playing"],
    3: ["A plate of food with broccoli, rice and meat."],
    4: ["A red double-decker bus on a city street.", 'a "red" bus\ndriving down the road', "a bus"],
    5: ["A café with people sitting outside.", "people at tables outside a café"],
    6: ["a cat sleeping on a laptop keyboard", "A cat lies on a computer."],
}
PREDICTIONS = {
    1: "a man rides a horse on the beach",
    2: "Two dogs are playing in the grass.",
    3: "a plate of rice and broccoli",
    4: "a red bus driving on a street",
    5: "people sitting outside a café.",
    6: "a dog sleeping on a bed",
}


def write_coco(tmp_path: Path, references=REFERENCES, predictions=PREDICTIONS) -> tuple[Path, Path]:
    ref = {
        "info": {}, "licenses": [],
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in references],
        "annotations": [{"image_id": i, "id": 10 * i + j, "caption": c} for i, caps in references.items() for j, c in enumerate(caps)],
    }
    pred = [{"image_id": i, "caption": c} for i, c in predictions.items()]
    ref_path, pred_path = tmp_path / "captions.json", tmp_path / "results.json"
    ref_path.write_text(json.dumps(ref))
    pred_path.write_text(json.dumps(pred))
    return ref_path, pred_path


def official_coco_eval_cap(ref_path: Path, pred_path: Path) -> dict[str, float]:
    """pycocoevalcap's COCOEvalCap on COCO files, SPICE stubbed out (it downloads models)."""
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    coco = COCO(str(ref_path))
    evaluator = coco_eval.COCOEvalCap(coco, coco.loadRes(str(pred_path)))
    spice, coco_eval.Spice = coco_eval.Spice, NoSpice
    try:
        evaluator.evaluate()
    finally:
        coco_eval.Spice = spice
    return {k.replace("Bleu", "BLEU"): float(v) for k, v in evaluator.eval.items() if k != "SPICE"}


@needs_java
def test_main_equals_official_coco_eval_cap(tmp_path, capsys, monkeypatch):
    """`lit-vlm eval caption` on COCO files == pycocoevalcap's COCOEvalCap on the same files, to the
    last bit; METEOR's java process has ended when caption_metrics returns."""
    import pycocoevalcap.eval  # noqa: F401 - binds the real Meteor before the spy below
    import pycocoevalcap.meteor.meteor as meteor_module

    ref_path, pred_path = write_coco(tmp_path)
    official: dict = {}
    # the official run goes in a thread: both spend their time in Java processes (METEOR loads its
    # paraphrase table for seconds), so the two overlap
    thread = threading.Thread(target=lambda: official.update(official_coco_eval_cap(ref_path, pred_path)))
    thread.start()
    started = []

    class SpyMeteor(meteor_module.Meteor):
        def __init__(self):
            super().__init__()
            started.append(self.meteor_p)

    monkeypatch.setattr(meteor_module, "Meteor", SpyMeteor)
    try:
        assert main(["--references", str(ref_path), "--predictions", str(pred_path), "--output", str(tmp_path / "m.json")]) == 0
    finally:
        thread.join(timeout=120)
    ours = json.loads((tmp_path / "m.json").read_text())
    table = capsys.readouterr().out
    assert "CIDEr" in table and "BLEU_4" in table and "num_samples" in table
    assert len(started) == 1 and started[0].returncode is not None  # the METEOR process has exited

    assert set(official) == {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert {k: ours[k] for k in official} == official
    assert ours["num_samples"] == len(PREDICTIONS)
    assert 0 < ours["BLEU_4"] < ours["BLEU_1"] < 1 and 0 < ours["METEOR"] < 1 and ours["CIDEr"] > 0


@needs_java
def test_hand_computed_bleu_and_rouge():
    # identical up to case and punctuation (removed by the PTB tokenizer): every n-gram matches
    same = caption_metrics({"a": "A man rides a horse."}, {"a": ["a man rides a horse"]}, metrics=("BLEU", "ROUGE_L"))
    for n in (1, 2, 3, 4):  # pycocoevalcap adds 1e-15 / 1e-9 to numerator / denominator
        assert same[f"BLEU_{n}"] == pytest.approx(1.0, abs=1e-8)
    assert same["ROUGE_L"] == 1.0
    # "a dog runs" vs "a cat runs fast": 2 of 3 unigrams match, no bigram does; candidate 3 words,
    # reference 4 -> brevity penalty exp(1 - 4/3); LCS ("a runs") = 2: P = 2/3, R = 2/4, beta = 1.2
    got = caption_metrics({"x": "a dog runs"}, {"x": ["a cat runs fast"]}, metrics=("bleu", "rouge_l"))
    assert got["BLEU_1"] == pytest.approx(2 / 3 * math.exp(1 - 4 / 3), rel=1e-8)
    assert got["BLEU_2"] < 1e-6
    p, r, b2 = 2 / 3, 2 / 4, 1.2**2
    assert got["ROUGE_L"] == pytest.approx((1 + b2) * p * r / (r + b2 * p), rel=1e-12)
    assert set(got) == {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L"}


@needs_java
def test_cider_is_a_set_level_metric():
    """Document frequencies come from the references of the whole set: the CIDEr-D of the set is
    not the mean of its halves' (and a single image scores 0: log(1 image) = 0 weights)."""
    keys = list(PREDICTIONS)
    whole = caption_metrics(PREDICTIONS, REFERENCES, metrics=("CIDEr",))["CIDEr"]
    halves = [
        caption_metrics({k: PREDICTIONS[k] for k in part}, {k: REFERENCES[k] for k in part}, metrics=("CIDEr",))["CIDEr"]
        for part in (keys[:3], keys[3:])
    ]
    assert whole > 0 and all(h > 0 for h in halves)
    mean = sum(halves) / 2  # here 2.562 vs 2.527: far beyond floating-point noise
    assert abs(whole - mean) > 5e-3 * whole


@needs_java
def test_line_breaks_inside_captions_do_not_shift_later_captions():
    # the Java tokenizer ends a line at \r, \v, \f, U+2028, U+2029: unguarded, "b" would be scored as image 2's caption
    got = ptb_tokenize({1: ["a\rb", "c\u2028d"], 2: ["E\x0cf\x0bg"], 3: ["h"]})
    assert got == {1: ["a b", "c d"], 2: ["e f g"], 3: ["h"]}


def test_missing_java_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match="need Java") as err:
        caption_metrics({1: "a"}, {1: ["a"]})
    assert str(err.value) == JAVA_MISSING and "apt-get install default-jre" in JAVA_MISSING
    ref_path, pred_path = write_coco(tmp_path)
    with pytest.raises(captioning.JavaNotFoundError):
        main(["--references", str(ref_path), "--predictions", str(pred_path)])


def test_ids_must_agree_and_metric_names_are_checked():
    with pytest.raises(ValueError, match=r"without a prediction: 2.*without references: 3"):
        caption_metrics({1: "a", 3: "c"}, {1: ["a"], 2: ["b"]})
    with pytest.raises(ValueError, match="image id 1 has no reference"):
        caption_metrics({1: "a"}, {1: []})
    with pytest.raises(ValueError, match="must be a string"):
        caption_metrics({1: None}, {1: ["a"]})
    with pytest.raises(ValueError, match="SPICE is not supported"):
        caption_metrics({1: "a"}, {1: ["a"]}, metrics=("SPICE",))
    with pytest.raises(ValueError, match="unknown caption metric 'BLEURT'"):
        caption_metrics({1: "a"}, {1: ["a"]}, metrics=("BLEURT",))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"image_id": 1, "caption": "a"}, "must be a JSON list"),
        ([["1", "a"]], r"entry 0: expected an object"),
        ([{"image_id": 1, "caption": "a"}, {"caption": "b"}], r"entry 1: missing key\(s\) 'image_id'"),
        ([{"image_id": 1.5, "caption": "a"}], r"entry 0: 'image_id' must be an integer or a string, got 1.5"),
        ([{"image_id": True, "caption": "a"}], r"entry 0: 'image_id' must be an integer or a string"),
        ([{"image_id": 7, "caption": ["a"]}], r"entry 0 \(image_id 7\): 'caption' must be a string, got list"),
        ([{"image_id": 7, "caption": "a"}, {"image_id": 8, "caption": "b"}, {"image_id": 7, "caption": "c"}],
         r"entry 2: duplicate prediction for image_id 7"),
        ([{"image_id": 7, "caption": "a"}, {"image_id": "7", "caption": "c"}], r"entry 1: duplicate prediction for image_id '7'"),
    ],
)
def test_malformed_predictions_file(tmp_path, content, message):
    path = tmp_path / "pred.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as err:
        load_caption_predictions(path)
    assert str(path) in str(err.value)


def test_predictions_file_errors_and_pairing(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON"):
        load_caption_predictions(bad)
    with pytest.raises(FileNotFoundError, match="predictions file not found"):
        load_caption_predictions(tmp_path / "nope.json")
    ref_path, pred_path = write_coco(tmp_path)
    assert load_caption_predictions(pred_path) == {str(k): v for k, v in PREDICTIONS.items()}
    refs = load_caption_references(ref_path)
    assert refs == {str(k): v for k, v in REFERENCES.items()}
    preds = {"1": "x", "2": "y", "99": "z"}
    with pytest.raises(ValueError, match=r"P.json: 1 prediction\(s\) for image ids not in R.json: '99'"):
        align_captions(preds, refs, predictions_name="P.json", references_name="R.json")
    del preds["99"]
    with pytest.raises(ValueError, match=r"no prediction for 4 of the 6 images of R.json: '3', '4', '5', '6'"):
        align_captions(preds, refs, predictions_name="P.json", references_name="R.json")
    p, r = align_captions(preds, refs, allow_missing=True)
    assert p == preds and r == {"1": REFERENCES[1], "2": REFERENCES[2]}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([], "must be a JSON object with an 'annotations' list"),
        ({"annotations": {}}, "'annotations' must be a list"),
        ({"annotations": [{"image_id": 1}]}, r"annotations\[0\]: missing key\(s\) 'caption'"),
        ({"annotations": [{"image_id": 1, "caption": 3}]}, r"annotations\[0\] \(image_id 1\): 'caption' must be a string"),
        ({"images": [{"id": 1}], "annotations": [{"image_id": 2, "caption": "a"}]}, r"annotations\[0\]: image_id 2 is not in 'images'"),
        ({"images": [{"id": 1}, {"id": 2}], "annotations": [{"image_id": 1, "caption": "a"}]}, r"1 image\(s\) in 'images' have no caption: '2'"),
        ({"images": [{"id": 1.0}], "annotations": []}, r"images\[0\]: 'id' must be an integer or a string"),
        ({"annotations": []}, "no captions"),
    ],
)
def test_malformed_references_file(tmp_path, content, message):
    path = tmp_path / "refs.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as err:
        load_caption_references(path)
    assert str(path) in str(err.value)


@needs_java
def test_main_allow_missing_and_errors(tmp_path, capsys):
    ref_path, pred_path = write_coco(tmp_path, predictions={k: PREDICTIONS[k] for k in (1, 2, 4)})
    args = ["--references", str(ref_path), "--predictions", str(pred_path)]
    with pytest.raises(ValueError, match="no prediction for 3 of the 6 images"):
        main(args)
    assert main([*args, "--allow-missing", "--metrics", "BLEU", "--output", str(tmp_path / "m.json")]) == 0
    out = json.loads((tmp_path / "m.json").read_text())
    assert set(out) == {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "num_samples"} and out["num_samples"] == 3
    with pytest.raises(SystemExit):
        main(["--predictions", str(pred_path)])  # --references is required
    assert "--references" in capsys.readouterr().err


# ---- the callback's bookkeeping (no Java: caption_metrics is replaced) --------------------------
class FakeWriter:
    def __init__(self):
        self.texts = []

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))


def test_callback_collects_pairs_and_logs_examples(tmp_path, monkeypatch):
    from doubles import GeneratingDouble

    from lit_vlm.callbacks import captioning as cb_module

    seen = {}

    def fake_metrics(preds, refs, metrics=None, per_image=None):
        seen["preds"], seen["refs"], seen["metrics"] = preds, refs, metrics
        return {"CIDEr": 1.0}

    monkeypatch.setattr(cb_module, "caption_metrics", fake_metrics)
    model = GeneratingDouble()
    images = torch.rand(3, 3, 8, 8)  # [B, 3, H, W]
    batch = {"image": images, "image_id": [5, 6, 7], "sample_id": ["a", "b", "c"],
             "captions": [["five | 5"], ["six"], ["seven", "7"]]}
    callback = cb_module.CaptionEvaluation(splits=["test"], num_examples=2)
    records = callback.collect(None, model, batch)
    assert list(records) == ["5", "6", "7"]
    texts = model.generate(images)
    assert [r[:2] for r in records.values()] == list(zip([5, 6, 7], texts))
    assert callback.compute([records[k] for k in sorted(records)]) == {"CIDEr": 1.0}
    assert seen["preds"] == dict(zip(["5", "6", "7"], texts))
    assert seen["refs"] == {"5": ["five | 5"], "6": ["six"], "7": ["seven", "7"]}
    assert tuple(seen["metrics"]) == ("BLEU", "METEOR", "ROUGE_L", "CIDEr")
    with pytest.raises(ValueError, match="SPICE"):
        cb_module.CaptionEvaluation(metrics=["CIDEr", "SPICE"])
    assert callback._results == [{"image_id": i, "caption": t} for i, t in zip([5, 6, 7], texts)]
    writer = FakeWriter()
    callback.log_examples(writer, "test", 3, sorted(records), [records[k] for k in sorted(records)])
    (tag, text, step), = writer.texts
    assert tag == "test/caption/examples" and step == 3
    assert text.count("\n") == 3 and "five \\| 5" in text and "seven<br>7" not in text  # 2 examples only

    # with a references file: its captions are used, unevaluated images are allowed, unknown ids are not
    ref_path, _ = write_coco(tmp_path, references={5: ["ref five"], 6: ["ref six"], 7: ["ref seven"], 8: ["ref eight"]})
    callback = cb_module.CaptionEvaluation(splits=["test"], references=str(ref_path))
    callback._file_refs, callback._file_refs_path = load_caption_references(ref_path), str(ref_path)
    records = callback.collect(None, model, {k: v for k, v in batch.items() if k != "captions"})
    callback.compute([records[k] for k in sorted(records)])
    assert seen["refs"] == {"5": ["ref five"], "6": ["ref six"], "7": ["ref seven"]}
    batch["image_id"] = [5, 6, 9]
    records = callback.collect(None, model, batch)
    with pytest.raises(ValueError, match=r"not in .*captions.json: '9'"):
        callback.compute([records[k] for k in sorted(records)])


def test_callback_arguments_are_checked():
    from lit_vlm.callbacks.captioning import CaptionEvaluation

    with pytest.raises(ValueError, match="max_new_tokens"):
        CaptionEvaluation(max_new_tokens=0)
    with pytest.raises(ValueError, match="references keys"):
        CaptionEvaluation(references={"train": "x.json"})
    with pytest.raises(ValueError, match="splits"):
        CaptionEvaluation(splits=["train"])
