"""VQA accuracy, computed exactly as the official VQAv2 evaluator computes it.

The reference is the evaluator of the VQA challenge (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, current revision; the authors confirm the
"no normalisation when the annotators agree" rule in that repository's issue #14). An older
revision, still found in some copies, normalised the prediction always and the answers for
punctuation only; LAVIS, BLIP and OpenFlamingo ship the current one. For every annotated
question, with its ``n`` (= 10 in VQAv2) annotator answers:

1. The prediction and every answer are *cleaned*: ``"\\n"`` and ``"\\t"`` become spaces, then
   surrounding whitespace is stripped (:func:`clean_answer`).
2. Only if the cleaned answers are **not all identical**, the answers and the prediction are
   *normalised* (:func:`process_punctuation`, then :func:`process_digit_article`). When the
   annotators agree unanimously, the comparison is made on the cleaned strings only, so a
   prediction ``"Yes"`` scores 0 against ten ``"yes"``. ``always_normalize=True`` normalises in
   every case instead, the variant several other toolkits use (off by default).
3. ``accuracy = mean over the n leave-one-out subsets of min(1, matches / 3)``, where ``matches``
   counts the answers of the subset (the other ``n - 1`` annotators) equal to the prediction.
   With ``k`` of the 10 answers equal to the prediction this is ``0, 0.3, 0.6, 0.9, 1, ...`` for
   ``k = 0, 1, 2, 3, >= 4``.
4. Overall, per-answer-type and per-question-type accuracies are plain means over questions.

The official tool prints ``round(100 * accuracy, 2)``; the functions here return unrounded
fractions in ``[0, 1]`` (the CLI prints percentages with two decimals).

Pure Python: no torch, no Lightning. ``main`` is the ``lit-vlm eval vqa`` command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lit_vlm.errors import UserError

__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "PUNCTUATION",
    "aggregate_accuracy",
    "build_parser",
    "check_questions",
    "clean_answer",
    "format_table",
    "load_annotations",
    "load_predictions",
    "load_questions",
    "main",
    "normalize_answer",
    "per_question_accuracy",
    "process_digit_article",
    "process_punctuation",
    "question_accuracy",
    "validate_annotations",
    "validate_predictions",
    "validate_questions",
    "vqa_accuracy",
]

log = logging.getLogger("lit_vlm.eval")

# --------------------------------------------------------------------------------------------
# The official tables
# --------------------------------------------------------------------------------------------

#: The 21 characters the evaluator treats as punctuation, in the order it processes them. The
#: apostrophe, colon, period (handled separately), ``* # $ % & ^ ~ |`` are *not* among them.
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)

#: A comma between two digits ("1,000"). Never used to substitute: its only role is that a text
#: containing it has *all* its punctuation characters deleted instead of replaced by spaces.
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")

#: A period not followed by a digit. The leading ``(?!<=\d)`` is a mistyped look-behind: it is a
#: look-ahead for the literal "<=" plus a digit and so never rejects anything, which is why the
#: period of "5.x" is removed while the one of "2.5" and ".5" is kept.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")

#: The evaluator calls ``periodStrip.sub("", text, re.UNICODE)``: the third positional argument
#: of ``Pattern.sub`` is ``count``, and ``re.UNICODE == 32``, so at most 32 periods are removed.
PERIOD_STRIP_MAX = 32

#: Number words mapped to digits, word by word, after lower-casing ("none" counts as "0"; there
#: is no entry past "ten").
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

#: Words dropped after the number mapping.
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

#: Whole-word contraction repairs, applied after lower-casing and article removal. Reproduced
#: with the evaluator's oddities: the keys "Im", "Ive", "Id've" and "I'dve" contain capitals and so
#: can never match a lower-cased word; "somebody'd" maps to "somebodyd" (the reverse direction);
#: "let's" and "she's" map to themselves.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldn'tve": "couldn't've",
    "couldnt": "couldn't", "couldnt've": "couldn't've", "couldve": "could've", "didnt": "didn't",
    "doesnt": "doesn't", "dont": "don't", "hadn'tve": "hadn't've", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hasnt": "hasn't", "havent": "haven't", "he'dve": "he'd've", "hed": "he'd",
    "hed've": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "I'dve": "I'd've", "Id've": "I'd've", "Im": "I'm", "isnt": "isn't", "it'dve": "it'd've", "itd": "it'd",
    "itd've": "it'd've", "itll": "it'll", "Ive": "I've", "let's": "let's", "maam": "ma'am",
    "mightn'tve": "mightn't've", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ow'sat": "'ow's'at", "'ows'at": "'ow's'at",
    "shant": "shan't", "she'dve": "she'd've", "she's": "she's", "shed've": "she'd've",
    "shouldn'tve": "shouldn't've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldve": "should've", "somebody'd": "somebodyd", "somebody'dve": "somebody'd've",
    "somebodyd've": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someone'dve": "someone'd've", "someoned": "someone'd", "someoned've": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "something'dve": "something'd've",
    "somethingd": "something'd", "somethingd've": "something'd've", "somethingll": "something'll",
    "thats": "that's", "there'dve": "there'd've", "thered": "there'd", "thered've": "there'd've",
    "therere": "there're", "theres": "there's", "they'dve": "they'd've", "theyd": "they'd",
    "theyd've": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "we'dve": "we'd've", "wed've": "we'd've", "werent": "weren't",
    "weve": "we've", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "who'dve": "who'd've", "whod": "who'd", "whod've": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldn'tve": "wouldn't've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldve": "would've",
    "y'all'dve": "y'all'd've", "y'alld've": "y'all'd've", "y'allll": "y'all'll", "yall": "y'all",
    "yall'd've": "y'all'd've", "yall'll": "y'all'll", "you'dve": "you'd've", "youd": "you'd",
    "youd've": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}

#: The VQAv2 answer types, in the order reports list them.
ANSWER_TYPES: tuple[str, ...] = ("yes/no", "number", "other")

# --------------------------------------------------------------------------------------------
# Answer processing
# --------------------------------------------------------------------------------------------


def clean_answer(text: str) -> str:
    """Replace newlines and tabs by spaces, then strip surrounding whitespace.

    Applied to the prediction and to every answer in all cases. Other whitespace inside the
    text (e.g. ``"\\r"``, repeated spaces) is kept here; it only disappears when the text is
    normalised (:func:`process_digit_article` splits on any whitespace).

    Args:
        text: A prediction or an annotator answer.
    """
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The evaluator's punctuation step (``processPunctuation``).

    For each of the 21 :data:`PUNCTUATION` characters ``p`` in turn, every occurrence of ``p`` is
    deleted if the *input* text (not the text as already processed for earlier characters)
    contains ``p`` followed by a space or preceded by a space, or contains a digit-comma-digit
    (:data:`COMMA_STRIP`) anywhere; otherwise every occurrence is replaced by a space. So
    ``"x-y"`` becomes ``"x y"``, ``"x-y -z"`` becomes ``"xy z"`` and, because of the comma rule,
    ``"1,000 x-y"`` becomes ``"1000 xy"``. Finally up to 32 (:data:`PERIOD_STRIP_MAX`) periods not
    followed by a digit are deleted (:data:`PERIOD_STRIP`): ``"end."`` -> ``"end"``,
    ``"2.5"`` kept, ``"5.x"`` -> ``"5x"``.

    Args:
        text: A cleaned answer (see :func:`clean_answer`).
    """
    delete_all = COMMA_STRIP.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=PERIOD_STRIP_MAX)


