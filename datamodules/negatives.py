"""Compositional hard negatives of a caption: the caption with one thing changed.

Two sources, one set of kinds (named as SugarCrepe's, Hsieh et al. 2023):

* the synthetic world writes them exact from each scene (``KEY.json`` ``"negatives"``, one
  ``{kind: text}`` per caption; :func:`lit_vlm.datamodules.synth.perturb`);
* for real captions, :func:`rule_based` edits the text: ``replace_object`` (a noun of a vocabulary
  for another), ``replace_attribute`` (a colour for another), ``swap_attributes`` (two different
  colours exchanged), ``swap_objects`` (two nouns exchanged, or a spatial relation reversed:
  left/right, above/below, top/bottom, in front of/behind). Rules cannot know the picture, so a rule-based
  negative can by chance be true of it; NegCLIP's and SugarCrepe's rule sets have the same limit.

:func:`pick` draws the negatives of one training sample from either source.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from lit_vlm.datamodules.synth import NEGATIVE_KINDS, SHAPES

__all__ = ["COLOUR_WORDS", "NEGATIVE_KINDS", "OBJECT_WORDS", "check_kinds", "pick", "rule_based"]

#: Basic colour terms (Berlin and Kay's eleven, with "grey"/"gray" and the synthetic world's colours).
COLOUR_WORDS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "brown",
                                 "pink", "grey", "gray")
#: Nouns ``replace_object`` and ``swap_objects`` exchange: the synthetic world's shapes and the
#: one-word COCO object categories (without "orange", a colour too).
OBJECT_WORDS: tuple[str, ...] = (*SHAPES, "person", "man", "woman", "child", "bicycle", "car", "motorcycle", "airplane",
                                 "bus", "train", "truck", "boat", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
                                 "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
                                 "suitcase", "frisbee", "skis", "snowboard", "kite", "skateboard", "surfboard", "bottle",
                                 "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
                                 "broccoli", "carrot", "pizza", "donut", "cake", "chair", "couch", "bed", "table",
                                 "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "microwave", "oven", "toaster",
                                 "sink", "refrigerator", "book", "clock", "vase", "scissors", "toothbrush")
_RELATIONS: tuple[tuple[str, str], ...] = (("left", "right"), ("above", "below"), ("top", "bottom"),
                                           ("in front of", "behind"), ("over", "under"))
_FLIPPED: dict[str, str] = {**dict(_RELATIONS), **{b: a for a, b in _RELATIONS}}  # each relation word's opposite


def check_kinds(kinds: Sequence[str], where: str) -> list[str]:
    """``kinds`` as a list, or a one-line error naming the unknown ones."""
    unknown = [k for k in kinds if k not in NEGATIVE_KINDS]
    if unknown or not kinds:
        raise ValueError(f"{where}: unknown hard-negative kinds {unknown or kinds}; the kinds are {', '.join(NEGATIVE_KINDS)}")
    return list(kinds)


def _spans(text: str, words: Sequence[str]) -> list[tuple[int, int, str]]:
    """(start, end, word) of every whole-word occurrence of ``words`` in ``text`` (lower case)."""
    found = []
    for word in words:
        found += [(m.start(), m.end(), word) for m in re.finditer(rf"\b{re.escape(word)}\b", text)]
    return sorted(found)


def _replace(text: str, edits: list[tuple[int, int, str]]) -> str:
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return text


def _draw(seq: Sequence, generator: torch.Generator):
    return seq[int(torch.randint(len(seq), (1,), generator=generator))]


def rule_based(caption: str, kind: str, generator: torch.Generator,
               objects: Sequence[str] = OBJECT_WORDS, colours: Sequence[str] = COLOUR_WORDS) -> str | None:
    """``caption`` with one ``kind`` of change (lower-cased), or None when the rule finds nothing to change."""
    text = caption.lower()
    if kind in ("replace_object", "replace_attribute"):
        vocabulary = objects if kind == "replace_object" else colours
        spans = _spans(text, vocabulary)
        present = {w for _, _, w in spans}
        others = [w for w in vocabulary if w not in present]
        if not spans or not others:
            return None
        start, end, _ = _draw(spans, generator)
        return _replace(text, [(start, end, _draw(others, generator))])
    if kind in ("swap_attributes", "swap_objects"):
        spans = _spans(text, colours if kind == "swap_attributes" else objects)
        pairs = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:] if a[2] != b[2]]
        if pairs:
            a, b = _draw(pairs, generator)
            return _replace(text, [(a[0], a[1], b[2]), (b[0], b[1], a[2])])
        if kind == "swap_objects":  # no two nouns: reverse a spatial relation instead
            flips = [(s, e, _FLIPPED[w]) for s, e, w in _spans(text, list(_FLIPPED))]
            if flips:
                return _replace(text, [_draw(flips, generator)])
        return None
    raise ValueError(f"unknown hard-negative kind {kind!r}; the kinds are {', '.join(NEGATIVE_KINDS)}")


def pick(caption: str, stored: Mapping[str, str] | None, k: int, kinds: Sequence[str],
         generator: torch.Generator) -> list[str]:
    """Up to ``k`` negatives of ``caption``, each of a different kind drawn from ``kinds``: the
    stored exact ones (``stored``, the synthetic world's) when the sample has them, else rule-based."""
    order = [kinds[int(i)] for i in torch.randperm(len(kinds), generator=generator)]
    out: list[str] = []
    for kind in order:
        if len(out) == k:
            break
        text = stored.get(kind) if stored is not None else rule_based(caption, kind, generator)
        if text and text != caption:
            out.append(text)
    return out
