"""VQA accuracy (lit_vlm.vqa) against hand-derived cases, its file validation and CLI, and the
VQAEvaluation callback through a real Trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lit_vlm import vqa
from lit_vlm.vqa import (
    load_annotations,
    load_predictions,
    load_questions,
    normalize_answer,
    per_question_accuracy,
    question_accuracy,
    vqa_accuracy,
)

FIXTURE = Path(__file__).parent / "fixtures" / "vqa_cases.json"
CASES = json.loads(FIXTURE.read_text())


def k_accuracy(k: int) -> float:
    return (k * min(1.0, (k - 1) / 3) + (10 - k) * min(1.0, k / 3)) / 10


def official_annotations(cases: list[dict]) -> dict:
    return {
        "annotations": [
            {
                "question_id": c["question_id"],
                "image_id": 1000 + c["question_id"] // 4,
                "question_type": c["question_type"],
                "answer_type": c["answer_type"],
                "multiple_choice_answer": c["answers"][0],
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(c["answers"])
                ],
            }
            for c in cases
        ]
    }


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


# ---------------------------------------------------------------------------------------------
# The fixture: every case, and the aggregates
# ---------------------------------------------------------------------------------------------


def test_fixture_is_large_and_varied():
    assert len(CASES) >= 300
    assert len({c["question_id"] for c in CASES}) == len(CASES)
    assert {round(c["expected"], 6) for c in CASES} >= {0.0, 0.3, 0.6, 0.9, 1.0}
    assert any(c["expected"] != c["expected_always_normalize"] for c in CASES)
    assert all(len(c["answers"]) == 10 for c in CASES)


@pytest.mark.parametrize("always", [False, True], ids=["official", "always_normalize"])
def test_every_fixture_case(always):
    key = "expected_always_normalize" if always else "expected"
    annotations = official_annotations(CASES)
    predictions = {c["question_id"]: c["prediction"] for c in CASES}
    got = per_question_accuracy(predictions, annotations, always_normalize=always)
    assert list(got) == [c["question_id"] for c in CASES]  # annotation order
    wrong = [
        (c["question_id"], c["prediction"], got[c["question_id"]], c[key], c["rule"])
        for c in CASES
        if not math.isclose(got[c["question_id"]], c[key], abs_tol=1e-12)
    ]
    assert not wrong, "\n".join(map(repr, wrong[:20]))
    # plain string answers give the same numbers
    for c in CASES[:80]:
        assert math.isclose(question_accuracy(c["prediction"], c["answers"], always), c[key], abs_tol=1e-12)


@pytest.mark.parametrize("always", [False, True], ids=["official", "always_normalize"])
def test_fixture_aggregates(always):
    key = "expected_always_normalize" if always else "expected"
    metrics = vqa_accuracy(
        {c["question_id"]: c["prediction"] for c in CASES}, official_annotations(CASES), always_normalize=always
    )
    assert metrics["num_questions"] == len(CASES)
    assert math.isclose(metrics["overall"], mean(c[key] for c in CASES), abs_tol=1e-12)
    for atype in {c["answer_type"] for c in CASES}:
        want = mean(c[key] for c in CASES if c["answer_type"] == atype)
        assert math.isclose(metrics[f"answer_type/{atype}"], want, abs_tol=1e-12)
    for qtype in {c["question_type"] for c in CASES}:
        want = mean(c[key] for c in CASES if c["question_type"] == qtype)
        assert math.isclose(metrics[f"question_type/{qtype}"], want, abs_tol=1e-12)
    assert set(metrics) == {"overall", "num_questions"} | {f"answer_type/{c['answer_type']}" for c in CASES} | {
        f"question_type/{c['question_type']}" for c in CASES
    }
    names = list(metrics)
    assert names[0] == "overall" and names[1:4] == ["answer_type/yes/no", "answer_type/number", "answer_type/other"]


def test_fixture_generator_is_reproducible(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_vqa_cases", FIXTURE.with_name("make_vqa_cases.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build() == CASES
    assert all(math.isclose(module.k_accuracy(k), k_accuracy(k)) for k in range(11))


# ---------------------------------------------------------------------------------------------
# Normalisation by hand
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Two dogs.", "2 dogs"),
        ("  yes\n", "yes"),
        ("red\tcar", "red car"),
        ("x-y", "x y"),  # replaced by a space
        ("x-y -z", "xy z"),  # ' -' occurs: every hyphen deleted
        ("x,y", "x y"),
        ("1,000 x-y", "1000 xy"),  # a digit-comma-digit deletes all punctuation
        ("x-;y-z", "x y z"),  # the space test looks at the original text
        ('"hello"', "hello"),
        ("(left)", "left"),
        ("t_shirt", "t shirt"),
        ("x:y", "x:y"),  # colon is not punctuation here
        ("rock'n'roll", "rock'n'roll"),
        ("2.5", "2.5"),
        ("end.", "end"),
        ("5.x", "5x"),  # the mistyped look-behind never protects a period after a digit
        ("e.g.", "eg"),
        ("x" + "." * 33, "x."),  # at most 32 periods removed
        ("x" + "." * 32, "x"),
        ("none", "0"),
        ("Ten", "10"),
        ("eleven", "eleven"),
        ("an apple", "apple"),
        ("the the a", ""),
        ("theater", "theater"),
        ("dont", "don't"),
        ("Dont", "don't"),
        ("wouldnt've", "wouldn't've"),
        ("Im", "im"),  # capitalised table key never matches
        ("somebody'd", "somebodyd"),  # the table's reversed entry
        ("let's", "let's"),
        ("twas", "'twas"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_tables():
    assert len(vqa.PUNCTUATION) == len(set(vqa.PUNCTUATION)) == 21
    assert "." not in vqa.PUNCTUATION and "'" not in vqa.PUNCTUATION and ":" not in vqa.PUNCTUATION
    assert len(vqa.CONTRACTIONS) == 120
    assert list(vqa.NUMBER_WORDS.values()) == ["0", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"]
    assert vqa.ARTICLES == {"a", "an", "the"}


def test_normalisation_only_when_annotators_disagree():
    assert question_accuracy("Yes", ["yes"] * 10) == 0.0
    assert question_accuracy("Yes", ["yes"] * 10, always_normalize=True) == 1.0
    assert question_accuracy("Yes", ["yes"] * 9 + ["Yes"]) == 1.0
    assert question_accuracy("yes", ["yes"] * 9 + ["yes\t"]) == 1.0  # cleaned -> unanimous -> raw match


@pytest.mark.parametrize("k", range(11))
def test_min_one_third_rule(k):
    answers = ["yes"] * k + ["no"] * (10 - k)
    want = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9}.get(k, 1.0)
    assert math.isclose(question_accuracy("yes", answers), want, abs_tol=1e-12)


def test_leave_one_out_compares_whole_answer_records():
    # The evaluator leaves out every record equal to the held-out one. Records 0 and 1 are identical:
    # held out, either leaves 1 'cat' (1/3); record 2 leaves 2 (2/3); each 'dog' leaves 3 (1).
    twin = {"answer": "cat", "answer_confidence": "yes", "answer_id": 1}
    answers = [dict(twin), dict(twin), {"answer": "cat", "answer_confidence": "yes", "answer_id": 2}]
    answers += [{"answer": "dog", "answer_confidence": "yes", "answer_id": i} for i in range(4, 11)]
    assert math.isclose(question_accuracy("cat", answers), (1 / 3 + 1 / 3 + 2 / 3 + 7) / 10)
    # Without answer ids, equal answers are equal records: a 'cat' held out leaves no 'cat' (0),
    # a 'dog' held out leaves all 3 (1): 7/10.
    plain = [{"answer": "cat"}] * 3 + [{"answer": "dog"}] * 7
    assert math.isclose(question_accuracy("cat", plain), 0.7)
    # Strings are distinct records: the usual 0.9.
    assert math.isclose(question_accuracy("cat", ["cat"] * 3 + ["dog"] * 7), 0.9)


def test_question_accuracy_needs_answers():
    with pytest.raises(ValueError, match="at least one"):
        question_accuracy("x", [])


# ---------------------------------------------------------------------------------------------
# Files and errors
# ---------------------------------------------------------------------------------------------

TINY = [
    # question 1: 'yes' by 10/10 (unanimous); question 2: '2' by 1/10; question 3: 'red' by 2/10
    {"question_id": 1, "image_id": 7, "question_type": "is the", "answer_type": "yes/no", "answers": ["yes"] * 10},
    {"question_id": 2, "image_id": 7, "question_type": "how many", "answer_type": "number",
     "answers": ["two"] + ["3"] * 9},
    {"question_id": 3, "image_id": 8, "question_type": "what color is the", "answer_type": "other",
     "answers": ["Red", "red."] + ["blue"] * 8},
]
TINY_PREDICTIONS = [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "2"},
                    {"question_id": 3, "answer": "the red"}]
TINY_EXPECTED = {1: 1.0, 2: 0.3, 3: 0.6}


def write_tiny(tmp_path: Path, predictions=TINY_PREDICTIONS) -> dict[str, Path]:
    anns = {"info": {}, "annotations": [
        {**{k: v for k, v in q.items() if k != "answers"}, "multiple_choice_answer": q["answers"][0],
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(q["answers"])]}
        for q in TINY
    ]}
    questions = {"questions": [{"question_id": q["question_id"], "image_id": q["image_id"],
                                "question": f"question {q['question_id']}?"} for q in TINY]}
    paths = {"annotations": tmp_path / "anns.json", "questions": tmp_path / "qs.json", "predictions": tmp_path / "preds.json"}
    paths["annotations"].write_text(json.dumps(anns))
    paths["questions"].write_text(json.dumps(questions))
    paths["predictions"].write_text(json.dumps(predictions))
    return paths


def test_tiny_files_by_hand(tmp_path):
    paths = write_tiny(tmp_path)
    anns = load_annotations(paths["annotations"])
    preds = load_predictions(paths["predictions"], anns)
    assert preds == {1: "yes", 2: "2", 3: "the red"}
    assert per_question_accuracy(preds, anns) == pytest.approx(TINY_EXPECTED, abs=1e-12)
    metrics = vqa_accuracy(preds, anns, load_questions(paths["questions"]))
    assert metrics["overall"] == pytest.approx(1.9 / 3)
    assert metrics["answer_type/yes/no"] == 1.0
    assert metrics["answer_type/number"] == pytest.approx(0.3)
    assert metrics["question_type/what color is the"] == pytest.approx(0.6)
    assert metrics["num_questions"] == 3


@pytest.mark.parametrize(
    "content, message",
    [
        ({"question_id": 1, "answer": "yes"}, r"preds\.json: expected the official VQA results format, a list"),
        ([{"question_id": 1}], r"preds\.json: entry #0 lacks key\(s\) answer"),
        ([{"answer": "yes"}], r"entry #0 lacks key\(s\) question_id"),
        ([{"question_id": "1", "answer": "yes"}], r"entry #0: question_id must be an integer, got str"),
        ([{"question_id": 1.0, "answer": "yes"}], r"question_id must be an integer, got float"),
        ([{"question_id": True, "answer": "yes"}], r"question_id must be an integer, got bool"),
        ([{"question_id": 1, "answer": 2}], r"entry #0 \(question_id 1\): answer must be a string, got int"),
        ([{"question_id": 1, "answer": None}], r"answer must be a string, got NoneType"),
        (["yes"], r"entry #0 must be an object"),
        ([{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "2"}, {"question_id": 1, "answer": "no"}],
         r"entry #2: duplicate question_id 1 \(first at entry #0\)"),
    ],
)
def test_malformed_predictions(tmp_path, content, message):
    paths = write_tiny(tmp_path, content)
    with pytest.raises(ValueError, match=message):
        load_predictions(paths["predictions"], load_annotations(paths["annotations"]))


def test_prediction_ids_against_annotations(tmp_path):
    extra = TINY_PREDICTIONS + [{"question_id": 99, "answer": "x"}, {"question_id": 98, "answer": "y"}]
    paths = write_tiny(tmp_path, extra)
    anns = load_annotations(paths["annotations"])
    with pytest.raises(ValueError, match=r"preds\.json: 2 prediction\(s\) for question ids not in the annotations: 99, 98"):
        load_predictions(paths["predictions"], anns)
    paths = write_tiny(tmp_path, TINY_PREDICTIONS[:1])
    with pytest.raises(ValueError, match=r"no prediction for 2 of 3 annotated questions, e\.g\. 2, 3"):
        load_predictions(paths["predictions"], anns)
    assert load_predictions(paths["predictions"], anns, allow_missing=True) == {1: "yes"}
    with pytest.raises(ValueError, match=r"no prediction for 2 of 3"):
        vqa_accuracy({1: "yes"}, anns)
    partial = vqa_accuracy({1: "yes", 3: "the red"}, anns, allow_missing=True)
    assert partial["num_questions"] == 2 and partial["overall"] == pytest.approx(0.8)
    assert "answer_type/number" not in partial
    with pytest.raises(ValueError, match="question ids must be integers, got str"):
        vqa_accuracy({"1": "yes", 2: "2", 3: "x"}, anns)
    with pytest.raises(ValueError, match="must be a mapping"):
        vqa_accuracy(TINY_PREDICTIONS, anns)


def test_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match=r"predictions file not found: .*nope\.json"):
        load_predictions(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"question_id": 1,')
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON \(.* at line 1"):
        load_predictions(bad)


def _ann(**over):
    base = {"question_id": 5, "image_id": 1, "question_type": "what", "answer_type": "other",
            "answers": [{"answer": "x", "answer_confidence": "yes", "answer_id": 1}]}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"questions": []}, r"anns\.json: expected the official VQA JSON, an object with a list under 'annotations'"),
        ({"annotations": {}}, r"'annotations' must be a list of objects, got dict"),
        ({"annotations": [_ann(answers=None)]}, r"annotation #0 \(question_id 5\) lacks key\(s\) answers"),
        ({"annotations": [_ann(question_id=None)]}, r"annotation #0 lacks key\(s\) question_id"),
        ({"annotations": [_ann(question_id="5")]}, r"question_id must be an integer, got str"),
        ({"annotations": [_ann(), _ann(question_id=6), _ann()]},
         r"annotation #2 \(question_id 5\): duplicate question_id 5 \(first at annotation #0\)"),
        ({"annotations": [_ann(answers=[])]}, r"answers must be a non-empty list"),
        ({"annotations": [_ann(answers=[{"answer": 3}])]}, r"answer #0 must be an object with a string 'answer'"),
        ({"annotations": [_ann(answer_type=None)]}, r"lacks key\(s\) answer_type"),
        ({"annotations": [_ann(question_type=7)]}, r"question_type must be a string, got int"),
        ({"annotations": [_ann(image_id=[1])]}, r"image_id must be an integer or a string"),
    ],
)
def test_malformed_annotations(tmp_path, data, message):
    path = tmp_path / "anns.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_annotations(path)


def test_questions_checked_against_annotations(tmp_path):
    anns = load_annotations(write_tiny(tmp_path)["annotations"])
    preds = {1: "yes", 2: "2", 3: "red"}
    qs = {"questions": [{"question_id": 1, "image_id": 7, "question": "?"}, {"question_id": 2, "image_id": 7, "question": "?"}]}
    with pytest.raises(ValueError, match=r"1 annotated question id\(s\) are not in the questions file: 3"):
        vqa_accuracy(preds, anns, qs)
    qs["questions"].append({"question_id": 3, "image_id": 9, "question": "?"})
    with pytest.raises(ValueError, match=r"question_id 3 is on image_id 9 in the questions but on image_id 8"):
        vqa_accuracy(preds, anns, qs)
    qs["questions"][-1]["image_id"] = 8
    qs["questions"].append({"question_id": 4, "image_id": 8, "question": "unannotated: ignored"})
    assert vqa_accuracy(preds, anns, qs)["num_questions"] == 3
    bad = {"questions": [{"question_id": 1, "image_id": 7}]}
    with pytest.raises(ValueError, match=r"question #0 \(question_id 1\) lacks key\(s\) question"):
        vqa_accuracy(preds, anns, bad)


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------


def test_main_prints_and_writes(tmp_path, capsys):
    paths = write_tiny(tmp_path)
    out_json = tmp_path / "out" / "metrics.json"
    argv = ["--annotations", str(paths["annotations"]), "--questions", str(paths["questions"]),
            "--predictions", str(paths["predictions"]), "--output", str(out_json)]
    assert vqa.main(argv) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]
    assert ["overall", "63.33", "3"] in lines
    assert ["answer_type/yes/no", "100.00", "1"] in lines
    assert ["answer_type/number", "30.00", "1"] in lines
    assert ["answer_type/other", "60.00", "1"] in lines
    assert ["question_type/what", "color", "is", "the", "60.00", "1"] in lines
    assert out.index("overall") < out.index("answer_type/yes/no") < out.index("question_type/")
    saved = json.loads(out_json.read_text())
    assert saved["overall"] == pytest.approx(1.9 / 3) and saved["num_questions"] == 3

    # --always-normalize: question 1 unchanged, nothing else changes either here
    assert vqa.main(argv[:-2] + ["--always-normalize"]) == 0
    assert "63.33" in capsys.readouterr().out


def test_main_errors_and_allow_missing(tmp_path, capsys):
    paths = write_tiny(tmp_path, TINY_PREDICTIONS[:2])
    argv = ["--annotations", str(paths["annotations"]), "--questions", str(paths["questions"]),
            "--predictions", str(paths["predictions"])]
    assert vqa.main(argv) == 2
    err = capsys.readouterr().err
    assert "preds.json" in err and "no prediction for 1 of 3" in err and "Traceback" not in err
    assert vqa.main(argv + ["--allow-missing"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["overall", "65.00", "2"] in lines  # (1.0 + 0.3) / 2
    assert vqa.main(["--annotations", str(tmp_path / "missing.json"), "--questions", str(paths["questions"]),
                     "--predictions", str(paths["predictions"])]) == 2
    assert "annotations file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vqa.main(["--annotations", "a.json"])  # argparse: required arguments missing


def test_always_normalize_flag_changes_the_number(tmp_path, capsys):
    paths = write_tiny(tmp_path, [{"question_id": 1, "answer": "Yes."}, {"question_id": 2, "answer": "2"},
                                  {"question_id": 3, "answer": "the red"}])
    argv = ["--annotations", str(paths["annotations"]), "--questions", str(paths["questions"]),
            "--predictions", str(paths["predictions"])]
    assert vqa.main(argv) == 0
    assert ["overall", "30.00", "3"] in [line.split() for line in capsys.readouterr().out.splitlines()]
    assert vqa.main(argv + ["--always-normalize"]) == 0
    assert ["overall", "63.33", "3"] in [line.split() for line in capsys.readouterr().out.splitlines()]


# ---------------------------------------------------------------------------------------------
# The callback through a real Trainer
# ---------------------------------------------------------------------------------------------

QUESTIONS_PER_IMAGE = [2, 1, 3, 0, 2, 1]  # six images, the fourth without questions
WORDS = ["alpha", "beta", "gamma", "delta"]


def _world():
    """Six 8x8 images in two batches, their questions, and per question how many annotators agree
    with what the double will answer (so the expected accuracy is known by hand too)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 8, 8, generator=g)  # [6, 3, 8, 8]
    questions = []  # (question_id, image row, text)
    for row, n in enumerate(QUESTIONS_PER_IMAGE):
        for j in range(n):
            questions.append((100 * (row + 1) + j, row, f"what is {WORDS[j % 4]} number {row}?"))
    return images, questions