def process_digit_article(text: str) -> str:
    """The evaluator's word step (``processDigitArticle``).

    Lower-cases, splits on whitespace, maps number words to digits (:data:`NUMBER_WORDS`), drops
    the articles "a", "an", "the" (:data:`ARTICLES`), repairs contractions word by word
    (:data:`CONTRACTIONS`) and joins the words with single spaces.

    Args:
        text: The output of :func:`process_punctuation`.
    """
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """Full normalisation: :func:`clean_answer`, :func:`process_punctuation`, then
    :func:`process_digit_article` (the order the evaluator uses).

    ``normalize_answer("The Two dogs.") == "2 dogs"``. Note that the evaluator only normalises
    when the annotators disagree; see :func:`question_accuracy`.

    Args:
        text: A prediction or an annotator answer.
    """
    return process_digit_article(process_punctuation(clean_answer(text)))


def _answer_text(answer: Any) -> str:
    return answer["answer"] if isinstance(answer, Mapping) else answer


def question_accuracy(
    prediction: str, answers: Sequence[str | Mapping[str, Any]], always_normalize: bool = False
) -> float:
    """Accuracy of one prediction against its annotator answers, in ``[0, 1]``.

    The answers and the prediction are cleaned; if the cleaned answers are not all identical (or
    ``always_normalize``), all of them are normalised. Then for each annotator ``j`` the other
    answers equal to the prediction are counted, ``min(1, count / 3)`` is taken, and the mean
    over ``j`` is returned.

    Leave-one-out detail: the evaluator forms "the other answers" as every answer *record* (the
    official ``{"answer", "answer_confidence", "answer_id"}`` dict, with its answer processed)
    that differs from record ``j``. With VQAv2's distinct ``answer_id``s that is exactly the other
    ``n - 1``; two identical records would leave each other out as well, and that is reproduced
    here. Plain string answers count as distinct records.

    Args:
        prediction: The model's answer.
        answers: The annotator answers: strings or official answer dicts (key ``"answer"``).
        always_normalize: Normalise even when the annotators agree (not the official protocol).
    """
    if len(answers) == 0:
        raise UserError("question_accuracy needs at least one annotator answer")
    texts = [clean_answer(_answer_text(a)) for a in answers]  # n cleaned answers
    pred = clean_answer(prediction)
    if always_normalize or len(set(texts)) > 1:
        texts = [process_digit_article(process_punctuation(t)) for t in texts]
        pred = process_digit_article(process_punctuation(pred))
    hits = [t == pred for t in texts]  # n booleans
    n = len(texts)
    if _records_distinct(answers):
        m = sum(hits)
        accs = [min(1, (m - hit) / 3) for hit in hits]
    else:
        records = [
            {**a, "answer": t} if isinstance(a, Mapping) else (i, t) for i, (a, t) in enumerate(zip(answers, texts))
        ]
        accs = [
            min(1, sum(hits[i] for i in range(n) if records[i] != records[j]) / 3) for j in range(n)
        ]
    return float(sum(accs)) / n


