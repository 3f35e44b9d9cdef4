"""A VQA test run against the per-question-type prior, per answer type, with two standard errors.

    python benchmarks/vqa_vs_prior.py runs/llava-stage2/version_1
    python benchmarks/vqa_vs_prior.py RUN --annotations data/synth/annotations/vqa_test_annotations.json

Reads the run's ``vqa_predictions_test.json`` (written by ``VQAEvaluation``) and the annotations,
scores every question with the official VQA accuracy, and prints for each answer type the model's
accuracy with its standard error, the prior's (the most common answer of each question type over
the same questions, as ``VQAEvaluation(baseline: true)`` scores it), their difference, and the
difference in units of (a) the model's standard error and (b) the paired standard error of the
per-question difference. The paired one is the test of "above the prior": both are scored on the
same questions.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from lit_vlm.callbacks.vqa import majority_answers
from lit_vlm.vqa import question_accuracy


def mean_se(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def ratio(d: float, se: float) -> str:
    """``d`` in units of ``se``; a zero error (every answer scored alike) gives inf, or 0 for no difference."""
    return f"{d / se if se else math.copysign(math.inf, d) if d else 0.0:>6.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a test run's folder (holding vqa_predictions_test.json)")
    parser.add_argument("--annotations", default="data/synth/annotations/vqa_test_annotations.json")
    args = parser.parse_args(argv)
    listed = json.loads((Path(args.run) / "vqa_predictions_test.json").read_text())
    predictions = {p["question_id"]: p["answer"] for p in listed}
    asked = [a for a in json.loads(Path(args.annotations).read_text())["annotations"] if a["question_id"] in predictions]
    prior = majority_answers(asked)
    print(f"{'answer type':<12} {'n':>5} {'model':>7} {'± SE':>7} {'prior':>7} {'diff':>7} {'SEs':>6} {'paired SE':>10} {'SEs':>6}")
    for kind in sorted({a["answer_type"] for a in asked}) + ["overall"]:
        chosen = [a for a in asked if kind == "overall" or a["answer_type"] == kind]
        model = [question_accuracy(predictions[a["question_id"]], a["answers"]) for a in chosen]
        base = [question_accuracy(prior[a.get("question_type", "")], a["answers"]) for a in chosen]
        m, se = mean_se(model)
        d, paired = mean_se([x - y for x, y in zip(model, base)])
        print(f"{kind:<12} {len(chosen):>5} {m:>7.4f} {se:>7.4f} {m - d:>7.4f} {d:>+7.4f} {ratio(d, se)} {paired:>10.4f} {ratio(d, paired)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
