"""Caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) exactly as the COCO caption evaluator
computes them, the loaders of its file formats, and ``lit-vlm eval caption``.

The numbers come from pycocoevalcap itself, used the way ``pycocoevalcap.eval.COCOEvalCap`` uses
it: predictions and references are lower-cased and tokenised by the Stanford PTB tokenizer (Java),
punctuation tokens are dropped, and every scorer runs once on the whole set:

* ``BLEU_1`` .. ``BLEU_4``: corpus-level BLEU (n-gram counts and lengths summed over all images
  before the ratios are taken; brevity penalty against the closest reference length), not a mean
  of per-image BLEU.
* ``METEOR``: METEOR 1.5 (``-l en -norm``), its Java process fed every image's statistics and
  asked for the aggregate score.
* ``ROUGE_L``: mean over images of the LCS F-measure (beta = 1.2) against the best reference.
* ``CIDEr``: what pycocoevalcap's ``Cider`` computes is **CIDEr-D** (Vedantam et al., 2015): TF-IDF
  n-gram vectors (n = 1..4) with document frequencies counted over the references of *all*
  evaluated images, candidate counts clipped to the reference counts, a Gaussian length penalty
  (sigma = 6), times 10. Because the document frequencies are set-level, the score of a set is
  not the mean of the scores of its parts, and a set of one image always scores 0.

SPICE is left out: it needs Stanford CoreNLP models that pycocoevalcap downloads on first use, and
this suite never downloads at run time.

Java must be on ``PATH`` (the PTB tokenizer and METEOR run on it). No Lightning import here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lit_vlm.errors import MissingFileError, UserError

#: Metric families ``caption_metrics`` can compute, and the keys each one reports.
METRICS: dict[str, tuple[str, ...]] = {
    "BLEU": ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4"),
    "METEOR": ("METEOR",),
    "ROUGE_L": ("ROUGE_L",),
    "CIDEr": ("CIDEr",),
}

JAVA_MISSING = (
    "captioning metrics need Java (the PTB tokenizer and METEOR run on it): install a JRE, "
    "e.g. apt-get install default-jre"
)

# Characters the Java PTB tokenizer treats as line ends. Its input is one caption per line, so any
# of these inside a caption would shift every later caption onto the wrong image without an error
# (pycocoevalcap only replaces "\n"). They are turned into spaces, which is how the tokenizer treats
# other whitespace, so captions without them are tokenised exactly as by COCOEvalCap.
_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


class JavaNotFoundError(MissingFileError):
    """The ``java`` executable is not on ``PATH``."""


def require_java() -> None:
    """Raise :class:`JavaNotFoundError` with install advice when ``java`` is not on ``PATH``."""
    if shutil.which("java") is None:
        raise JavaNotFoundError(JAVA_MISSING)


# ---- metrics -------------------------------------------------------------------------------------
def _metric_families(metrics: Sequence[str]) -> list[str]:
    """Canonical family names of ``metrics`` (case-insensitive; ``BLEU_1`` .. ``BLEU_4`` mean BLEU)."""
    lookup = {name.lower(): name for name in METRICS}
    lookup.update({key.lower(): "BLEU" for key in METRICS["BLEU"]})
    lookup["rouge"] = "ROUGE_L"
    lookup["cider-d"] = "CIDEr"
    out: list[str] = []
    for name in metrics:
        key = str(name).lower()
        if key == "spice":
            raise UserError("SPICE is not supported: it needs Stanford CoreNLP models downloaded at run time")
        if key not in lookup:
            raise UserError(f"unknown caption metric {name!r}; choose from {', '.join(METRICS)}")
        if lookup[key] not in out:
            out.append(lookup[key])
    if not out:
        raise UserError("no caption metric requested")
    return out


def _check_pairs(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]) -> list[Any]:
    """The evaluated keys (in ``predictions`` order) after checking both dicts agree and are well typed."""
    if not predictions:
        raise UserError("no predictions to evaluate")
    missing = [k for k in references if k not in predictions]
    extra = [k for k in predictions if k not in references]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} image id(s) without a prediction: {_show(missing)}")
        if extra:
            parts.append(f"{len(extra)} predicted image id(s) without references: {_show(extra)}")
        raise UserError("predictions and references must have the same image ids; " + "; ".join(parts))
    for key, text in predictions.items():
        if not isinstance(text, str):
            raise UserError(f"prediction for image id {key!r} must be a string, got {type(text).__name__}")
    for key, refs in references.items():
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise UserError(f"references for image id {key!r} must be a list of strings, got {type(refs).__name__}")
        if not refs:
            raise UserError(f"image id {key!r} has no reference caption")
        bad = [r for r in refs if not isinstance(r, str)]
        if bad:
            raise UserError(f"reference captions of image id {key!r} must be strings, got {type(bad[0]).__name__}")
    return list(predictions)


def _show(ids: Sequence[Any], n: int = 5) -> str:
    shown = ", ".join(repr(i) for i in list(ids)[:n])
    return shown + (f", ... ({len(ids) - n} more)" if len(ids) > n else "")


def ptb_tokenize(captions: Mapping[Any, Sequence[str]]) -> dict[Any, list[str]]:
    """pycocoevalcap's ``PTBTokenizer`` on ``{key: [caption, ...]}`` -> ``{key: [tokenised, ...]}``
    (lower-cased, punctuation tokens removed, tokens joined by single spaces), with line-break
    characters inside captions turned into spaces first and the output checked to line up."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    require_java()
    wrapped = {k: [{"caption": c.translate(_LINE_BREAKS)} for c in caps] for k, caps in captions.items()}
    out = PTBTokenizer().tokenize(wrapped)
    if list(out) != list(wrapped) or any(len(out[k]) != len(wrapped[k]) for k in wrapped):
        sent = sum(map(len, wrapped.values()))
        got = sum(map(len, out.values()))
        raise RuntimeError(f"the PTB tokenizer (Java) returned {got} line(s) for {sent} caption(s)")
    return out