def _records_distinct(answers: Sequence[Any]) -> bool:
    """True when no two answer records can be equal (the common, fast case)."""
    dicts = [a for a in answers if isinstance(a, Mapping)]
    if not dicts:
        return True
    try:
        ids = [a["answer_id"] for a in dicts]
        return len(set(ids)) == len(ids)
    except (KeyError, TypeError):  # no answer_id, or an unhashable one: compare records
        return False


# --------------------------------------------------------------------------------------------
# Validation of the official file formats
# --------------------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _few(ids: Sequence[Any], k: int = 5) -> str:
    shown = ", ".join(repr(i) for i in list(ids)[:k])
    return shown + (f", ... ({len(ids) - k} more)" if len(ids) > k else "")


def _entries(data: Any, key: str, source: str) -> list:
    if isinstance(data, Mapping):
        if key not in data:
            raise UserError(
                f"{source}: expected the official VQA JSON, an object with a list under {key!r}; "
                f"found keys {_few(sorted(map(str, data)), 8)}"
            )
        data = data[key]
    if not isinstance(data, list):
        raise UserError(f"{source}: {key!r} must be a list of objects, got {type(data).__name__}")
    return data


def validate_annotations(data: Any, source: str = "annotations") -> list[dict[str, Any]]:
    """Check official VQAv2 annotations and return their list of entries (not copied).

    Accepts the annotation JSON (``{"annotations": [...]}``) or the list itself. Each entry
    needs ``question_id`` (int), ``question_type`` (str), ``answer_type`` (str) and ``answers``
    (a non-empty list of ``{"answer": str, ...}`` dicts or of strings); ``image_id``, when
    present, must be an int or a str. Question ids must be unique.

    Args:
        data: The parsed annotation JSON or its ``annotations`` list.
        source: How errors name the data (e.g. the file path).
    """
    entries = _entries(data, "annotations", source)
    first_index: dict[int, int] = {}
    for i, ann in enumerate(entries):
        where = f"{source}: annotation #{i}"
        if not isinstance(ann, Mapping):
            raise UserError(f"{where} must be an object, got {type(ann).__name__}: {ann!r:.80}")
        missing = [k for k in ("question_id", "question_type", "answer_type", "answers") if k not in ann]
        if "question_id" in ann:
            where += f" (question_id {ann['question_id']!r})"
        if missing:
            raise UserError(f"{where} lacks key(s) {', '.join(missing)}")
        qid = ann["question_id"]
        if not _is_int(qid):
            raise UserError(f"{where}: question_id must be an integer, got {type(qid).__name__}")
        if qid in first_index:
            raise UserError(f"{where}: duplicate question_id {qid} (first at annotation #{first_index[qid]})")
        first_index[qid] = i
        for key in ("question_type", "answer_type"):
            if not isinstance(ann[key], str):
                raise UserError(f"{where}: {key} must be a string, got {type(ann[key]).__name__}")
        if "image_id" in ann and not (_is_int(ann["image_id"]) or isinstance(ann["image_id"], str)):
            raise UserError(f"{where}: image_id must be an integer or a string, got {type(ann['image_id']).__name__}")
        answers = ann["answers"]
        if not isinstance(answers, list) or not answers:
            raise UserError(f"{where}: answers must be a non-empty list, got {answers!r:.80}")
        for j, a in enumerate(answers):
            text = a.get("answer") if isinstance(a, Mapping) else a
            if not isinstance(text, str):
                raise UserError(
                    f"{where}: answer #{j} must be an object with a string 'answer' (or a string), got {a!r:.80}"
                )
    return entries


