"""Open-ended VQA accuracy (official VQAv2 protocol) of any family with the ``generate`` capability."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lit_vlm.callbacks.base import EvalCallback, md_escape, require_capability
from lit_vlm.callbacks.results import write_json_atomic
from lit_vlm.datamodules.instructions import MULTIPLE_CHOICE, SHORT_ANSWER
from lit_vlm.errors import UserError
from lit_vlm.vqa import check_questions, load_annotations, load_questions, question_accuracy, vqa_accuracy

log = logging.getLogger("lit_vlm.eval")

_UNSAFE = re.compile(r"[^0-9A-Za-z_.\-]+")


def metric_name(name: str) -> str:
    """A TensorBoard-safe metric name: the type after ``answer_type/`` or ``question_type/`` has every
    run of characters other than letters, digits, ``_ . -`` replaced by ``_`` (``answer_type/yes/no``
    -> ``answer_type/yes_no``, ``question_type/how many`` -> ``question_type/how_many``).

    Args:
        name: A key of :func:`lit_vlm.vqa.vqa_accuracy`'s result.
    """
    kind, sep, value = name.partition("/")
    if not sep:
        return name
    return f"{kind}/{_UNSAFE.sub('_', value).strip('_') or '_'}"


def majority_answers(annotations: list[dict[str, Any]]) -> dict[str, str]:
    """``{question_type: its most common multiple_choice_answer}`` (ties: the alphabetically first
    answer) over ``annotations``; an entry without ``question_type`` counts under ``""``."""
    counts: dict[str, Counter] = {}
    for a in annotations:
        counts.setdefault(a.get("question_type", ""), Counter())[str(a.get("multiple_choice_answer", ""))] += 1
    return {qt: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for qt, c in counts.items()}


#: Named prompts (``prompt: short_answer``): LLaVA-1.5's short-answer and multiple-choice suffixes,
#: BLIP-2's format. ``{choices}`` is filled with the lettered options (``choices: N``).
PROMPTS = {
    "short_answer": "{question}\n" + SHORT_ANSWER,
    "multiple_choice": "{question}\n{choices}\n" + MULTIPLE_CHOICE,
    "blip2": "Question: {question} Short answer:",
}
_LETTER = re.compile(r"^\s*\(?([A-Za-z])\s*(?:[).:]|$|\s)")


def choice_options(annotation: dict[str, Any], pool: list[str], k: int) -> list[str]:
    """The ``k`` options of a multiple-choice question: its ``multiple_choice_answer`` and ``k - 1``
    other answers of ``pool`` (the answers of its answer type), drawn and shuffled with the question
    id as seed, so every run and rank asks the same options."""
    rng = random.Random(int(annotation["question_id"]))
    correct = str(annotation.get("multiple_choice_answer", "")).strip()
    others = [a for a in pool if a != correct]
    options = [correct, *rng.sample(others, min(k - 1, len(others)))]
    rng.shuffle(options)
    return options


def read_choice(answer: str, options: list[str]) -> str:
    """The option a multiple-choice answer names: its letter (``B``, ``(B)``, ``B.``, ``B) blue``),
    else the answer unchanged (scored as an open answer)."""
    match = _LETTER.match(answer)
    if match:
        index = string.ascii_uppercase.index(match.group(1).upper())
        if index < len(options):
            return options[index]
    return answer


class VQAEvaluation(EvalCallback):
    """VQA accuracy exactly as the official VQAv2 evaluator computes it (:mod:`lit_vlm.vqa`).

    For every question of the evaluated images, the family answers with
    ``pl_module.generate(images, prompts, max_new_tokens)``, one prompt per question built from
    ``prompt``. Predictions are gathered by question id across ranks and scored once against the
    official annotations **restricted to the questions that were asked**, i.e. those of the images
    this evaluation saw (a ``limit_test_batches`` run scores the questions of its images only; the
    logged ``num_questions`` tells how many). Logged as ``{stage}/{prefix}/overall``,
    ``.../answer_type/yes_no``, ``.../answer_type/number``, ``.../answer_type/other``,
    ``.../question_type/<type with spaces as _>`` and ``.../num_questions`` (fractions in [0, 1]).

    Reads the batch keys ``image [B, 3, H, W]``, ``question`` (list of Q strings), ``question_id``
    (Q ints) and ``question_owner`` (LongTensor [Q], each question's image row); a batch without
    questions contributes nothing. The last predictions are kept in ``predictions[stage]`` in the
    official results format and, when the trainer has a logger, written on rank 0 to
    ``{log_dir}/{prefix}_predictions_{stage}.json`` (score it again offline with
    ``lit-vlm eval vqa``). A few questions with prediction, accuracy and the annotators' answers are
    logged to TensorBoard as a markdown table.

    Args:
        splits: Stages to evaluate on, among "val" and "test".
        prompt: Format string with one ``{question}`` field turned into each question's prompt, or
            the name of one of :data:`PROMPTS`: ``short_answer`` (LLaVA-1.5's ``"{question}\\nAnswer
            the question using a single word or phrase."``, what the synthetic world's instruction
            data trains), ``multiple_choice`` (the question, its lettered options, then LLaVA-1.5's
            ``"Answer with the option's letter from the given choices directly."``; needs
            ``choices``) or ``blip2`` (``"Question: {question} Short answer:"``). The default passes
            the question unchanged.
        choices: Multiple choice with this many options per question (0: open-ended): the
            question's ``multiple_choice_answer`` and answers of the same answer type from the
            annotations, drawn with the question id as seed; the prompt's ``{choices}`` field gets
            them as ``A. ...`` lines, the answer's letter is mapped back to its option, and the
            option is scored by the official metric against the annotators' answers.
        max_new_tokens: Generation budget per answer (VQAv2 answers are one to three words).
        annotations: Official VQAv2 annotation JSON; default: the DataModule's
            ``eval_annotations(stage)["vqa_annotations"]``.
        questions: Official VQAv2 questions JSON, used to check the annotations (every annotated
            question present, same image); default: ``eval_annotations(stage)["vqa_questions"]``
            when the annotations also come from the DataModule, else none.
        always_normalize: Normalise answers even when all annotators agree, as some toolkits do
            (not the official protocol, which compares the merely stripped strings then).
        batch_size: Questions per ``generate`` call (bounds memory; a batch's questions are
            answered in chunks of this size).
        num_examples: Questions shown in the TensorBoard examples table (0: none).
        save_predictions: Write the predictions JSON into the run's log directory.
        prefix: Metric namespace (also the predictions file's name prefix).
        mode: ``"generate"`` (answer with ``generate``, open-ended) or ``"rank"`` (pick the most
            likely answer of a candidate list with the family's ``score_answers``, as BLIP's
            ``rank`` inference does; for families that score text).
        answer_list: ``mode="rank"``: JSON file holding the list of candidate answers (e.g. the
            VQAv2 answer vocabulary). Default: every distinct ``multiple_choice_answer`` of the
            evaluated annotations (what the synthetic world's answer space is; on VQAv2 pass the
            training answer list, as LAVIS does).
        baseline: Also score the per-question-type prior (Antol et al., 2015): every question
            answered with the most common ``multiple_choice_answer`` of its question type, logged
            as ``{stage}/vqa/baseline/overall`` and ``.../baseline/answer_type/<type>``. The prior
            is counted on the evaluated questions themselves, so it knows the evaluated answer
            distribution: an optimistic baseline (the paper fits it on the training answers).
        modality: The batch key the family is asked about (``video``: video QA, the family's
            ``generate`` then receives the clips ``[B, C, T, 3, H, W]``).
    """

    def __init__(
        self,
        splits: tuple[str, ...] | list[str] = ("val", "test"),
        prompt: str = "{question}",
        max_new_tokens: int = 10,
        annotations: str | None = None,
        questions: str | None = None,
        always_normalize: bool = False,
        batch_size: int = 64,
        num_examples: int = 8,
        save_predictions: bool = True,
        prefix: str = "vqa",
        mode: str = "generate",
        answer_list: str | None = None,
        baseline: bool = False,
        choices: int = 0,
        modality: str = "image",
    ) -> None:
        super().__init__(splits, prefix)
        if not isinstance(modality, str) or not modality.isidentifier():
            raise UserError(f"VQAEvaluation modality must be a batch key such as image or video, got {modality!r}")
        self.modality = modality
        if mode not in ("generate", "rank"):
            raise UserError(f"VQAEvaluation mode must be 'generate' or 'rank', got {mode!r}")
        if answer_list is not None and mode != "rank":
            raise UserError("VQAEvaluation answer_list is only used with mode='rank'")
        self.mode = mode
        self.answer_list = answer_list
        self.baseline = baseline
        self._candidates: list[str] = []
        if choices < 0 or choices == 1 or choices > 26:
            raise UserError(f"VQAEvaluation choices must be 0 (open-ended) or 2 to 26 options, got {choices}")
        if choices and mode != "generate":
            raise UserError("VQAEvaluation choices (multiple choice) answers with generate: set mode: generate")
        self.choices = int(choices)
        prompt = PROMPTS.get(prompt, prompt)
        sentinel = "\x00question\x00"
        fields = "{question} and {choices}" if choices else "{question}"
        try:
            formatted = prompt.format(question=sentinel, **({"choices": "\x00choices\x00"} if choices else {}))
        except (KeyError, IndexError, ValueError) as exc:
            raise UserError(
                f"VQAEvaluation prompt must be a format string whose only fields are {fields}, got {prompt!r} "
                f"({type(exc).__name__}: {exc}); write literal braces as {{{{ and }}}}"
            ) from None
        if sentinel not in formatted or (choices and "\x00choices\x00" not in formatted):
            raise UserError(f"VQAEvaluation prompt must contain the field(s) {fields}, got {prompt!r}")
        if max_new_tokens < 1:
            raise UserError(f"VQAEvaluation max_new_tokens must be >= 1, got {max_new_tokens}")
        if batch_size < 1:
            raise UserError(f"VQAEvaluation batch_size must be >= 1, got {batch_size}")
        if num_examples < 0:
            raise UserError(f"VQAEvaluation num_examples must be >= 0, got {num_examples}")
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.annotations = annotations
        self.questions = questions
        self.always_normalize = always_normalize
        self.batch_size = batch_size
        self.num_examples = num_examples
        self.save_predictions = save_predictions
        #: stage -> the last predictions, official results format ``[{"question_id", "answer"}]``
        self.predictions: dict[str, list[dict[str, Any]]] = {}
        #: stage -> the predictions file written last
        self.prediction_files: dict[str, Path] = {}
        self._annotation_list: list[dict[str, Any]] = []
        self._annotation_by_id: dict[int, dict[str, Any]] = {}
        self._annotation_source = ""
        self._loaded_key: tuple | None = None
        self._last_predictions: list[dict[str, Any]] | None = None
        self._warned_keys = False

    # ---- annotations ---------------------------------------------------------------------------
    def _paths(self, trainer: pl.Trainer, stage: str) -> tuple[str, str | None]:
        if self.annotations:
            return self.annotations, self.questions
        dm = trainer.datamodule
        known: dict[str, Any] = {}
        if dm is not None and callable(getattr(dm, "eval_annotations", None)):
            known = dm.eval_annotations(stage) or {}
        path = known.get("vqa_annotations")
        if not path:
            where = (
                f"{type(dm).__name__}.eval_annotations({stage!r}) has no 'vqa_annotations'"
                if dm is not None and callable(getattr(dm, "eval_annotations", None))
                else "the trainer has no DataModule offering eval_annotations()"
            )
            raise UserError(
                f"VQAEvaluation: no VQA annotations for the {stage} split ({where}); set the callback's "
                "`annotations` (and `questions`) to the official VQAv2 JSON files"
            )
        return str(path), self.questions or (str(known["vqa_questions"]) if known.get("vqa_questions") else None)

    def _load(self, annotations: str, questions: str | None) -> None:
        def stamp(p: str | None) -> Any:
            try:
                return None if p is None else (os.path.abspath(p), os.stat(p).st_mtime_ns)
            except OSError:
                return (p, None)

        key = (stamp(annotations), stamp(questions))
        if key == self._loaded_key:
            return
        anns = load_annotations(annotations)
        if questions is not None:
            check_questions(load_questions(questions), anns, questions)
        self._annotation_list = anns
        self._annotation_by_id = {a["question_id"]: a for a in anns}
        self._annotation_source = annotations
        self._loaded_key = key

    def setup_epoch(self, trainer, pl_module, stage):
        require_capability(pl_module, "score_answers" if self.mode == "rank" else "generate", by="VQAEvaluation")
        self._load(*self._paths(trainer, stage))
        if self.mode == "rank":
            self._candidates = self._answer_candidates()
        if self.choices:
            pools: dict[Any, set[str]] = {}
            for a in self._annotation_list:
                pools.setdefault(a.get("answer_type"), set()).add(str(a.get("multiple_choice_answer", "")).strip())
            self._pools = {kind: sorted(answers - {""}) for kind, answers in pools.items()}
        return True

    def _answer_candidates(self) -> list[str]:
        if self.answer_list is None:
            found = sorted({str(a.get("multiple_choice_answer", "")).strip() for a in self._annotation_list} - {""})
            if not found:
                raise UserError(
                    f"VQAEvaluation mode='rank': {self._annotation_source} has no multiple_choice_answer to rank; "
                    "set answer_list to a JSON list of candidate answers"
                )
            return found
        try:
            with open(self.answer_list, encoding="utf-8") as f:
                listed = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"VQAEvaluation answer_list={self.answer_list!r}: cannot read it ({err})") from err
        if not isinstance(listed, list) or not listed or not all(isinstance(a, str) and a.strip() for a in listed):
            raise UserError(f"VQAEvaluation answer_list={self.answer_list!r} must hold a non-empty JSON list of non-empty strings")
        return list(dict.fromkeys(a.strip() for a in listed))

    # ---- per batch -----------------------------------------------------------------------------
    def collect(self, trainer, pl_module, batch):
        keys = ("question", "question_id", "question_owner")
        if any(k not in batch for k in keys):
            if not self._warned_keys:
                missing = [k for k in keys if k not in batch]
                log.warning("VQAEvaluation: eval batches lack %s; no questions to answer", ", ".join(missing))
                self._warned_keys = True
            return {}
        owner = batch["question_owner"]  # [Q]
        if owner.numel() == 0:
            return {}
        questions = list(batch["question"])
        ids = batch["question_id"]
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        if not len(questions) == len(ids) == owner.shape[0]:
            raise UserError(
                f"VQAEvaluation: batch has {len(questions)} questions, {len(ids)} question ids and "
                f"{owner.shape[0]} question_owner rows; they must agree"
            )
        if self.modality not in batch:
            raise UserError(f"VQAEvaluation needs batch key {self.modality!r} (its modality)")
        images = batch[self.modality]  # [B, 3, H, W] (video: [B, C, T, 3, H, W])
        out: dict[str, tuple[int, str, str]] = {}
        for start in range(0, len(ids), self.batch_size):
            stop = start + self.batch_size
            rows = owner[start:stop].to(images.device)  # [q]
            if self.choices:
                options = [self._options(qid) for qid in ids[start:stop]]
                prompts = [self.prompt.format(question=q, choices="\n".join(f"{string.ascii_uppercase[i]}. {o}" for i, o in enumerate(opts)))
                           for q, opts in zip(questions[start:stop], options)]
            else:
                prompts = [self.prompt.format(question=q) for q in questions[start:stop]]
            if self.mode == "rank":
                scores = pl_module.score_answers(images[rows], prompts, self._candidates)  # [q, C]
                answers = [self._candidates[j] for j in scores.argmax(1).tolist()]
            else:
                answers = pl_module.generate(images[rows], prompts, max_new_tokens=self.max_new_tokens)  # q strings
            if len(answers) != len(prompts) or not all(isinstance(a, str) for a in answers):
                raise TypeError(
                    f"{type(pl_module).__name__}.generate must return one string per prompt: "
                    f"got {type(answers).__name__} of length {len(answers)} for {len(prompts)} prompts"
                )
            if self.choices:
                answers = [read_choice(a, opts) for a, opts in zip(answers, options)]
            for qid, question, answer in zip(ids[start:stop], questions[start:stop], answers):
                out[str(int(qid))] = (int(qid), question, answer)
        return out

    def _options(self, qid: Any) -> list[str]:
        annotation = self._annotation_by_id.get(int(qid))
        if annotation is None:
            raise UserError(f"VQAEvaluation choices: question {int(qid)} is not in the annotations {self._annotation_source}")
        return choice_options(annotation, self._pools.get(annotation.get("answer_type"), []), self.choices)

    # ---- once per epoch ------------------------------------------------------------------------
    def compute(self, records):
        predictions = {qid: answer for qid, _, answer in records}
        unknown = sorted(q for q in predictions if q not in self._annotation_by_id)
        if unknown:
            shown = ", ".join(map(str, unknown[:5])) + (f", ... ({len(unknown) - 5} more)" if len(unknown) > 5 else "")
            raise UserError(
                f"VQAEvaluation: {len(unknown)} question id(s) of the evaluated batches are not in the annotations "
                f"{self._annotation_source}: {shown} (annotations of another split?)"
            )
        asked = [a for a in self._annotation_list if a["question_id"] in predictions]  # annotation order
        log.info("VQAEvaluation: scoring %d of the %d annotated questions (those of the evaluated images)",
                 len(asked), len(self._annotation_list))
        metrics = vqa_accuracy(predictions, asked, always_normalize=self.always_normalize)
        self._last_predictions = [{"question_id": qid, "answer": predictions[qid]} for qid in sorted(predictions)]
        out: dict[str, float] = {}
        for name, value in metrics.items():
            safe = metric_name(name)
            base, n = safe, 2
            while safe in out:  # two types that only differ in unsafe characters
                safe, n = f"{base}_{n}", n + 1
            out[safe] = value
        if self.baseline:
            prior = majority_answers(asked)
            guesses = {a["question_id"]: prior[a.get("question_type", "")] for a in asked}
            base = vqa_accuracy(guesses, asked, always_normalize=self.always_normalize)
            for name, value in base.items():
                if name == "overall" or name.startswith("answer_type/"):
                    out[f"baseline/{metric_name(name)}"] = value
        return out

    def sample_scores(self, records):
        """Per question: its VQA accuracy (overall, and within its answer type)."""
        scores = [question_accuracy(answer, self._annotation_by_id[qid]["answers"], self.always_normalize)
                  for qid, _, answer in records]
        out = {"overall": (scores, [1.0] * len(scores))}
        types = [self._annotation_by_id[qid].get("answer_type") for qid, _, _ in records]
        for kind in sorted({t for t in types if isinstance(t, str)}):
            name = metric_name(f"answer_type/{kind}")
            out[name] = ([a if t == kind else 0.0 for a, t in zip(scores, types)], [float(t == kind) for t in types])
        return out

    def protocol(self):
        return {**super().protocol(), "metric": "VQAv2 accuracy (10 leave-one-out annotator subsets)",
                "always_normalize": self.always_normalize, "prompt": self.prompt, "choices": self.choices,
                **({"modality": self.modality} if self.modality != "image" else {})}

    def log_examples(self, writer, stage, step, ids, records):
        if self.num_examples == 0:
            return
        lines = [
            "| question_id | question | prediction | accuracy | annotator answers |",
            "|---|---|---|---|---|",
        ]
        for qid, question, answer in records[: self.num_examples]:
            answers = self._annotation_by_id[qid]["answers"]
            acc = question_accuracy(answer, answers, self.always_normalize)
            texts = [a["answer"] if isinstance(a, dict) else a for a in answers]
            lines.append(
                f"| {qid} | {md_escape(question)} | {md_escape(answer)} | {100 * acc:.1f}% | {md_escape(', '.join(texts))} |"
            )
        writer.add_text(f"{stage}/{self.prefix}/examples", "\n".join(lines), global_step=step)

    def _save(self, trainer: pl.Trainer, stage: str) -> None:
        predictions, self._last_predictions = self._last_predictions, None
        if predictions is None:
            return
        self.predictions[stage] = predictions
        if not self.save_predictions or not trainer.loggers:
            return
        log_dir = trainer.log_dir  # a collective under DDP: read it on every rank
        if trainer.is_global_zero and log_dir:
            path = Path(log_dir) / f"{self.prefix}_predictions_{stage}.json"
            write_json_atomic(path, predictions)
            self.prediction_files[stage] = path
            log.info("VQAEvaluation: %d predictions written to %s", len(predictions), path)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._last_predictions = None
        super().on_validation_epoch_end(trainer, pl_module)
        self._save(trainer, "val")

    def on_test_epoch_end(self, trainer, pl_module):
        self._last_predictions = None
        super().on_test_epoch_end(trainer, pl_module)
        self._save(trainer, "test")
