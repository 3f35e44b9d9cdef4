"""POPE (Li et al., 2023): object hallucination measured by yes/no questions, for any family with
the ``generate`` capability.

Each evaluated image is asked "Is there a {object} in the image?" for objects it holds (label yes)
and as many it does not (label no), drawn three ways (``random``, ``popular``, ``adversarial``;
the synthetic world writes them as ``annotations/pope_{split}.json``). An answer counts as ``no``
when its first sentence holds the word "no" or "not", else ``yes`` (POPE's reading). Per kind and
over all: accuracy, precision, recall and F1 with ``yes`` as the positive class, and the yes-ratio
(a model that always says yes has recall 1 and a yes-ratio near 0.5 on POPE's balanced questions).
"""

from __future__ import annotations

import json
import re
from typing import Any

import lightning.pytorch as pl

from lit_vlm.callbacks.base import EvalCallback, annotation_file, require_capability
from lit_vlm.callbacks.vqa import PROMPTS
from lit_vlm.errors import UserError

_WORDS = re.compile(r"[a-z']+")


def read_yes_no(answer: str) -> str:
    """POPE's reading of a free answer: ``no`` if its first sentence says "no" or "not", else ``yes``."""
    first = answer.strip().lower().split(".")[0]
    words = set(_WORDS.findall(first))
    return "no" if words & {"no", "not"} else "yes"


def pope_metrics(labels: list[str], predictions: list[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (``yes`` positive) and yes-ratio of yes/no predictions."""
    pairs = list(zip(labels, predictions))
    tp = sum(1 for lab, p in pairs if lab == "yes" and p == "yes")
    fp = sum(1 for lab, p in pairs if lab == "no" and p == "yes")
    fn = sum(1 for lab, p in pairs if lab == "yes" and p == "no")
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = sum(1 for lab, p in pairs if lab == p) / n if n else 0.0
    return {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(1 for p in predictions if p == "yes") / n if n else 0.0, "num_questions": float(n)}


class POPEEvaluation(EvalCallback):
    """POPE accuracy, precision, recall, F1 and yes-ratio per negative kind (see the module docstring),
    logged as ``{stage}/pope/{kind}/{metric}`` and ``{stage}/pope/all/{metric}``.

    Reads the batch keys ``image`` and ``image_id``; the questions come from ``annotations`` (default:
    the DataModule's ``eval_annotations(stage)["pope"]``): a JSON object whose ``questions`` hold
    ``question_id``, ``image_id``, ``question``, ``label`` (yes/no) and ``category``.

    Args:
        splits: Stages to evaluate on, among "val" and "test".
        annotations: The POPE questions file (one path, or ``{stage: path}``).
        prompt: Format string with ``{question}``, or a name from the VQA callback's ``PROMPTS``
            (default ``short_answer``, what LLaVA-1.5 asks POPE with).
        max_new_tokens: Generation budget per answer.
        batch_size: Questions per ``generate`` call.
        prefix: Metric namespace.
    """

    def __init__(self, splits: tuple[str, ...] | list[str] = ("test",), annotations: str | dict[str, str] | None = None,
                 prompt: str = "short_answer", max_new_tokens: int = 3, batch_size: int = 64, prefix: str = "pope") -> None:
        super().__init__(splits, prefix)
        self.annotations = annotations
        self.prompt = PROMPTS.get(prompt, prompt)
        if "{question}" not in self.prompt:
            raise UserError(f"POPEEvaluation prompt must contain {{question}}, got {prompt!r}")
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self._by_image: dict[Any, list[dict]] = {}

    def setup_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> bool:
        require_capability(pl_module, "generate", by="POPEEvaluation")
        path = annotation_file(trainer, stage, self.annotations, "pope")
        if path is None:
            raise UserError(f"POPEEvaluation: no POPE questions for the {stage} split; set the callback's `annotations` "
                            "(the synthetic world writes annotations/pope_{split}.json)")
        try:
            questions = json.loads(open(path, encoding="utf-8").read())["questions"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"POPEEvaluation annotations={path!r}: not a POPE questions file ({exc})") from exc
        self._by_image = {}
        for q in questions:
            self._by_image.setdefault(q["image_id"], []).append(q)
        self.kinds = sorted({q["category"] for q in questions})
        return True

    def collect(self, trainer, pl_module, batch):
        asked = [(row, q) for row, image_id in enumerate(batch.get("image_id") or []) for q in self._by_image.get(image_id, [])]
        out: dict[str, tuple[str, str, str]] = {}
        for start in range(0, len(asked), self.batch_size):
            chunk = asked[start : start + self.batch_size]
            rows = [row for row, _ in chunk]
            answers = pl_module.generate(batch["image"][rows], [self.prompt.format(question=q["question"]) for _, q in chunk],
                                         max_new_tokens=self.max_new_tokens)
            for (_, q), answer in zip(chunk, answers):
                out[str(q["question_id"])] = (q["category"], q["label"], read_yes_no(answer))
        return out

    def compute(self, records):
        metrics: dict[str, float] = {}
        for kind in [*sorted({r[0] for r in records}), "all"]:
            chosen = [r for r in records if kind in ("all", r[0])]
            for name, value in pope_metrics([r[1] for r in chosen], [r[2] for r in chosen]).items():
                metrics[f"{kind}/{name}"] = value
        return metrics

    def protocol(self):
        return {**super().protocol(), "prompt": self.prompt, "reading": "no if the first sentence says no/not"}


__all__ = ["POPEEvaluation", "pope_metrics", "read_yes_no"]