def validate_questions(data: Any, source: str = "questions") -> list[dict[str, Any]]:
    """Check official VQAv2 questions (``{"questions": [{"question_id", "image_id", "question"}]}``
    or the list itself) and return the list: integer, unique ``question_id``; ``image_id`` an int
    or a str; ``question`` a str.

    Args:
        data: The parsed questions JSON or its ``questions`` list.
        source: How errors name the data (e.g. the file path).
    """
    entries = _entries(data, "questions", source)
    first_index: dict[int, int] = {}
    for i, q in enumerate(entries):
        where = f"{source}: question #{i}"
        if not isinstance(q, Mapping):
            raise UserError(f"{where} must be an object, got {type(q).__name__}: {q!r:.80}")
        missing = [k for k in ("question_id", "image_id", "question") if k not in q]
        if "question_id" in q:
            where += f" (question_id {q['question_id']!r})"
        if missing:
            raise UserError(f"{where} lacks key(s) {', '.join(missing)}")
        qid = q["question_id"]
        if not _is_int(qid):
            raise UserError(f"{where}: question_id must be an integer, got {type(qid).__name__}")
        if qid in first_index:
            raise UserError(f"{where}: duplicate question_id {qid} (first at question #{first_index[qid]})")
        first_index[qid] = i
        if not (_is_int(q["image_id"]) or isinstance(q["image_id"], str)):
            raise UserError(f"{where}: image_id must be an integer or a string, got {type(q['image_id']).__name__}")
        if not isinstance(q["question"], str):
            raise UserError(f"{where}: question must be a string, got {type(q['question']).__name__}")
    return entries


def check_questions(
    questions: list[Mapping[str, Any]], annotations: list[Mapping[str, Any]], source: str = "questions"
) -> None:
    """Check that every annotated question is in the questions, on the same image (extra
    questions without annotations are allowed: they cannot be scored and are ignored).

    Args:
        questions: Validated questions (:func:`validate_questions`).
        annotations: Validated annotations (:func:`validate_annotations`).
        source: How errors name the questions (e.g. the file path).
    """
    by_id = {q["question_id"]: q for q in questions}
    missing = [a["question_id"] for a in annotations if a["question_id"] not in by_id]
    if missing:
        raise UserError(
            f"{source}: {len(missing)} annotated question id(s) are not in the questions file: {_few(missing)} "
            "(annotations and questions of different splits?)"
        )
    for a in annotations:
        q = by_id[a["question_id"]]
        if "image_id" in a and a["image_id"] != q["image_id"]:
            raise UserError(
                f"{source}: question_id {a['question_id']} is on image_id {q['image_id']!r} in the questions "
                f"but on image_id {a['image_id']!r} in the annotations"
            )