@contextlib.contextmanager
def _meteor() -> Iterator[Any]:
    """pycocoevalcap's ``Meteor`` scorer whose Java process is ended on exit, whatever happens."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        yield scorer
    finally:
        proc = scorer.meteor_p
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        # Meteor.__del__ takes this lock again; one left held by an interrupted compute_score would
        # hang the garbage collector, so hand it a fresh one (its kill/wait are no-ops by now).
        scorer.lock = threading.Lock()


def _meteor_score(gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> float:
    with _meteor() as scorer:
        try:
            score, _ = scorer.compute_score(gts, res)
        except (ValueError, OSError) as err:  # its Java process died or answered nonsense
            err_text = ""
            with contextlib.suppress(Exception):
                scorer.meteor_p.kill()
                err_text = scorer.meteor_p.stderr.read().decode(errors="replace").strip()[-2000:]
            raise RuntimeError(f"METEOR (Java) failed: {err}" + (f"\n{err_text}" if err_text else "")) from err
    return float(score)


def caption_metrics(
    predictions: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    metrics: Sequence[str] = ("BLEU", "METEOR", "ROUGE_L", "CIDEr"),
    per_image: dict[str, dict[Any, float]] | None = None,
) -> dict[str, float]:
    """COCO caption metrics of a whole set of generated captions.

    Args:
        predictions: ``{image_id: generated caption}``, one caption per image.
        references: ``{image_id: [reference caption, ...]}`` (at least one each), the same ids.
        metrics: Which to compute, among ``"BLEU"`` (gives ``BLEU_1`` .. ``BLEU_4``), ``"METEOR"``,
            ``"ROUGE_L"`` and ``"CIDEr"`` (CIDEr-D); case-insensitive.
        per_image: When a dict, it receives ``{"ROUGE_L": {id: score}, "CIDEr": {id: score}}`` for
            those requested: the two set-level metrics that are means of per-image scores (CIDEr's
            document frequencies stay those of the whole set). BLEU and METEOR are not such means.

    Returns:
        ``{"BLEU_1", ..., "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"}`` (those requested) as floats in
        [0, 1], CIDEr in [0, 10]. The values are those of ``COCOEvalCap.evaluate`` on the same
        captions; the order of the ids can only move the last bits of the float means.

    Raises:
        ValueError: the ids differ (the message names missing and extra ids), a caption is not a
            string, an image has no reference, or an unknown metric (or SPICE) is requested.
        JavaNotFoundError: ``java`` is not on ``PATH``.
    """
    families = _metric_families(metrics)
    keys = _check_pairs(predictions, references)
    gts = ptb_tokenize({k: list(references[k]) for k in keys})
    res = ptb_tokenize({k: [predictions[k]] for k in keys})
    out: dict[str, float] = {}
    for family in families:
        if family == "BLEU":
            from pycocoevalcap.bleu.bleu import Bleu

            scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
            out.update({name: float(s) for name, s in zip(METRICS["BLEU"], scores)})
        elif family == "METEOR":
            out["METEOR"] = _meteor_score(gts, res)
        elif family == "ROUGE_L":
            from pycocoevalcap.rouge.rouge import Rouge

            mean, scores = Rouge().compute_score(gts, res)
            out["ROUGE_L"] = float(mean)
            if per_image is not None:
                per_image["ROUGE_L"] = {k: float(v) for k, v in zip(gts, scores)}
        elif family == "CIDEr":
            from pycocoevalcap.cider.cider import Cider

            if not any(r.strip() for refs in gts.values() for r in refs):
                raise UserError("every reference caption is empty after tokenisation; CIDEr is undefined")
            mean, scores = Cider().compute_score(gts, res)
            out["CIDEr"] = float(mean)
            if per_image is not None:
                per_image["CIDEr"] = {k: float(v) for k, v in zip(gts, scores)}
    return out


# ---- file formats --------------------------------------------------------------------------------
def _read_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from err


def _image_id(value: Any, where: str, field: str = "image_id") -> str:
    """The string key of a JSON image id (int or str; bools, floats and the rest are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UserError(f"{where}: {field!r} must be an integer or a string, got {value!r}")
    return str(value)


def load_caption_predictions(path: str | os.PathLike) -> dict[str, str]:
    """Read generated captions in the official COCO results format.

    Args:
        path: JSON file holding ``[{"image_id": int | str, "caption": str}, ...]`` (other keys are
            ignored), one entry per image.

    Returns:
        ``{str(image_id): caption}`` in file order.

    Raises:
        ValueError: naming the file and the entry, when the top level is not a list, an entry is
            not an object or lacks ``image_id``/``caption``, a value has the wrong type, or an
            image id occurs twice.
    """
    data = _read_json(path, "predictions")
    if not isinstance(data, list):
        raise UserError(f"{path}: COCO caption results must be a JSON list of {{'image_id', 'caption'}} objects, got {type(data).__name__}")
    out: dict[str, str] = {}
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected an object with 'image_id' and 'caption', got {type(entry).__name__}")
        missing = [k for k in ("image_id", "caption") if k not in entry]
        if missing:
            raise UserError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
        key = _image_id(entry["image_id"], where)
        if not isinstance(entry["caption"], str):
            raise UserError(f"{where} (image_id {entry['image_id']!r}): 'caption' must be a string, got {type(entry['caption']).__name__}")
        if key in out:
            raise UserError(f"{where}: duplicate prediction for image_id {entry['image_id']!r} (one caption per image)")
        out[key] = entry["caption"]
    return out


def load_caption_references(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read reference captions in the COCO caption annotation format.

    Args:
        path: JSON file holding ``{"images": [{"id", ...}], "annotations": [{"image_id", "id",
            "caption"}, ...]}``. ``images`` may be left out; when present, every caption must
            belong to a listed image and every listed image needs a caption.

    Returns:
        ``{str(image_id): [caption, ...]}``, images in ``images`` order (else first-caption order),
        captions in file order.

    Raises:
        ValueError: naming the file and the entry, for a wrong layout, missing keys, wrong types,
            captions of unlisted images or listed images without captions.
    """
    data = _read_json(path, "references")
    if not isinstance(data, dict) or "annotations" not in data:
        raise UserError(f"{path}: COCO caption annotations must be a JSON object with an 'annotations' list")
    annotations = data["annotations"]
    if not isinstance(annotations, list):
        raise UserError(f"{path}: 'annotations' must be a list, got {type(annotations).__name__}")
    out: dict[str, list[str]] = {}
    images = data.get("images")
    if images is not None:
        if not isinstance(images, list):
            raise UserError(f"{path}: 'images' must be a list, got {type(images).__name__}")
        for i, image in enumerate(images):
            where = f"{path}: images[{i}]"
            if not isinstance(image, dict) or "id" not in image:
                raise UserError(f"{where}: expected an object with an 'id'")
            key = _image_id(image["id"], where, "id")
            if key in out:
                raise UserError(f"{where}: duplicate image id {image['id']!r}")
            out[key] = []
    for i, ann in enumerate(annotations):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict):
            raise UserError(f"{where}: expected an object with 'image_id' and 'caption', got {type(ann).__name__}")
        missing = [k for k in ("image_id", "caption") if k not in ann]
        if missing:
            raise UserError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
        key = _image_id(ann["image_id"], where)
        if not isinstance(ann["caption"], str):
            raise UserError(f"{where} (image_id {ann['image_id']!r}): 'caption' must be a string, got {type(ann['caption']).__name__}")
        if images is not None and key not in out:
            raise UserError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")
        out.setdefault(key, []).append(ann["caption"])
    empty = [k for k, caps in out.items() if not caps]
    if empty:
        raise UserError(f"{path}: {len(empty)} image(s) in 'images' have no caption: {_show(empty)}")
    if not out:
        raise UserError(f"{path}: no captions")
    return out


def align_captions(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    allow_missing: bool = False,
    predictions_name: str = "predictions",
    references_name: str = "references",
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Pair predictions with references by image id, in references order.

    Args:
        predictions: ``{image_id: caption}``.
        references: ``{image_id: [caption, ...]}``.
        allow_missing: Evaluate only the predicted images when some referenced images have no
            prediction (otherwise an error).
        predictions_name: How errors name the predictions (e.g. their file).
        references_name: How errors name the references (e.g. their file).

    Raises:
        ValueError: a prediction's image id is not among the references, or (unless
            ``allow_missing``) an image of the references has no prediction.
    """
    unknown = [k for k in predictions if k not in references]
    if unknown:
        raise UserError(f"{predictions_name}: {len(unknown)} prediction(s) for image ids not in {references_name}: {_show(unknown)}")
    missing = [k for k in references if k not in predictions]
    if missing and not allow_missing:
        raise UserError(
            f"{predictions_name}: no prediction for {len(missing)} of the {len(references)} images of "
            f"{references_name}: {_show(missing)} (allow_missing / --allow-missing evaluates the predicted images only)"
        )
    keys = [k for k in references if k in predictions]
    return {k: predictions[k] for k in keys}, {k: list(references[k]) for k in keys}


# ---- CLI -----------------------------------------------------------------------------------------
def format_table(metrics: Mapping[str, float]) -> str:
    """A two-column text table of metric values."""
    width = max(len(k) for k in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for name, value in metrics.items():
        shown = f"{int(value)}" if name == "num_samples" else f"{value:.4f}"
        lines.append(f"{name:<{width}}  {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``lit-vlm eval caption``: score a COCO caption results file against COCO caption annotations."""
    parser = argparse.ArgumentParser(
        prog="lit-vlm eval caption",
        description="Score generated captions (COCO results format) with the COCO caption evaluator's "
        "BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) (pycocoevalcap; needs Java). SPICE is not computed.",
    )
    parser.add_argument("--references", required=True, help='COCO caption annotations JSON: {"images": [...], "annotations": [{"image_id", "id", "caption"}]}')
    parser.add_argument("--predictions", required=True, help='COCO caption results JSON: [{"image_id": ..., "caption": "..."}]')
    parser.add_argument("--allow-missing", action="store_true", help="score only the predicted images when some referenced images have no prediction")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), metavar="METRIC",
                        help=f"metrics to compute, among {' '.join(METRICS)} (default: all)")
    parser.add_argument("--output", help="also write the metrics (and num_samples) to this JSON file")
    args = parser.parse_args(argv)

    families = _metric_families(args.metrics)  # a bad name fails before Java starts
    require_java()
    predictions = load_caption_predictions(args.predictions)
    references = load_caption_references(args.references)
    preds, refs = align_captions(predictions, references, args.allow_missing, str(args.predictions), str(args.references))
    metrics: dict[str, float] = caption_metrics(preds, refs, families)
    metrics["num_samples"] = float(len(preds))
    print(format_table(metrics))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