def _batches(images, questions, prefix_rows=((0, 3), (3, 6))):
    batches = []
    for lo, hi in prefix_rows:
        qs = [q for q in questions if lo <= q[1] < hi]
        batches.append(
            {
                "image": images[lo:hi],  # [B, 3, 8, 8]
                "sample_id": [f"img{r:03d}" for r in range(lo, hi)],
                "image_id": [r for r in range(lo, hi)],
                "label": torch.full((hi - lo,), -1),
                "question": [q[2] for q in qs],
                "question_id": [q[0] for q in qs],
                "question_owner": torch.tensor([q[1] - lo for q in qs], dtype=torch.long),  # [Q]
            }
        )
    return batches


def _annotations(tmp_path, images, questions, prompt):
    from doubles import GeneratingDouble

    rows = torch.tensor([q[1] for q in questions])
    answers = GeneratingDouble().generate(images[rows], [prompt.format(question=q[2]) for q in questions])
    ks = [(7 * i) % 11 for i in range(len(questions))]  # 0..10 annotators agreeing with the double
    anns, qs = [], []
    for (qid, row, text), answer, k in zip(questions, answers, ks):
        given = [answer.upper() if i % 2 else answer for i in range(k)] + ["zzz"] * (10 - k)
        if k == 10:
            given = [answer] * 10  # unanimous: raw comparison, still equal
        anns.append({"question_id": qid, "image_id": row, "question_type": "how many" if row % 2 else "what is",
                     "answer_type": "yes/no" if row == 0 else "other", "multiple_choice_answer": given[0],
                     "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(given)]})
        qs.append({"question_id": qid, "image_id": row, "question": text})
    # a question of an image that is not evaluated: must not count
    anns.append({"question_id": 9999, "image_id": 99, "question_type": "what is", "answer_type": "other",
                 "multiple_choice_answer": "x", "answers": [{"answer": "x", "answer_confidence": "yes", "answer_id": 1}]})
    qs.append({"question_id": 9999, "image_id": 99, "question": "never asked?"})
    paths = (tmp_path / "vqa_annotations.json", tmp_path / "vqa_questions.json")
    paths[0].write_text(json.dumps({"annotations": anns}))
    paths[1].write_text(json.dumps({"questions": qs}))
    predictions = {q[0]: a for q, a in zip(questions, answers)}
    return paths, predictions, ks


def _trainer(tmp_path, callback):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(tmp_path, name="run"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )


def test_callback_through_trainer(tmp_path):
    from doubles import GeneratingDouble
    from torch.utils.data import DataLoader

    from lit_vlm.callbacks.vqa import VQAEvaluation

    prompt = "Q: {question} A:"
    images, questions = _world()
    (ann_path, q_path), predictions, ks = _annotations(tmp_path, images, questions, prompt)
    assert len(set(predictions.values())) > 2  # the double answers variously
    callback = VQAEvaluation(splits=["test"], prompt=prompt, annotations=str(ann_path), questions=str(q_path),
                             batch_size=2, num_examples=3)
    trainer = _trainer(tmp_path, callback)
    trainer.test(GeneratingDouble(), dataloaders=DataLoader(_batches(images, questions), batch_size=None))

    expected = vqa_accuracy(predictions, [a for a in load_annotations(ann_path) if a["question_id"] != 9999])
    assert math.isclose(expected["overall"], mean(k_accuracy(k) for k in ks), abs_tol=1e-12)  # by hand as well
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert logged["test/vqa/overall"] == pytest.approx(expected["overall"], abs=1e-6)
    assert logged["test/vqa/answer_type/yes_no"] == pytest.approx(expected["answer_type/yes/no"], abs=1e-6)
    assert logged["test/vqa/answer_type/other"] == pytest.approx(expected["answer_type/other"], abs=1e-6)
    assert logged["test/vqa/question_type/how_many"] == pytest.approx(expected["question_type/how many"], abs=1e-6)
    assert logged["test/vqa/question_type/what_is"] == pytest.approx(expected["question_type/what is"], abs=1e-6)
    assert logged["test/vqa/num_questions"] == len(questions) == 9
    assert callback.metrics["test"]["overall"] == pytest.approx(expected["overall"], abs=1e-12)

    # predictions kept and written in the official results format
    want = [{"question_id": qid, "answer": predictions[qid]} for qid in sorted(predictions)]
    assert callback.predictions["test"] == want
    path = Path(trainer.log_dir) / "vqa_predictions_test.json"
    assert callback.prediction_files["test"] == path
    assert json.loads(path.read_text()) == want
    assert load_predictions(path) == predictions

    # the examples table reached TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trainer.log_dir), size_guidance={"tensors": 0})
    events.Reload()
    tags = events.Tags()["tensors"]
    assert any(t.startswith("test/vqa/examples") for t in tags), tags
    text = events.Tensors(next(t for t in tags if t.startswith("test/vqa/examples")))[0].tensor_proto.string_val[0].decode()
    assert "| question_id |" in text and str(questions[0][0]) in text and questions[0][2] in text


def test_multiple_choice_asks_lettered_options_and_scores_the_chosen_one(tmp_path):
    from lightning.pytorch import LightningModule
    from torch.utils.data import DataLoader

    from lit_vlm.callbacks.vqa import PROMPTS, VQAEvaluation, choice_options, read_choice
    from lit_vlm.errors import UserError

    images, questions = _world()
    anns = []
    for i, (qid, row, _) in enumerate(questions):
        answer = WORDS[i % 4]  # four answers of one answer type; the annotators agree
        anns.append({"question_id": qid, "image_id": row, "question_type": "what is", "answer_type": "other",
                     "multiple_choice_answer": answer,
                     "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)]})
    path = tmp_path / "mc.json"
    path.write_text(json.dumps({"annotations": anns}))
    asked = []

    class AlwaysB(LightningModule):  # answers "B." to everything
        def test_step(self, batch, batch_idx):
            return None

        def generate(self, images, prompts, max_new_tokens=None):
            asked.extend(prompts)
            return ["B." for _ in prompts]

    callback = VQAEvaluation(splits=["test"], prompt="multiple_choice", choices=3, annotations=str(path))
    _trainer(tmp_path, callback).test(AlwaysB(), dataloaders=DataLoader(_batches(images, questions), batch_size=None))
    pool = sorted(WORDS)
    options = {a["question_id"]: choice_options(a, pool, 3) for a in anns}
    for a, options_q in zip(anns, options.values()):  # the answer and two others, the same on every call
        assert a["multiple_choice_answer"] in options_q and len(set(options_q)) == 3
        assert choice_options(a, pool, 3) == options_q
    first = anns[0]
    text = next(q for q in questions if q[0] == first["question_id"])[2]
    listed = "\n".join(f"{letter}. {o}" for letter, o in zip("ABC", options[first["question_id"]]))
    assert asked[0] == PROMPTS["multiple_choice"].format(question=text, choices=listed)
    right = mean(float(options[a["question_id"]][1] == a["multiple_choice_answer"]) for a in anns)
    assert callback.metrics["test"]["overall"] == pytest.approx(right, abs=1e-12)  # option B scored by the official metric
    assert {r["answer"] for r in callback.predictions["test"]} <= set(WORDS)
    assert [read_choice(a, ["x", "y"]) for a in ("b", "(A) x", "B) y", "C", "yes")] == ["y", "x", "y", "C", "yes"]
    with pytest.raises(UserError, match="choices"):
        VQAEvaluation(prompt="{question}", choices=3)  # the options must be shown
    with pytest.raises(UserError, match="choices"):
        VQAEvaluation(choices=1)


def test_callback_uses_the_datamodules_annotations(tmp_path):
    import lightning.pytorch as pl
    from doubles import GeneratingDouble
    from torch.utils.data import DataLoader

    from lit_vlm.callbacks.vqa import VQAEvaluation

    images, questions = _world()
    (ann_path, q_path), predictions, _ = _annotations(tmp_path, images, questions, "{question}")
    batches = _batches(images, questions)

    class TinyData(pl.LightningDataModule):
        def __init__(self, known):
            super().__init__()
            self.known = known

        def test_dataloader(self):
            return DataLoader(batches, batch_size=None)

        def eval_annotations(self, stage):
            return self.known

    callback = VQAEvaluation(splits=["test"], num_examples=0, save_predictions=False)
    trainer = _trainer(tmp_path, callback)
    trainer.test(GeneratingDouble(), datamodule=TinyData({"vqa_annotations": str(ann_path), "vqa_questions": str(q_path)}))
    expected = vqa_accuracy(predictions, [a for a in load_annotations(ann_path) if a["question_id"] != 9999])
    assert float(trainer.callback_metrics["test/vqa/overall"]) == pytest.approx(expected["overall"], abs=1e-6)
    assert "test" not in callback.prediction_files

    callback = VQAEvaluation(splits=["test"])
    with pytest.raises(ValueError, match=r"TinyData\.eval_annotations\('test'\) has no 'vqa_annotations'"):
        _trainer(tmp_path, callback).test(GeneratingDouble(), datamodule=TinyData({"captions": "c.json"}))
    callback = VQAEvaluation(splits=["test"])
    with pytest.raises(ValueError, match="no DataModule offering eval_annotations"):
        _trainer(tmp_path, callback).test(GeneratingDouble(), dataloaders=DataLoader(batches, batch_size=None))


def test_callback_batches_without_questions(tmp_path, caplog):
    from doubles import GeneratingDouble
    from torch.utils.data import DataLoader

    from lit_vlm.callbacks.vqa import VQAEvaluation

    images, questions = _world()
    (ann_path, _), _, _ = _annotations(tmp_path, images, questions, "{question}")
    batches = _batches(images, [])  # question_owner empty everywhere
    callback = VQAEvaluation(splits=["test"], annotations=str(ann_path))
    trainer = _trainer(tmp_path, callback)
    trainer.test(GeneratingDouble(), dataloaders=DataLoader(batches, batch_size=None))
    assert "test/vqa/overall" not in trainer.callback_metrics
    assert "test" not in callback.predictions


def test_callback_arguments_and_names():
    from lit_vlm.callbacks.vqa import VQAEvaluation, metric_name

    for bad in ["{}", "{q}", "no field", "{question} {0}"]:
        with pytest.raises(ValueError, match="prompt"):
            VQAEvaluation(prompt=bad)
    with pytest.raises(ValueError, match="max_new_tokens"):
        VQAEvaluation(max_new_tokens=0)
    assert metric_name("answer_type/yes/no") == "answer_type/yes_no"
    assert metric_name("question_type/what color is the") == "question_type/what_color_is_the"
    assert metric_name("question_type/is this a?") == "question_type/is_this_a"
    assert metric_name("overall") == "overall"