def validate_predictions(data: Any, source: str = "predictions") -> dict[int, str]:
    """Check predictions in the official results format, ``[{"question_id": int, "answer": str}, ...]``
    (other keys are ignored), and return ``{question_id: answer}``. Duplicate question ids are an
    error naming both entries.

    Args:
        data: The parsed results JSON.
        source: How errors name the data (e.g. the file path).
    """
    if not isinstance(data, list):
        raise UserError(
            f"{source}: expected the official VQA results format, a list of "
            f'{{"question_id": int, "answer": str}} objects; got {type(data).__name__}'
        )
    out: dict[int, str] = {}
    first_index: dict[int, int] = {}
    for i, entry in enumerate(data):
        where = f"{source}: entry #{i}"
        if not isinstance(entry, Mapping):
            raise UserError(f"{where} must be an object, got {type(entry).__name__}: {entry!r:.80}")
        missing = [k for k in ("question_id", "answer") if k not in entry]
        if missing:
            raise UserError(f"{where} lacks key(s) {', '.join(missing)}: {dict(entry)!r:.120}")
        qid, answer = entry["question_id"], entry["answer"]
        if not _is_int(qid):
            raise UserError(f"{where}: question_id must be an integer, got {type(qid).__name__} {qid!r:.40}")
        if not isinstance(answer, str):
            raise UserError(
                f"{where} (question_id {qid}): answer must be a string, got {type(answer).__name__} {answer!r:.40}"
            )
        if qid in first_index:
            raise UserError(f"{where}: duplicate question_id {qid} (first at entry #{first_index[qid]})")
        first_index[qid] = i
        out[qid] = answer
    return out


def _scored_ids(
    predictions: Mapping[int, str], annotations: list[Mapping[str, Any]], source: str, allow_missing: bool
) -> list[int]:
    """Question ids to score (annotation order); errors for unknown or (unless allowed) missing ids."""
    if not isinstance(predictions, Mapping):
        raise UserError(
            f"{source}: predictions must be a mapping {{question_id: answer}}, got {type(predictions).__name__} "
            "(load a results file with load_predictions)"
        )
    for qid, answer in predictions.items():
        if not _is_int(qid):
            raise UserError(f"{source}: question ids must be integers, got {type(qid).__name__} {qid!r:.40}")
        if not isinstance(answer, str):
            raise UserError(
                f"{source}: the answer for question_id {qid} must be a string, got {type(answer).__name__}"
            )
    annotated = [a["question_id"] for a in annotations]
    known = set(annotated)
    unknown = [q for q in predictions if q not in known]
    if unknown:
        raise UserError(
            f"{source}: {len(unknown)} prediction(s) for question ids not in the annotations: {_few(unknown)} "
            "(predictions and annotations of different splits?)"
        )
    missing = [q for q in annotated if q not in predictions]
    if missing and not allow_missing:
        raise UserError(
            f"{source}: no prediction for {len(missing)} of {len(annotated)} annotated questions, e.g. {_few(missing)} "
            "(the official evaluator requires all of them; allow_missing / --allow-missing scores only "
            "the answered ones)"
        )
    if missing:
        log.warning("VQA: %d of %d annotated questions have no prediction; scoring the other %d only",
                    len(missing), len(annotated), len(annotated) - len(missing))
    scored = [q for q in annotated if q in predictions]
    if not scored:
        raise UserError(f"{source}: no prediction for any annotated question")
    return scored


# --------------------------------------------------------------------------------------------
# Loading files
# --------------------------------------------------------------------------------------------


def _read_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None


def load_annotations(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read and check an official VQAv2 annotation file (see :func:`validate_annotations`).

    Args:
        path: The annotation JSON, e.g. ``v2_mscoco_val2014_annotations.json``.
    """
    return validate_annotations(_read_json(path, "annotations"), str(path))


def load_questions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read and check an official VQAv2 questions file (see :func:`validate_questions`).

    Args:
        path: The questions JSON, e.g. ``v2_OpenEnded_mscoco_val2014_questions.json``.
    """
    return validate_questions(_read_json(path, "questions"), str(path))


def load_predictions(
    path: str | os.PathLike,
    annotations: Any = None,
    allow_missing: bool = False,
) -> dict[int, str]:
    """Read predictions in the official results format (see :func:`validate_predictions`).

    With ``annotations``, also checks that every prediction is for an annotated question and
    that every annotated question has one (unless ``allow_missing``); errors give counts and a
    few ids.

    Args:
        path: The results JSON, ``[{"question_id": int, "answer": str}, ...]``.
        annotations: Official annotations (JSON dict or list) to check the question ids against.
        allow_missing: Accept predictions for only part of the annotated questions.
    """
    predictions = validate_predictions(_read_json(path, "predictions"), str(path))
    if annotations is not None:
        _scored_ids(predictions, validate_annotations(annotations), str(path), allow_missing)
    return predictions


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------


def per_question_accuracy(
    predictions: Mapping[int, str],
    annotations: Any,
    always_normalize: bool = False,
    allow_missing: bool = False,
    source: str = "predictions",
) -> dict[int, float]:
    """``{question_id: accuracy in [0, 1]}`` for every scored question, in annotation order.

    Args:
        predictions: ``{question_id: answer}``.
        annotations: Official annotations: the JSON dict (``{"annotations": [...]}``) or the list.
        always_normalize: Normalise even when the annotators agree (not the official protocol).
        allow_missing: Score only the answered questions instead of raising when some lack a
            prediction (the official evaluator requires all of them).
        source: How errors name the predictions (e.g. the file path).
    """
    return _per_question(predictions, validate_annotations(annotations), always_normalize, allow_missing, source)


def _per_question(
    predictions: Mapping[int, str],
    anns: list[Mapping[str, Any]],
    always_normalize: bool,
    allow_missing: bool,
    source: str,
) -> dict[int, float]:
    by_id = {a["question_id"]: a for a in anns}
    return {
        qid: question_accuracy(predictions[qid], by_id[qid]["answers"], always_normalize)
        for qid in _scored_ids(predictions, anns, source, allow_missing)
    }


def _aggregate(
    per_question: Mapping[int, float], annotations: list[Mapping[str, Any]]
) -> tuple[dict[str, float], dict[str, int]]:
    by_id = {a["question_id"]: a for a in annotations}
    groups: dict[str, list[float]] = {"overall": []}
    for qid, acc in per_question.items():
        ann = by_id[qid]
        for name in ("overall", f"answer_type/{ann['answer_type']}", f"question_type/{ann['question_type']}"):
            groups.setdefault(name, []).append(acc)
    if not groups["overall"]:
        raise UserError("no questions to aggregate")

    def order(name: str) -> tuple:
        kind, _, value = name.partition("/")
        rank = {"overall": 0, "answer_type": 1, "question_type": 2}[kind]
        type_rank = ANSWER_TYPES.index(value) if kind == "answer_type" and value in ANSWER_TYPES else len(ANSWER_TYPES)
        return (rank, type_rank, value)

    names = sorted(groups, key=order)
    metrics = {name: float(sum(groups[name])) / len(groups[name]) for name in names}
    metrics["num_questions"] = float(len(groups["overall"]))
    return metrics, {name: len(groups[name]) for name in names}


def aggregate_accuracy(per_question: Mapping[int, float], annotations: Any) -> dict[str, float]:
    """Means of per-question accuracies: ``overall``, ``answer_type/<type>``,
    ``question_type/<type>`` (fractions in ``[0, 1]``) and ``num_questions``.

    Args:
        per_question: ``{question_id: accuracy}``, e.g. from :func:`per_question_accuracy`.
        annotations: The official annotations giving each question's types.
    """
    return _aggregate(per_question, validate_annotations(annotations))[0]


def vqa_accuracy(
    predictions: Mapping[int, str],
    annotations: Any,
    questions: Any = None,
    always_normalize: bool = False,
    allow_missing: bool = False,
) -> dict[str, float]:
    """VQA accuracy of ``predictions`` under the official VQAv2 protocol (see the module docstring).

    Returns fractions in ``[0, 1]`` (the official tool prints ``round(100 * x, 2)``):
    ``overall``, ``answer_type/<type>`` (VQAv2: ``yes/no``, ``number``, ``other``),
    ``question_type/<type>`` (e.g. ``question_type/how many``) and ``num_questions``.

    Args:
        predictions: ``{question_id: answer}`` (see :func:`load_predictions` for the results file).
        annotations: Official annotations: the JSON dict (``{"annotations": [...]}``) or the list.
        questions: Official questions (JSON dict or list); when given, every annotated question
            must appear in it with the same ``image_id``.
        always_normalize: Normalise answers and prediction even when all annotators agree, as
            several other toolkits do; off by default (the official evaluator compares the
            merely stripped strings then).
        allow_missing: Score only the answered questions instead of raising when some annotated
            questions have no prediction.
    """
    anns = validate_annotations(annotations)
    if questions is not None:
        check_questions(validate_questions(questions), anns, "questions")
    per_question = _per_question(predictions, anns, always_normalize, allow_missing, "predictions")
    return _aggregate(per_question, anns)[0]


# --------------------------------------------------------------------------------------------
# Command line: lit-vlm eval vqa
# --------------------------------------------------------------------------------------------


def build_parser(prog: str = "lit-vlm eval vqa") -> argparse.ArgumentParser:
    """The argument parser of ``lit-vlm eval vqa``.

    Args:
        prog: Program name shown in usage and errors.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Score VQA predictions with the official VQAv2 accuracy: answers normalised (punctuation, "
            "number words, articles, contractions) only when the annotators disagree, accuracy = mean "
            "over the 10 leave-one-out annotator subsets of min(1, matches/3)."
        ),
    )
    parser.add_argument("--annotations", required=True, help="official VQAv2 annotation JSON ({'annotations': [...]})")
    parser.add_argument("--questions", required=True, help="official VQAv2 questions JSON ({'questions': [...]})")
    parser.add_argument(
        "--predictions", required=True, help='results JSON: [{"question_id": int, "answer": str}, ...]'
    )
    parser.add_argument(
        "--always-normalize",
        action="store_true",
        help="normalise even when all annotators agree (the variant of some toolkits, not the official protocol)",
    )
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="score only the answered questions instead of failing when some annotated questions lack a prediction",
    )
    parser.add_argument("--output", default=None, help="also write the metrics (fractions in [0, 1]) to this JSON file")
    return parser


def format_table(metrics: Mapping[str, float], counts: Mapping[str, int]) -> str:
    """A readable table: overall, then per answer type, then per question type (percent, 2 decimals).

    Args:
        metrics: Output of :func:`vqa_accuracy`.
        counts: Number of questions behind each metric.
    """
    rows = [name for name in metrics if name != "num_questions"]
    width = max(len("metric"), *(len(r) for r in rows)) + 2
    lines = [f"{'metric':<{width}}{'accuracy (%)':>14}{'questions':>12}", "-" * (width + 26)]
    section = None
    for name in rows:
        kind = name.partition("/")[0]
        if section is not None and kind != section:
            lines.append("")
        section = kind
        lines.append(f"{name:<{width}}{100 * metrics[name]:>14.2f}{counts.get(name, 0):>12d}")
    return "\n".join(lines)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """``lit-vlm eval vqa``: score a predictions file, print the table, optionally save JSON.

    Returns 0 on success and 2 (with a one-line error on stderr) when a file is missing or
    malformed.

    Args:
        argv: Arguments after ``lit-vlm eval vqa`` (default: ``sys.argv[1:]``).
    """
    args = build_parser().parse_args(argv)
    try:
        annotations = load_annotations(args.annotations)
        questions = load_questions(args.questions)
        check_questions(questions, annotations, args.questions)
        predictions = load_predictions(args.predictions)
        per_question = _per_question(
            predictions, annotations, args.always_normalize, args.allow_missing, args.predictions
        )
        metrics, counts = _aggregate(per_question, annotations)
    except ValueError as exc:
        print(f"lit-vlm eval vqa: error: {exc}", file=sys.stderr)
        return 2
    protocol = "always normalised (--always-normalize)" if args.always_normalize else "official VQAv2"
    print(f"VQA accuracy, {protocol} protocol: {len(per_question)} of {len(annotations)} annotated questions scored")
    print(f"predictions: {args.predictions}\nannotations: {args.annotations}\n")
    print(format_table(metrics, counts))
    if args.output:
        try:
            _write_json(Path(args.output), metrics)
        except OSError as exc:
            print(f"lit-vlm eval vqa: error: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"\nmetrics written to {args.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
