"""The embedded synthetic world: a small, deterministic, seeded multimodal data set.

Each sample is a picture of 1-4 coloured shapes placed on a 3x3 grid, with several
captions, VQAv2-style questions (10 annotator answers each) and a zero-shot class label
(the shape of the largest object). The world is small enough to generate in well under
two minutes on a laptop CPU, yet rich enough for CLIP-style models to really learn
colours, shapes, counts and spatial relations.

It is written in the formats real corpora use, so the same loaders serve both::

    OUT/
      manifest.json                       written last, atomically
      train/shard-000000.tar ...          webdataset shards, img2dataset layout
      val/shard-000000.tar ...            (KEY.jpg, KEY.txt, KEY.json per sample)
      test/shard-000000.tar ...
      annotations/captions_{val,test}.json                    COCO caption format
      annotations/vqa_{val,test}_{questions,annotations}.json VQAv2 format
      annotations/compositional_{val,test}.json               true caption against one-change negatives
      annotations/pope_{val,test}.json                        POPE object-hallucination questions
      zeroshot.json                       {"classnames": [...], "templates": [...]}

Determinism: every sample draws from its own random streams, derived from
``numpy.random.SeedSequence([seed, split_idx, index])`` (spawned into independent
children for the scene, the rendering, the captions and the questions), so the output
is byte-identical for a given config whatever the number of worker processes.

Each sample's ``KEY.json`` holds ``key``, ``image_id`` (train 1..N, val 1_000_000+i, test
2_000_000+i), ``split``, ``width``, ``height``, ``caption`` (= the first caption, also in
``KEY.txt``), ``captions``, ``label``, ``classname``, ``objects`` (shape, colour, size, row,
col), ``background`` and ``questions`` (question_id = image_id * 10 + j, question, answers,
answer_type, question_type, multiple_choice_answer and answer_confidences, the latter so
that the VQAv2 annotation file can be rebuilt from the shards) and ``negatives`` (per caption,
``{kind: text}``: compositional hard negatives, exact from the scene; see :func:`perturb`),
``conversations`` (a multi-turn LLaVA conversation: long-form turns, then the questions with the
short-answer suffix) and ``pretrain_conversations`` (a brief-description instruction and the first
caption: LLaVA's stage-1 pairs); see :mod:`lit_vlm.datamodules.instructions`.

Usage::

    from lit_vlm.datamodules.synth import SynthConfig, generate
    manifest = generate("data/synth", SynthConfig(num_train=2000))
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import multiprocessing as mp
import os
import re
import sys
import tarfile
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from lit_vlm.errors import MissingFileError, UserError
from lit_vlm.io import manifest_format, write_json_atomic

__all__ = [
    "SHAPES",
    "COLOURS",
    "SIZES",
    "ROWS",
    "COLS",
    "CLASSNAMES",
    "TEMPLATES",
    "SPLITS",
    "FORMAT",
    "VERSION",
    "SynthConfig",
    "SceneObject",
    "UNIT_SHAPES",
    "Background",
    "Scene",
    "make_scene",
    "render",
    "captions",
    "captions_with_negatives",
    "perturb",
    "NEGATIVE_KINDS",
    "questions",
    "vocabulary",
    "tokenize",
    "generate",
    "is_generated",
    "load_manifest",
    "shard_paths",
    "vqa_files",
    "main",
]

# --------------------------------------------------------------------------------------
# World vocabulary
# --------------------------------------------------------------------------------------

FORMAT = "lit-vlm-synth"
#: Layout version of the files a world consists of. 2 added each caption's hard negatives
#: (``KEY.json`` ``negatives``) and ``annotations/compositional_{val,test}.json``; the images,
#: captions and questions of a config are those of version 1. 3 added instruction data (``KEY.json``
#: ``conversations`` and ``pretrain_conversations``, LLaVA's format) and ``annotations/pope_{val,test}.json``;
#: 4 asks a conversation's turns in random order (a short-answer question may come first).
#: An older world is regenerated in place when a DataModule prepares it.
VERSION = 4
SPLITS: tuple[str, ...] = ("train", "val", "test")

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart",
)
COLOURS: tuple[str, ...] = (
    "red", "green", "blue", "yellow", "purple", "orange", "white", "black",
)
SIZES: tuple[str, ...] = ("small", "large")
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")

#: Zero-shot class names; the label of a sample is the index of its largest object's shape.
CLASSNAMES: list[str] = list(SHAPES)

#: Zero-shot prompt templates (``template.format(classname)``).
TEMPLATES: list[str] = [
    "a photo of a big {}.",
    "a drawing of a large {}.",
    "a picture of a large {} shape.",
    "a big {} on a plain background.",
    "an image containing a large {}.",
    "a rendering of a big {}.",
    "a simple picture of a large {}.",
    "the biggest shape is a {}.",
]

#: Nominal RGB of each object colour (objects get +-10 per channel of jitter).
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 40),
    "purple": (135, 50, 175),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

#: Muted, desaturated, mid-luminance background tones: never confusable with COLOUR_RGB.
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "silver": (160, 160, 158),
    "beige": (182, 170, 150),
    "slate": (108, 117, 130),
    "olive": (122, 120, 96),
    "taupe": (140, 127, 117),
    "sage": (128, 141, 124),
    "sand": (170, 160, 134),
    "stone": (148, 144, 139),
    "steel": (114, 127, 140),
    "mauve": (139, 124, 137),
}

_PLURALS: dict[str, str] = {s: (s + "es" if s.endswith(("s", "x", "sh", "ch")) else s + "s") for s in SHAPES}
_NUM_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
)
_SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}

#: Caption phrasings of each grid cell (the first is the plainest).
_POS_PHRASES: dict[tuple[str, str], tuple[str, ...]] = {
    ("top", "left"): ("in the top left corner", "in the upper left corner", "at the top left"),
    ("top", "center"): ("at the top", "at the top center", "near the top"),
    ("top", "right"): ("in the top right corner", "in the upper right corner", "at the top right"),
    ("middle", "left"): ("on the left", "on the left side", "at the left"),
    ("middle", "center"): ("in the middle", "in the center", "at the center"),
    ("middle", "right"): ("on the right", "on the right side", "at the right"),
    ("bottom", "left"): ("in the bottom left corner", "in the lower left corner", "at the bottom left"),
    ("bottom", "center"): ("at the bottom", "at the bottom center", "near the bottom"),
    ("bottom", "right"): ("in the bottom right corner", "in the lower right corner", "at the bottom right"),
}
#: VQA answers for "where is ...?": canonical answer first, then annotator paraphrases.
_POS_ANSWERS: dict[tuple[str, str], tuple[str, ...]] = {
    ("top", "left"): ("top left", "upper left", "top left corner"),
    ("top", "center"): ("top", "at the top", "top center", "top middle"),
    ("top", "right"): ("top right", "upper right", "top right corner"),
    ("middle", "left"): ("left", "on the left", "left side", "middle left"),
    ("middle", "center"): ("center", "middle", "in the middle", "centre"),
    ("middle", "right"): ("right", "on the right", "right side", "middle right"),
    ("bottom", "left"): ("bottom left", "lower left", "bottom left corner"),
    ("bottom", "center"): ("bottom", "at the bottom", "bottom center", "bottom middle"),
    ("bottom", "right"): ("bottom right", "lower right", "bottom right corner"),
}
_RELATIONS: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "above": ("above",),
    "below": ("below", "beneath", "under"),
}

_LIST_PREFIXES: tuple[str, ...] = (
    "", "a picture of ", "an image of ", "a photo of ", "a drawing of ", "a rendering of ",
    "a simple scene with ", "a scene with ", "an image showing ",
)
_THERE_SUFFIXES: tuple[str, ...] = ("", " in the picture", " in this image", " on a plain background")
_COUNT_NOUNS: tuple[str, ...] = ("objects", "shapes")
_POS_FIRST_FORMS: tuple[str, ...] = ("{pos} there is {np}", "{pos} is {np}", "{pos}, {np}")
_REST_FORMS: tuple[str, ...] = (", with {rest}", ", and {rest}", " and {rest}", "; there is also {rest}")

# VQA wording. Each entry: (template, question_type).
_Q_COLOUR = (
    ("what color is the {s}?", "what color is the"),
    ("what is the color of the {s}?", "what is the color of the"),
)
_Q_SHAPE = (
    ("what shape is the {c} object?", "what shape is the"),
    ("what shape is the {c} one?", "what shape is the"),
    ("what is the shape of the {c} object?", "what is the shape of the"),
)
_Q_COUNT_ALL = ("how many objects are there?", "how many shapes are there?", "how many shapes are in the image?")
_Q_COUNT_SHAPE = "how many {p} are there?"
_Q_COUNT_COLOUR = "how many {c} objects are there?"
_Q_COUNT_PAIR = "how many {c} {p} are there?"
_Q_THERE_IS = "is there {a} {c} {s}?"
_Q_ANY = "are there any {p}?"
_Q_IS_SIZE = "is the {c} {s} {z}?"
_Q_WHERE_PAIR = "where is the {c} {s}?"
_Q_WHERE_SHAPE = "where is the {s}?"

_COLOUR_CONFUSIONS: dict[str, tuple[str, ...]] = {
    "red": ("orange",), "green": ("blue", "yellow"), "blue": ("purple",), "yellow": ("orange",),
    "purple": ("blue", "pink"), "orange": ("red", "yellow"), "white": ("gray",), "black": ("gray", "blue"),
}
_SHAPE_CONFUSIONS: dict[str, tuple[str, ...]] = {
    "circle": ("oval",), "square": ("rectangle", "diamond"), "triangle": ("diamond",), "star": ("cross",),
    "hexagon": ("circle", "octagon"), "diamond": ("square", "rhombus"), "cross": ("plus", "star"),
    "heart": ("circle",),
}

#: Probability that one annotator gives a different, plausible answer.
_DISAGREE_P = 0.05

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Split text the way the default word-level tokenizer does (lowercase words + punctuation)."""
    return _TOKEN_RE.findall(text.lower())


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass
class SynthConfig:
    """Configuration of the synthetic world (stored verbatim in ``manifest.json``).

    Attributes:
        seed: master seed (non-negative); same config + seed gives byte-identical output.
        image_size: side of the square JPEG images, in pixels (32-1024).
        num_train: number of training samples.
        num_val: number of validation samples (scene signatures unique within the split).
        num_test: number of test samples (scene signatures unique within the split).
        shard_size: samples per webdataset tar shard.
        min_objects: minimum number of objects per scene (>= 1).
        max_objects: maximum number of objects per scene (<= 9, one per grid cell).
        num_captions: captions per image, all distinct (1-20; 5 by default).
        holdout: "colour shape" combinations (e.g. ``["red star"]``) never drawn in train
            scenes; val/test may contain them (compositional generalisation).
        jpeg_quality: JPEG quality (1-100).
        min_questions: minimum number of VQA questions per image (1-10).
        max_questions: maximum number of VQA questions per image (1-10).
        duplicate_prob: probability that an object repeats the colour and shape of an
            earlier object of the scene (so captions like "two red circles" occur).
        main_object: every scene has exactly one large object (its subject, like the one
            object an ImageNet photo is labelled by) and small other objects, so the zero-shot
            label "shape of the largest object" is determined by what captions say; False draws
            every size uniformly (then the largest object is often ambiguous between several
            large ones of different shapes).
        exclude_eval_from_train: keep val/test scene signatures out of train, when cheap
            (the eval signatures are at most 10% of the possible train signatures; the
            manifest records whether it was done in ``eval_scenes_excluded_from_train``).
    """

    seed: int = 0
    image_size: int = 128
    num_train: int = 20000
    num_val: int = 500
    num_test: int = 1000
    shard_size: int = 1000
    min_objects: int = 1
    max_objects: int = 4
    num_captions: int = 5
    holdout: list[str] = field(default_factory=list)
    jpeg_quality: int = 90
    min_questions: int = 5
    max_questions: int = 8
    duplicate_prob: float = 0.15
    main_object: bool = True
    exclude_eval_from_train: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` with a clear message if any value is out of range.

        Also normalises ``holdout`` entries (lowercase, single spaces, no duplicates).
        """

        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(f"invalid SynthConfig: {msg}")

        for name in ("seed", "image_size", "num_train", "num_val", "num_test", "shard_size", "min_objects",
                     "max_objects", "num_captions", "jpeg_quality", "min_questions", "max_questions"):
            value = getattr(self, name)
            check(isinstance(value, (int, np.integer)) and not isinstance(value, bool),
                  f"{name} must be an int, got {value!r}")
        check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        check(32 <= self.image_size <= 1024, f"image_size must be in [32, 1024], got {self.image_size}")
        for name in ("num_train", "num_val", "num_test"):
            n = getattr(self, name)
            check(0 <= n < 1_000_000, f"{name} must be in [0, 999999] (image ids are split-offset), got {n}")
        check(self.shard_size >= 1, f"shard_size must be >= 1, got {self.shard_size}")
        check(1 <= self.min_objects <= 9, f"min_objects must be in [1, 9], got {self.min_objects}")
        check(1 <= self.max_objects <= 9, f"max_objects must be in [1, 9] (one object per grid cell), "
                                          f"got {self.max_objects}")
        check(self.min_objects <= self.max_objects,
              f"min_objects ({self.min_objects}) must be <= max_objects ({self.max_objects})")
        check(1 <= self.num_captions <= 20, f"num_captions must be in [1, 20], got {self.num_captions}")
        check(1 <= self.jpeg_quality <= 100, f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        check(1 <= self.min_questions <= self.max_questions <= 10,
              f"need 1 <= min_questions <= max_questions <= 10, got {self.min_questions}, {self.max_questions}")
        check(isinstance(self.duplicate_prob, (int, float)) and 0.0 <= self.duplicate_prob <= 1.0,
              f"duplicate_prob must be in [0, 1], got {self.duplicate_prob!r}")
        check(isinstance(self.main_object, bool), f"main_object must be a bool, got {self.main_object!r}")
        check(isinstance(self.exclude_eval_from_train, bool),
              f"exclude_eval_from_train must be a bool, got {self.exclude_eval_from_train!r}")
        check(isinstance(self.holdout, (list, tuple)), f"holdout must be a list of 'colour shape' strings, "
                                                        f"got {self.holdout!r}")
        normalised: list[str] = []
        for entry in self.holdout:
            words = entry.lower().split() if isinstance(entry, str) else []
            check(len(words) == 2 and words[0] in COLOURS and words[1] in SHAPES,
                  f"holdout entry {entry!r} is not 'colour shape' with colour in {list(COLOURS)} "
                  f"and shape in {list(SHAPES)}")
            combo = " ".join(words)
            if combo not in normalised:
                normalised.append(combo)
        check(len(normalised) < len(COLOURS) * len(SHAPES), "holdout removes every colour-shape combination")
        self.holdout = normalised
        for split in ("val", "test"):
            n = getattr(self, f"num_{split}")
            cap = signature_capacity(self.min_objects, self.max_objects, len(COLOURS) * len(SHAPES))
            check(n <= cap, f"num_{split}={n} exceeds the {cap} distinct scenes possible with "
                            f"{self.min_objects}-{self.max_objects} objects; eval scenes must be unique "
                            f"(raise max_objects or lower num_{split})")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SynthConfig":
        """Build a config from a dict (e.g. ``manifest["config"]``); unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"unknown SynthConfig keys: {unknown}")
        return cls(**{k: (list(v) if k == "holdout" else v) for k, v in data.items()})


def signature_capacity(min_objects: int, max_objects: int, num_pairs: int) -> int:
    """Number of distinct scene signatures (multisets of colour-shape pairs) with min..max objects."""
    return sum(math.comb(num_pairs + k - 1, k) for k in range(min_objects, max_objects + 1))


# --------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------


def _normalise_polygon(points: Sequence[tuple[float, float]], extent: float = 1.0) -> np.ndarray:
    """Centre a polygon on its bounding box and scale its larger half-extent to ``extent``."""
    pts = np.asarray(points, dtype=np.float64)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    pts = pts - (lo + hi) / 2
    return pts * (extent / np.abs(pts).max())


def _regular(n: int, radius: float = 1.0, phase_deg: float = -90.0) -> list[tuple[float, float]]:
    angles = np.deg2rad(phase_deg + 360.0 * np.arange(n) / n)
    return list(zip(radius * np.cos(angles), radius * np.sin(angles)))


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    angles = np.deg2rad(-90.0 + 180.0 * np.arange(2 * points) / points)
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return list(zip(radii * np.cos(angles), radii * np.sin(angles)))


def _cross(w: float = 0.34) -> list[tuple[float, float]]:
    return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]


def _heart(n: int = 72) -> list[tuple[float, float]]:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # image y points down
    return list(zip(x, y))


#: Unit polygons (image coordinates, y down) fitting in [-1, 1]^2.
UNIT_SHAPES: dict[str, np.ndarray] = {
    "circle": _normalise_polygon(_regular(64)),
    "square": _normalise_polygon([(-1, -1), (1, -1), (1, 1), (-1, 1)], extent=0.84),
    "triangle": _normalise_polygon([(0, -0.9), (1, 0.85), (-1, 0.85)]),
    "star": _normalise_polygon(_star()),
    "hexagon": _normalise_polygon(_regular(6, phase_deg=0.0)),
    "diamond": _normalise_polygon([(0, -1), (0.68, 0), (0, 1), (-0.68, 0)]),
    "cross": _normalise_polygon(_cross()),
    "heart": _normalise_polygon(_heart()),
}


def _polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


#: Area of each unit polygon (in half-cell^2 units at scale 1).
UNIT_AREAS: dict[str, float] = {s: _polygon_area(p) for s, p in UNIT_SHAPES.items()}

#: Scale (bounding half-extent as a fraction of the half-cell) ranges per size.
#: (Any large object has a larger area than any small one, whatever the shapes.)
_SCALE_RANGE: dict[str, tuple[float, float]] = {"small": (0.42, 0.50), "large": (0.80, 0.90)}
_MAX_ANGLE_DEG = 6.0


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene.

    ``row``/``col`` name its grid cell (``ROWS``/``COLS``); ``scale`` is its bounding
    half-extent as a fraction of the half-cell; ``dx``/``dy`` its offset from the cell
    centre in half-cells; ``angle`` a small rotation in degrees.
    """

    shape: str
    colour: str
    size: str
    row: str
    col: str
    scale: float = 0.85
    dx: float = 0.0
    dy: float = 0.0
    angle: float = 0.0

    @property
    def area(self) -> float:
        """Rendered area in half-cell^2 units (proportional to the pixel area at any resolution)."""
        return UNIT_AREAS[self.shape] * self.scale**2

    @property
    def cell(self) -> tuple[str, str]:
        return (self.row, self.col)

    def to_json(self) -> dict[str, str]:
        """The public description stored in the per-sample JSON."""
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "row": self.row, "col": self.col}


@dataclass(frozen=True)
class Background:
    """A background: ``kind`` is "solid", "gradient" or "noise"; ``tones`` names BACKGROUND_RGB keys."""

    kind: str
    tones: tuple[str, ...]
    direction: str = ""  # "vertical" / "horizontal" for gradients

    @property
    def name(self) -> str:
        """Short human-readable description, e.g. "vertical gradient slate to sand"."""
        if self.kind == "gradient":
            return f"{self.direction} gradient {self.tones[0]} to {self.tones[1]}"
        if self.kind == "noise":
            return f"noisy {self.tones[0]}"
        return f"solid {self.tones[0]}"


@dataclass(frozen=True)
class Scene:
    """A scene: objects in distinct grid cells (in drawing order) over a background."""

    objects: tuple[SceneObject, ...]
    background: Background

    @property
    def signature(self) -> tuple[tuple[str, str], ...]:
        """What every caption states: the sorted multiset of (colour, shape) pairs."""
        return tuple(sorted((o.colour, o.shape) for o in self.objects))

    @property
    def largest(self) -> SceneObject:
        """The object with the largest rendered area (ties: the first drawn)."""
        best = self.objects[0]
        for obj in self.objects[1:]:
            if obj.area > best.area:
                best = obj
        return best

    @property
    def label(self) -> int:
        """Zero-shot class label: index in ``CLASSNAMES`` of the largest object's shape."""
        return CLASSNAMES.index(self.largest.shape)

    @property
    def classname(self) -> str:
        """Zero-shot class name: the largest object's shape."""
        return self.largest.shape


_ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)


def _pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    """Uniformly pick one element of a sequence (returns the element itself, not a numpy scalar)."""
    return seq[int(rng.integers(len(seq)))]


def _holdout_pairs(holdout: Iterable[str]) -> set[tuple[str, str]]:
    return {tuple(h.lower().split()) for h in holdout}  # type: ignore[misc]


def make_scene(rng: np.random.Generator, config: SynthConfig, allow_holdout: bool) -> Scene:
    """Draw a random scene.

    The number of objects is uniform in ``[min_objects, max_objects]``; cells are distinct;
    each object's colour-shape pair is uniform over the allowed pairs (all 64, or without
    ``config.holdout`` when ``allow_holdout`` is false), except that with probability
    ``duplicate_prob`` it repeats an earlier object's pair; with ``main_object`` one object,
    chosen uniformly, is large and the others small, otherwise sizes are uniform.
    """
    banned = set() if allow_holdout else _holdout_pairs(config.holdout)
    allowed = [p for p in _ALL_PAIRS if p not in banned]
    k = int(rng.integers(config.min_objects, config.max_objects + 1))
    cells = rng.permutation(9)[:k]
    main = int(rng.integers(k))
    objects: list[SceneObject] = []
    for i, cell in enumerate(cells):
        if objects and rng.random() < config.duplicate_prob:
            src = _pick(rng, objects)
            colour, shape = src.colour, src.shape
        else:
            colour, shape = _pick(rng, allowed)
        size = ("large" if i == main else "small") if config.main_object else _pick(rng, SIZES)
        lo, hi = _SCALE_RANGE[size]
        scale = float(rng.uniform(lo, hi))
        slack = 0.5 * (1.0 - 1.06 * scale)  # keep (rotated) shapes well inside their cell
        dx, dy = (float(v) for v in rng.uniform(-slack, slack, size=2))
        angle = float(rng.uniform(-_MAX_ANGLE_DEG, _MAX_ANGLE_DEG))
        objects.append(SceneObject(shape, colour, size, ROWS[int(cell) // 3], COLS[int(cell) % 3],
                                   scale, dx, dy, angle))
    tones = tuple(BACKGROUND_RGB)
    u = rng.random()
    if u < 0.4:
        background = Background("solid", (_pick(rng, tones),))
    elif u < 0.75:
        first = _pick(rng, tones)
        second = _pick(rng, [t for t in tones if t != first])
        background = Background("gradient", (first, second), _pick(rng, ("vertical", "horizontal")))
    else:
        background = Background("noise", (_pick(rng, tones),))
    return Scene(tuple(objects), background)


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------

_SUPERSAMPLE = 2
_BG_JITTER = 8
_OBJ_JITTER = 10
_NOISE_SIGMA = 7.0


def _jittered(rgb: Sequence[int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    """``rgb`` plus uniform integer jitter in ``[-amount, amount]`` per channel, clipped to 0-255."""
    noise = rng.integers(-amount, amount + 1, 3)
    return tuple(min(255, max(0, int(v) + int(d))) for v, d in zip(rgb, noise))  # type: ignore[return-value]


def _render_background(bg: Background, size: int, rng: np.random.Generator) -> Image.Image:
    """The background as an RGB image (each tone jittered by +-8 per channel)."""
    tones = [_jittered(BACKGROUND_RGB[t], rng, _BG_JITTER) for t in bg.tones]
    if bg.kind == "solid":
        return Image.new("RGB", (size, size), tones[0])
    if bg.kind == "gradient":
        t = np.linspace(0.0, 1.0, size)[:, None]
        ramp = np.rint(np.asarray(tones[0]) * (1 - t) + np.asarray(tones[1]) * t).astype(np.uint8)  # (size, 3)
        ramp = ramp[:, None, :] if bg.direction == "vertical" else ramp[None, :, :]
        return Image.fromarray(np.ascontiguousarray(np.broadcast_to(ramp, (size, size, 3))), "RGB")
    noise = np.rint(_NOISE_SIGMA * rng.standard_normal((size, size, 1), dtype=np.float32)).astype(np.int16)
    arr = np.clip(np.asarray(tones[0], np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Render a scene as an RGB ``image_size`` x ``image_size`` PIL image.

    Anti-aliasing by supersampling: the objects' polygons are drawn into a coverage mask at
    2x resolution, which is downscaled with LANCZOS and used to composite each object's
    colour (filling its grid cell; objects never leave their cell) over the background.
    Each object gets +-10 per channel of colour jitter from ``rng``; noise backgrounds draw
    their per-pixel noise from ``rng``.
    """
    size = image_size
    big = size * _SUPERSAMPLE
    background = _render_background(scene.background, size, rng)
    mask = Image.new("L", (big, big), 0)
    colours = Image.new("RGB", (size, size), 0)
    draw_mask, draw_colours = ImageDraw.Draw(mask), ImageDraw.Draw(colours)
    half_cell = big / 6.0
    for obj in scene.objects:
        row, col = ROWS.index(obj.row), COLS.index(obj.col)
        cx = (2 * col + 1 + obj.dx) * half_cell
        cy = (2 * row + 1 + obj.dy) * half_cell
        theta = math.radians(obj.angle)
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        pts = UNIT_SHAPES[obj.shape] @ rot.T * (obj.scale * half_cell) + (cx, cy)
        draw_mask.polygon([(float(x), float(y)) for x, y in pts], fill=255)
        x0, y0 = (col * size) // 3, (row * size) // 3
        x1, y1 = ((col + 1) * size + 2) // 3, ((row + 1) * size + 2) // 3
        draw_colours.rectangle((x0, y0, x1, y1), fill=_jittered(COLOUR_RGB[obj.colour], rng, _OBJ_JITTER))
    coverage = mask.resize((size, size), Image.Resampling.LANCZOS)
    return Image.composite(colours, background, coverage)


# --------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------


def _a(phrase: str) -> str:
    """The indefinite article for a phrase."""
    return "an" if phrase[0] in "aeiou" else "a"


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


class _CaptionBuilder:
    """Draws one caption of a scene; every caption names every object's colour and shape."""

    def __init__(self, scene: Scene, rng: np.random.Generator):
        self.scene = scene
        self.rng = rng

    # -- pieces ---------------------------------------------------------------------
    def size_flags(self, n: int) -> list[bool]:
        mode = _pick(self.rng, ("none", "all", "some"))
        if mode == "some":
            return [bool(self.rng.random() < 0.5) for _ in range(n)]
        return [mode == "all"] * n

    def noun_phrase(self, obj: SceneObject, with_size: bool, article: bool = True) -> str:
        """E.g. "a large red circle" (``article=False``: "large red circle")."""
        words = [_pick(self.rng, _SIZE_WORDS[obj.size])] if with_size else []
        phrase = " ".join([*words, obj.colour, obj.shape])
        return f"{_a(phrase)} {phrase}" if article else phrase

    def ordered(self) -> list[SceneObject]:
        objs = list(self.scene.objects)
        how = _pick(self.rng, ("drawn", "reading", "random"))
        if how == "reading":
            objs.sort(key=lambda o: (ROWS.index(o.row), COLS.index(o.col)))
        elif how == "random":
            objs = [objs[i] for i in self.rng.permutation(len(objs))]
        return objs

    def position(self, obj: SceneObject) -> str:
        return _pick(self.rng, _POS_PHRASES[obj.cell])

    def groups(self) -> list[str]:
        """Noun phrases with counts: ["two red circles", "a blue square"]."""
        grouped: dict[tuple[str, str], list[SceneObject]] = {}
        for obj in self.ordered():
            grouped.setdefault((obj.colour, obj.shape), []).append(obj)
        sized = _pick(self.rng, (False, True))
        out = []
        for (colour, shape), objs in grouped.items():
            same_size = len({o.size for o in objs}) == 1
            size = _pick(self.rng, _SIZE_WORDS[objs[0].size]) + " " if sized and same_size else ""
            if len(objs) == 1:
                phrase = f"{size}{colour} {shape}"
                out.append(f"{_pick(self.rng, (_a(phrase), 'one'))} {phrase}")
            else:
                out.append(f"{_NUM_WORDS[len(objs)]} {size}{colour} {_PLURALS[shape]}")
        return out

    # -- templates ------------------------------------------------------------------
    def listing(self) -> str:
        objs = self.ordered()
        flags = self.size_flags(len(objs))
        return _pick(self.rng, _LIST_PREFIXES) + _join([self.noun_phrase(o, f) for o, f in zip(objs, flags)])

    def there_is(self) -> str:
        items = self.groups()
        verb = "are" if items[0].split()[0] not in ("a", "an", "one") else "is"
        return f"there {verb} {_join(items)}{_pick(self.rng, _THERE_SUFFIXES)}"

    def counted(self) -> str:
        k = len(self.scene.objects)
        if k == 1:
            obj = self.scene.objects[0]
            return f"a single {self.noun_phrase(obj, self.size_flags(1)[0], article=False)}"
        objs = self.ordered()
        flags = self.size_flags(k)
        body = _join([self.noun_phrase(o, f) for o, f in zip(objs, flags)])
        return f"{_pick(self.rng, ('', 'a picture of ', 'an image with '))}{_NUM_WORDS[k]} " \
               f"{_pick(self.rng, _COUNT_NOUNS)}: {body}"

    def grouped(self) -> str:
        return _pick(self.rng, _LIST_PREFIXES) + _join(self.groups())

    def positional(self) -> str:
        objs = self.ordered()
        flags = self.size_flags(len(objs))
        parts = [f"{self.noun_phrase(o, f)} {self.position(o)}" for o, f in zip(objs, flags)]
        return _pick(self.rng, _LIST_PREFIXES) + _join(parts)

    def position_first(self) -> str:
        objs = self.ordered()
        flags = self.size_flags(len(objs))
        form = _pick(self.rng, _POS_FIRST_FORMS)
        parts = [form.format(pos=self.position(o), np=self.noun_phrase(o, f)) for o, f in zip(objs, flags)]
        return _join(parts)

    def relational(self) -> str:
        objs = self.ordered()
        first, second, rest = objs[0], objs[1], objs[2:]
        dr = ROWS.index(first.row) - ROWS.index(second.row)
        dc = COLS.index(first.col) - COLS.index(second.col)
        vertical = dc == 0 or (dr != 0 and self.rng.random() < 0.5)
        if vertical:
            relation = _pick(self.rng, _RELATIONS["above" if dr < 0 else "below"])
        else:
            relation = _pick(self.rng, _RELATIONS["left" if dc < 0 else "right"])
        flags = self.size_flags(len(objs))
        text = f"{self.noun_phrase(first, flags[0])} {relation} {self.noun_phrase(second, flags[1])}"
        if rest:
            with_pos = bool(self.rng.random() < 0.5)
            parts = [self.noun_phrase(o, f) + (" " + self.position(o) if with_pos else "")
                     for o, f in zip(rest, flags[2:])]
            text += _pick(self.rng, _REST_FORMS).format(rest=_join(parts))
        return _pick(self.rng, _LIST_PREFIXES) + text

    def caption(self) -> str:
        makers = [self.listing, self.there_is, self.counted, self.grouped, self.positional, self.position_first]
        weights = [2.0, 1.0, 1.0, 1.5, 2.0, 1.0]
        if len(self.scene.objects) >= 2:
            makers.append(self.relational)
            weights.append(2.5)
        p = np.asarray(weights) / sum(weights)
        maker = makers[int(self.rng.choice(len(makers), p=p))]
        self.form = maker.__name__
        return maker() + "."


def captions(scene: Scene, rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct lowercase captions ending in ".", each naming every object's colour and shape.

    Templates vary between plain listings ("a picture of a red circle and a blue star."),
    counts ("there are two red circles and a blue square."), absolute positions ("a red
    circle in the top left corner ...") and relations ("a red circle to the left of ...").
    """
    builder = _CaptionBuilder(scene, rng)
    out: list[str] = []
    for _ in range(500 * max(n, 1)):
        if len(out) == n:
            return out
        text = builder.caption()
        if text not in out:
            out.append(text)
    if len(out) == n:
        return out
    raise RuntimeError(f"could only draw {len(out)} distinct captions out of {n} for scene {scene.signature}")


# --------------------------------------------------------------------------------------
# Compositional hard negatives
# --------------------------------------------------------------------------------------

#: Kinds of hard negative, each changing one thing of the scene, named as SugarCrepe's (Hsieh et
#: al., 2023): another shape (object) or colour (attribute) for one object, two objects' colours
#: exchanged, two objects' places exchanged (what ARO's relation-order test probes).
NEGATIVE_KINDS: tuple[str, ...] = ("replace_object", "replace_attribute", "swap_attributes", "swap_objects")
#: Caption forms that state where every object is (or, with two objects, how they lie): the only
#: ones a swap of places makes false.
_PLACED_FORMS = ("positional", "position_first", "relational")


def perturb(scene: Scene, kind: str, rng: np.random.Generator, banned: frozenset = frozenset()) -> Scene | None:
    """``scene`` with one thing changed such that no caption of the result is true of ``scene``
    (None when ``kind`` cannot apply). Replacements and colour swaps produce a colour-shape pair
    ``scene`` lacks (every caption names every pair); place swaps move two objects whose pairs are
    unique, so every stated place or relation of the two becomes false. No result holds a pair of
    ``banned`` (training scenes: the held-out pairs never appear, not even in a negative)."""
    objs = list(scene.objects)
    pairs = Counter((o.colour, o.shape) for o in objs)
    taken = set(pairs) | set(banned)
    if kind in ("replace_object", "replace_attribute"):
        field_name, values = ("shape", SHAPES) if kind == "replace_object" else ("colour", COLOURS)
        options = [(i, dataclasses.replace(o, **{field_name: v})) for i, o in enumerate(objs) for v in values
                   if (o.colour if field_name == "shape" else v, v if field_name == "shape" else o.shape) not in taken]
        if not options:
            return None
        i, changed = options[int(rng.integers(len(options)))]
        objs[i] = changed
    elif kind == "swap_attributes":
        options = [(i, j) for i in range(len(objs)) for j in range(i + 1, len(objs))
                   if objs[i].colour != objs[j].colour and objs[i].shape != objs[j].shape
                   and ((objs[j].colour, objs[i].shape) not in pairs or (objs[i].colour, objs[j].shape) not in pairs)
                   and not {(objs[j].colour, objs[i].shape), (objs[i].colour, objs[j].shape)} & set(banned)]
        if not options:
            return None
        i, j = options[int(rng.integers(len(options)))]
        objs[i], objs[j] = (dataclasses.replace(objs[i], colour=objs[j].colour), dataclasses.replace(objs[j], colour=objs[i].colour))
    elif kind == "swap_objects":
        unique = [i for i, o in enumerate(objs) if pairs[(o.colour, o.shape)] == 1]
        options = [(i, j) for a, i in enumerate(unique) for j in unique[a + 1:]]
        if not options:
            return None
        i, j = options[int(rng.integers(len(options)))]
        objs[i], objs[j] = (dataclasses.replace(objs[i], row=objs[j].row, col=objs[j].col),
                            dataclasses.replace(objs[j], row=objs[i].row, col=objs[i].col))
    else:
        raise UserError(f"unknown hard-negative kind {kind!r}; the kinds are {', '.join(NEGATIVE_KINDS)}")
    return Scene(tuple(objs), scene.background)


def captions_with_negatives(scene: Scene, rng: np.random.Generator, n: int, negative_rng: np.random.Generator,
                            kinds: Sequence[str] = NEGATIVE_KINDS, banned: frozenset = frozenset()
                            ) -> tuple[list[str], list[dict[str, str]]]:
    """:func:`captions` (the same texts from the same ``rng``) and, per caption, one hard negative per
    kind that applies: the caption the same template draws (same random choices) for the
    :func:`perturb`-ed scene, kept only when it differs from the caption. Exact by construction:
    each negative is false of ``scene``. ``negative_rng`` picks the perturbations; ``banned`` pairs
    never appear in a negative."""
    builder = _CaptionBuilder(scene, rng)
    out: list[str] = []
    negatives: list[dict[str, str]] = []
    for _ in range(500 * max(n, 1)):
        if len(out) == n:
            break
        state = rng.bit_generator.state
        text = builder.caption()
        if text in out:
            continue
        out.append(text)
        found: dict[str, str] = {}
        for kind in kinds:
            if kind == "swap_objects" and (builder.form not in _PLACED_FORMS
                                             or (builder.form == "relational" and len(scene.objects) != 2)):
                continue
            for _attempt in range(3):
                other = perturb(scene, kind, negative_rng, banned)
                if other is None:
                    break
                replay = np.random.Generator(type(rng.bit_generator)())
                replay.bit_generator.state = state
                negative = _CaptionBuilder(other, replay).caption()
                if negative != text:
                    found[kind] = negative
                    break
        negatives.append(found)
    if len(out) != n:
        raise RuntimeError(f"could only draw {len(out)} distinct captions out of {n} for scene {scene.signature}")
    return out, negatives


# --------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------


def _annotate(rng: np.random.Generator, canonical: str, variants: Sequence[str], confusions: Sequence[str],
              variant_p: float) -> tuple[list[str], list[str], str]:
    """Ten annotator answers (+ confidences) and the multiple-choice (most frequent) answer."""
    answers, confidences = [], []
    for _ in range(10):
        if confusions and rng.random() < _DISAGREE_P:
            answers.append(_pick(rng, confusions))
            confidences.append("maybe" if rng.random() < 0.7 else "yes")
            continue
        answer = _pick(rng, variants) if variants and rng.random() < variant_p else canonical
        answers.append(answer)
        confidences.append("yes" if rng.random() < 0.9 else "maybe")
    counts = Counter(answers)
    top = max(counts.values())
    best = canonical if counts[canonical] == top else next(a for a in answers if counts[a] == top)
    return answers, confidences, best


def _question(rng: np.random.Generator, text: str, qtype: str, atype: str, canonical: str,
              variants: Sequence[str] = (), confusions: Sequence[str] = (), variant_p: float = 0.0) -> dict:
    answers, confidences, best = _annotate(rng, canonical, variants, confusions, variant_p)
    return {
        "question": text,
        "answers": answers,
        "answer_confidences": confidences,
        "answer_type": atype,
        "question_type": qtype,
        "multiple_choice_answer": best,
    }


def _number_question(rng: np.random.Generator, text: str, n: int) -> dict:
    variants = [_NUM_WORDS[n]] + (["none"] if n == 0 else [])
    confusions = [str(m) for m in (n - 1, n + 1) if m >= 0]
    return _question(rng, text, "how many", "number", str(n), variants, confusions, variant_p=0.25)


def _neighbours(cell: tuple[str, str]) -> list[str]:
    r, c = ROWS.index(cell[0]), COLS.index(cell[1])
    out = []
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        if 0 <= r + dr < 3 and 0 <= c + dc < 3:
            out.append(_POS_ANSWERS[(ROWS[r + dr], COLS[c + dc])][0])
    return out


class _QuestionBuilder:
    """Draws VQA questions of a scene, one kind at a time."""

    def __init__(self, scene: Scene, rng: np.random.Generator):
        self.scene, self.rng = scene, rng
        objs = scene.objects
        self.shape_counts = Counter(o.shape for o in objs)
        self.colour_counts = Counter(o.colour for o in objs)
        self.pair_counts = Counter((o.colour, o.shape) for o in objs)
        self.unique_shape = [o for o in objs if self.shape_counts[o.shape] == 1]
        self.unique_colour = [o for o in objs if self.colour_counts[o.colour] == 1]
        self.unique_pair = [o for o in objs if self.pair_counts[(o.colour, o.shape)] == 1]

    def available(self) -> dict[str, Any]:
        kinds: dict[str, Any] = {"count": self.count, "yes/no": self.yes_no}
        if self.unique_shape:
            kinds["colour"] = self.colour
        if self.unique_colour:
            kinds["shape"] = self.shape
        if self.unique_pair or self.unique_shape:
            kinds["position"] = self.position
        return kinds

    def colour(self) -> dict:
        obj = _pick(self.rng, self.unique_shape)
        template, qtype = _pick(self.rng, _Q_COLOUR)
        return _question(self.rng, template.format(s=obj.shape), qtype, "other", obj.colour,
                         [f"{obj.colour} one"], _COLOUR_CONFUSIONS[obj.colour], variant_p=0.15)

    def shape(self) -> dict:
        obj = _pick(self.rng, self.unique_colour)
        template, qtype = _pick(self.rng, _Q_SHAPE)
        return _question(self.rng, template.format(c=obj.colour), qtype, "other", obj.shape,
                         [f"a {obj.shape}", f"{obj.shape} shape"], _SHAPE_CONFUSIONS[obj.shape], variant_p=0.2)

    def count(self) -> dict:
        rng, objs = self.rng, self.scene.objects
        kind = _pick(rng, ("all", "shape", "shape", "colour", "pair"))
        present = rng.random() < 0.75
        if kind == "all":
            return _number_question(rng, _pick(rng, _Q_COUNT_ALL), len(objs))
        if kind == "shape":
            shape = _pick(rng, objs).shape if present else _pick(rng, SHAPES)
            return _number_question(rng, _Q_COUNT_SHAPE.format(p=_PLURALS[shape]), self.shape_counts[shape])
        if kind == "colour":
            colour = _pick(rng, objs).colour if present else _pick(rng, COLOURS)
            return _number_question(rng, _Q_COUNT_COLOUR.format(c=colour), self.colour_counts[colour])
        obj = _pick(rng, objs)
        pair = (obj.colour, obj.shape) if present else (obj.colour, _pick(rng, SHAPES))
        text = _Q_COUNT_PAIR.format(c=pair[0], p=_PLURALS[pair[1]])
        return _number_question(rng, text, self.pair_counts[pair])

    def yes_no(self) -> dict:
        rng, objs = self.rng, self.scene.objects
        yes = bool(rng.random() < 0.5)
        kind = _pick(rng, ("pair", "pair", "pair", "any", "size"))
        if kind == "size" and self.unique_pair:
            obj = _pick(rng, self.unique_pair)
            size = obj.size if yes else _pick(rng, [s for s in SIZES if s != obj.size])
            text, qtype = _Q_IS_SIZE.format(c=obj.colour, s=obj.shape, z=size), "is the"
        elif kind == "any" and (yes or len(self.shape_counts) < len(SHAPES)):
            shape = _pick(rng, objs).shape if yes else _pick(rng, [s for s in SHAPES if s not in self.shape_counts])
            text, qtype = _Q_ANY.format(p=_PLURALS[shape]), "are there any"
        else:
            if yes:
                obj = _pick(rng, objs)
                colour, shape = obj.colour, obj.shape
            else:  # a near miss: same shape in another colour, or same colour in another shape
                obj = _pick(rng, objs)
                misses = [(c, obj.shape) for c in COLOURS] + [(obj.colour, s) for s in SHAPES]
                misses = [p for p in misses if p not in self.pair_counts]
                colour, shape = _pick(rng, misses) if misses else _pick(
                    rng, [p for p in _ALL_PAIRS if p not in self.pair_counts])
            text, qtype = _Q_THERE_IS.format(a=_a(colour), c=colour, s=shape), "is there a"
        canonical = "yes" if yes else "no"
        return _question(rng, text, qtype, "yes/no", canonical, (), ("no" if yes else "yes",))

    def position(self) -> dict:
        rng = self.rng
        if self.unique_pair and (not self.unique_shape or rng.random() < 0.6):
            obj = _pick(rng, self.unique_pair)
            text = _Q_WHERE_PAIR.format(c=obj.colour, s=obj.shape)
        else:
            obj = _pick(rng, self.unique_shape)
            text = _Q_WHERE_SHAPE.format(s=obj.shape)
        answers = _POS_ANSWERS[obj.cell]
        return _question(rng, text, "where is the", "other", answers[0], answers[1:], _neighbours(obj.cell),
                         variant_p=0.35)


_QUESTION_WEIGHTS = {"count": 0.25, "yes/no": 0.35, "colour": 0.15, "shape": 0.1, "position": 0.15}


def questions(scene: Scene, rng: np.random.Generator, min_questions: int = 5, max_questions: int = 8) -> list[dict]:
    """VQAv2-style questions about a scene (between ``min_questions`` and ``max_questions``).

    Every available kind (colour, shape, count, yes/no, position) is asked once first, then
    more are drawn at random; question texts are distinct. Each question is a dict with
    ``question``, ``answers`` (10 annotator answers), ``answer_confidences`` (10 x
    "yes"/"maybe"), ``answer_type`` ("yes/no", "number", "other"), ``question_type`` (its
    VQAv2 prefix, e.g. "how many") and ``multiple_choice_answer`` (the most frequent answer).
    Colour questions are asked only about shapes appearing once, shape questions only about
    colours appearing once, and position questions only about unique objects.
    """
    builder = _QuestionBuilder(scene, rng)
    kinds = builder.available()
    names = list(kinds)
    first = [names[i] for i in rng.permutation(len(names))]
    weights = np.asarray([_QUESTION_WEIGHTS[k] for k in names])
    n = int(rng.integers(min_questions, max_questions + 1))
    out: list[dict] = []
    seen: set[str] = set()
    for _ in range(50 * n):
        if len(out) == n:
            break
        kind = first.pop(0) if first else names[int(rng.choice(len(names), p=weights / weights.sum()))]
        q = kinds[kind]()
        if q["question"] not in seen:
            seen.add(q["question"])
            out.append(q)
    return out


# --------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------


def _vocab_sources() -> list[str]:
    """Every string from which caption, question and answer text is assembled."""
    texts: list[str] = [*SHAPES, *_PLURALS.values(), *COLOURS, *SIZES, *ROWS, *COLS, *_NUM_WORDS,
                        *(str(i) for i in range(11)), *CLASSNAMES, *TEMPLATES, "a an the one none yes no",
                        "a single", "there is are", ", and . ? : ;", *_LIST_PREFIXES, *_THERE_SUFFIXES,
                        *_COUNT_NOUNS, *_POS_FIRST_FORMS, *_REST_FORMS]
    for words in _SIZE_WORDS.values():
        texts += words
    for table in (_POS_PHRASES, _POS_ANSWERS, _RELATIONS, _COLOUR_CONFUSIONS, _SHAPE_CONFUSIONS):
        for values in table.values():
            texts += values
    texts += [t for t, _ in (*_Q_COLOUR, *_Q_SHAPE)] + [q for _, q in (*_Q_COLOUR, *_Q_SHAPE)]
    texts += [*_Q_COUNT_ALL, _Q_COUNT_SHAPE, _Q_COUNT_COLOUR, _Q_COUNT_PAIR, _Q_THERE_IS, _Q_ANY, _Q_IS_SIZE,
              _Q_WHERE_PAIR, _Q_WHERE_SHAPE, "how many", "is there a", "are there any", "is the", "where is the",
              "one shape", "a an"]
    return texts


def vocabulary() -> list[str]:
    """Every token that can occur in a caption, question, answer, class name or template.

    Lowercase, sorted and deduplicated, tokenised like the default word-level tokenizer
    (``re.findall(r"\\w+|[^\\w\\s]", text.lower())``), so punctuation such as "." "?" ","
    are tokens of their own. Template placeholders ("{}", "{pos}", ...) are not tokens.
    """
    tokens: set[str] = set()
    for text in _vocab_sources():
        tokens.update(tokenize(re.sub(r"\{\w*\}", " ", text)))
    return sorted(tokens)


# --------------------------------------------------------------------------------------
# Samples and shards
# --------------------------------------------------------------------------------------

_SPLIT_INDEX = {s: i for i, s in enumerate(SPLITS)}
_IMAGE_ID_OFFSET = {"train": 1, "val": 1_000_000, "test": 2_000_000}
_MANIFEST = "manifest.json"
_MARKER = ".lit-vlm-synth-incomplete"
_MAX_SCENE_TRIES = 100_000


def _streams(seed: int, split: str, index: int) -> list[np.random.Generator]:
    """Independent generators (scene, render, captions, questions, hard negatives, instructions) of
    one sample (a child's stream depends only on its index, so adding one leaves the others as they were)."""
    children = np.random.SeedSequence([seed, _SPLIT_INDEX[split], index]).spawn(6)
    return [np.random.default_rng(c) for c in children]


def _image_id(split: str, index: int) -> int:
    return _IMAGE_ID_OFFSET[split] + index


def _key(split: str, index: int) -> str:
    return f"{split}_{index:07d}"


def _draw_unique_scene(rng: np.random.Generator, config: SynthConfig, allow_holdout: bool,
                       taken: set | frozenset, where: str) -> Scene:
    """Draw scenes from ``rng`` until one's signature is not in ``taken``."""
    for _ in range(_MAX_SCENE_TRIES):
        scene = make_scene(rng, config, allow_holdout)
        if scene.signature not in taken:
            return scene
    raise RuntimeError(f"could not draw a new scene signature for {where} after {_MAX_SCENE_TRIES} tries")


def _plan_eval_scenes(config: SynthConfig) -> dict[str, list[Scene]]:
    """Eval scenes, drawn in index order, resampled until unique by signature within the split."""
    plans: dict[str, list[Scene]] = {}
    for split in ("val", "test"):
        taken: set = set()
        scenes = []
        for index in range(getattr(config, f"num_{split}")):
            scene = _draw_unique_scene(_streams(config.seed, split, index)[0], config, True, taken,
                                       f"{split}[{index}]")
            taken.add(scene.signature)
            scenes.append(scene)
        plans[split] = scenes
    return plans


def _build_sample(config: SynthConfig, split: str, index: int, scene: Scene | None,
                  exclude: frozenset) -> tuple[dict[str, bytes], dict]:
    """Encode one sample: its tar members (by extension) and its JSON record."""
    from lit_vlm.datamodules.instructions import caption_pair, conversation

    scene_rng, render_rng, caption_rng, question_rng, negative_rng, chat_rng = _streams(config.seed, split, index)
    banned: frozenset = frozenset()
    if scene is None:  # train: drawn here, without holdout pairs and (optionally) eval signatures
        scene = _draw_unique_scene(scene_rng, config, False, exclude, f"{split}[{index}]")
        banned = frozenset(_holdout_pairs(config.holdout))
    image = render(scene, config.image_size, render_rng)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=config.jpeg_quality)
    caps, negatives = captions_with_negatives(scene, caption_rng, config.num_captions, negative_rng, banned=banned)
    image_id = _image_id(split, index)
    qs = []
    for j, q in enumerate(questions(scene, question_rng, config.min_questions, config.max_questions)):
        qs.append({"question_id": image_id * 10 + j, "question": q["question"], "answers": q["answers"],
                   "answer_type": q["answer_type"], "question_type": q["question_type"],
                   "multiple_choice_answer": q["multiple_choice_answer"],
                   "answer_confidences": q["answer_confidences"]})
    key = _key(split, index)
    record = {
        "key": key,
        "image_id": image_id,
        "split": split,
        "width": config.image_size,
        "height": config.image_size,
        "caption": caps[0],
        "captions": caps,
        "negatives": negatives,
        "label": scene.label,
        "classname": scene.classname,
        "objects": [o.to_json() for o in scene.objects],
        "background": scene.background.name,
        "questions": qs,
        "conversations": conversation(scene, chat_rng, qs),
        "pretrain_conversations": caption_pair(caps[0], chat_rng),
    }
    members = {
        "jpg": buf.getvalue(),
        "txt": caps[0].encode("utf-8"),
        "json": json.dumps(record, ensure_ascii=False).encode("utf-8"),
    }
    return members, record


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    tar.addfile(info, io.BytesIO(data))


# Per-process worker state (set by _init_worker; also used in-process when num_workers <= 1).
_WORKER: dict[str, Any] = {}


def _init_worker(config_dict: dict, out_dir: str, exclude: frozenset) -> None:
    _WORKER.update(config=SynthConfig.from_dict(config_dict), out_dir=out_dir, exclude=exclude)


def _write_shard(task: tuple[str, int, int, int, list[Scene] | None]) -> tuple[str, int, list[dict]]:
    """Write one shard (temp name, then rename); return eval records for the annotation files."""
    split, shard_idx, start, stop, scenes = task
    config: SynthConfig = _WORKER["config"]
    split_dir = Path(_WORKER["out_dir"]) / split
    records: list[dict] = []
    fd, tmp = tempfile.mkstemp(prefix=f".shard-{shard_idx:06d}-", suffix=".tmp", dir=split_dir)
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(start, stop):
                scene = scenes[index - start] if scenes is not None else None
                members, record = _build_sample(config, split, index, scene, _WORKER["exclude"])
                key = record["key"]
                for ext in ("jpg", "txt", "json"):
                    _add_member(tar, f"{key}.{ext}", members[ext])
                if split != "train":
                    records.append(record)
        os.chmod(tmp, 0o644)
        os.replace(tmp, split_dir / f"shard-{shard_idx:06d}.tar")
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return split, shard_idx, records


# --------------------------------------------------------------------------------------
# Annotation files
# --------------------------------------------------------------------------------------

_INFO = {
    "description": "lit-vlm synthetic world",
    "version": str(VERSION),
    "year": 2025,
    "contributor": "lit-vlm synth generator",
    "url": "",
    "date_created": "2025-01-01",
}
_LICENSE = {"name": "synthetic data, no restrictions", "url": ""}


def _coco_captions(split: str, records: list[dict]) -> dict:
    images = [{"id": r["image_id"], "file_name": f"{r['key']}.jpg", "width": r["width"], "height": r["height"]}
              for r in records]
    annotations = [{"id": r["image_id"] * 100 + j, "image_id": r["image_id"], "caption": c}
                   for r in records for j, c in enumerate(r["captions"])]
    return {"info": {**_INFO, "description": f"lit-vlm synthetic world captions ({split})"}, "licenses": [],
            "images": images, "annotations": annotations}


def _compositional(split: str, records: list[dict], holdout: Iterable[str]) -> dict:
    """The compositional benchmark of a split: per image and negative kind, the first caption that
    has a negative of that kind, beside it (``heldout``: the scene has a held-out colour-shape pair)."""
    held = _holdout_pairs(holdout)
    items = []
    for r in records:
        heldout = any((o["colour"], o["shape"]) in held for o in r["objects"])
        for kind in NEGATIVE_KINDS:
            found = next(((c, n[kind]) for c, n in zip(r["captions"], r["negatives"]) if kind in n), None)
            if found:
                items.append({"id": len(items), "image_id": r["image_id"], "key": r["key"], "kind": kind,
                              "caption": found[0], "negative": found[1], "heldout": heldout})
    return {"info": {**_INFO, "description": f"lit-vlm synthetic world compositional benchmark ({split})"},
            "kinds": list(NEGATIVE_KINDS), "holdout": sorted(" ".join(p) for p in held), "items": items}


def vqa_files(split: str, records: list[dict]) -> tuple[dict, dict]:
    info = {**_INFO, "description": f"lit-vlm synthetic world VQA ({split})"}
    qs, anns = [], []
    for r in records:
        for q in r["questions"]:
            qs.append({"image_id": r["image_id"], "question": q["question"], "question_id": q["question_id"]})
            anns.append({
                "question_type": q["question_type"],
                "multiple_choice_answer": q["multiple_choice_answer"],
                "answers": [{"answer": a, "answer_confidence": c, "answer_id": i + 1}
                            for i, (a, c) in enumerate(zip(q["answers"], q["answer_confidences"]))],
                "image_id": r["image_id"],
                "answer_type": q["answer_type"],
                "question_id": q["question_id"],
            })
    questions_json = {"info": info, "task_type": "Open-Ended", "data_type": "synthetic", "data_subtype": split,
                      "license": _LICENSE, "questions": qs}
    annotations_json = {"info": info, "data_type": "synthetic", "data_subtype": split, "license": _LICENSE,
                        "annotations": anns}
    return questions_json, annotations_json


def _pope(split: str, records: list[dict], seed: int) -> dict:
    """POPE's three negative kinds over a split: per image, its objects (yes) and as many absent ones
    (no); ``question_id = image_id * 100 + j``."""
    from lit_vlm.datamodules.instructions import POPE_KINDS, pair_popularity, pope_questions

    popular = pair_popularity(records)
    items = []
    for r in records:
        rng = np.random.default_rng([seed, _SPLIT_INDEX[split], r["image_id"], 7])
        j = 0
        for kind in POPE_KINDS:
            for q in pope_questions(r["objects"], rng, kind, popular):
                items.append({"question_id": r["image_id"] * 100 + j, "image_id": r["image_id"], "key": r["key"],
                              "category": kind, **q})
                j += 1
    return {"info": {**_INFO, "description": f"lit-vlm synthetic world POPE ({split})"}, "kinds": list(POPE_KINDS),
            "questions": items}


def _write_json_atomic(path: Path, obj: Any, indent: int | None = None) -> None:
    """Atomic JSON write (compact unless ``indent``): see :func:`lit_vlm.io.write_json_atomic`."""
    write_json_atomic(path, obj, indent=indent)


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


def is_generated(out_dir: str | os.PathLike) -> bool:
    """True if ``out_dir/manifest.json`` exists and describes a complete lit-vlm-synth world."""
    return manifest_format(Path(out_dir) / _MANIFEST) == FORMAT


def load_manifest(out_dir: str | os.PathLike) -> dict:
    """Read ``out_dir/manifest.json``.

    Raises:
        FileNotFoundError: no manifest (the world was never generated, or generation was cut off).
        ValueError: the manifest is unreadable or not a lit-vlm-synth manifest of a known version.
    """
    path = Path(out_dir) / _MANIFEST
    if not path.is_file():
        raise MissingFileError(f"no synthetic-world manifest at {path}: generate the world first "
                                f"(lit-vlm data synth --out {out_dir})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise UserError(f"{path} has version {manifest.get('version')!r}; this code reads version {VERSION}")
    return manifest


def shard_paths(out_dir: str | os.PathLike, split: str) -> list[str]:
    """Absolute paths of a generated split's shards, in order."""
    manifest = load_manifest(out_dir)
    if split not in manifest["splits"]:
        raise UserError(f"unknown split {split!r}; have {sorted(manifest['splits'])}")
    return [str(Path(out_dir).resolve() / p) for p in manifest["splits"][split]["shards"]]


def _mp_context() -> mp.context.BaseContext:
    """"fork" on Linux (cheap, works from any __main__), "spawn" elsewhere."""
    if sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _is_ours(out: Path) -> bool:
    return is_generated(out) or (out / _MARKER).exists()


def generate(out_dir: str | os.PathLike, config: SynthConfig | None = None, num_workers: int | None = None,
             progress: bool = True) -> dict:
    """Write the synthetic world to ``out_dir`` and return its manifest.

    ``out_dir`` must be missing, empty, or a (possibly incomplete) earlier lit-vlm-synth
    output, which is regenerated in place (stale shards are removed). The manifest is
    removed first and written last, atomically, so a folder with a manifest is complete.

    Val and test scenes are unique by signature within their split (resampled on
    collision). When ``config.exclude_eval_from_train`` is set and cheap (eval signatures
    at most 10% of the possible train signatures), train scenes whose signature is a val
    or test signature are resampled too; val and test may share signatures.

    Args:
        out_dir: output folder.
        config: world configuration (defaults to ``SynthConfig()``).
        num_workers: worker processes ("fork" on Linux, "spawn" elsewhere); default
            ``min(2, cpu_count)``; ``<= 1`` generates in this process. The output does not
            depend on it.
        progress: print progress lines to stderr.

    Raises:
        ValueError: invalid configuration.
        UserError: ``out_dir`` is a file, or a non-empty folder that is not lit-vlm-synth output.
    """
    config = dataclasses.replace(config) if config is not None else SynthConfig()  # validate() normalises a copy
    config.holdout = list(config.holdout)
    config.validate()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is a file, not a folder: give a folder path for the synthetic world")
    if out.is_dir() and any(out.iterdir()) and not _is_ours(out):
        raise UserError(f"{out} is not empty and is not a {FORMAT} folder; refusing to write into it")
    if num_workers is None:
        num_workers = min(2, os.cpu_count() or 1)
    start_time = time.perf_counter()

    def log(msg: str) -> None:
        if progress:
            print(f"[synth] {msg}", file=sys.stderr, flush=True)

    out.mkdir(parents=True, exist_ok=True)
    (out / _MANIFEST).unlink(missing_ok=True)
    (out / _MARKER).write_text("generation in progress\n", encoding="utf-8")
    for split in SPLITS:
        (out / split).mkdir(exist_ok=True)

    plans = _plan_eval_scenes(config)
    eval_signatures = {s.signature for scenes in plans.values() for s in scenes}
    train_pairs = len(_ALL_PAIRS) - len(config.holdout)
    train_capacity = signature_capacity(config.min_objects, config.max_objects, train_pairs)
    excluded = config.exclude_eval_from_train and len(eval_signatures) <= 0.1 * train_capacity
    exclude = frozenset(eval_signatures) if excluded else frozenset()

    tasks: list[tuple[str, int, int, int, list[Scene] | None]] = []
    shards: dict[str, list[str]] = {s: [] for s in SPLITS}
    for split in SPLITS:
        n = getattr(config, f"num_{split}")
        for shard_idx, begin in enumerate(range(0, n, config.shard_size)):
            end = min(begin + config.shard_size, n)
            tasks.append((split, shard_idx, begin, end, plans[split][begin:end] if split in plans else None))
            shards[split].append(f"{split}/shard-{shard_idx:06d}.tar")
    log(f"writing {sum(len(v) for v in shards.values())} shards "
        f"({config.num_train}/{config.num_val}/{config.num_test} samples) to {out} with {num_workers} worker(s)")

    records: dict[str, dict[int, list[dict]]] = {"val": {}, "test": {}}
    workers = max(1, min(num_workers, len(tasks)))
    init_args = (config.to_dict(), str(out), exclude)
    done = 0

    def collect(result: tuple[str, int, list[dict]]) -> None:
        nonlocal done
        split, shard_idx, recs = result
        if split in records:
            records[split][shard_idx] = recs
        done += 1
        log(f"{done}/{len(tasks)} shards done ({split} shard {shard_idx}, {time.perf_counter() - start_time:.1f}s)")

    if workers <= 1:
        saved = dict(_WORKER)
        _init_worker(*init_args)
        try:
            for task in tasks:
                collect(_write_shard(task))
        finally:
            _WORKER.clear()
            _WORKER.update(saved)
    else:
        with ProcessPoolExecutor(workers, mp_context=_mp_context(), initializer=_init_worker,
                                 initargs=init_args) as pool:
            futures = [pool.submit(_write_shard, task) for task in tasks]
            for future in as_completed(futures):
                collect(future.result())

    annotations: dict[str, str] = {}
    for split in ("val", "test"):
        recs = [r for i in sorted(records[split]) for r in records[split][i]]
        q_json, a_json = vqa_files(split, recs)
        for name, obj in ((f"captions_{split}", _coco_captions(split, recs)),
                          (f"vqa_{split}_questions", q_json), (f"vqa_{split}_annotations", a_json),
                          (f"compositional_{split}", _compositional(split, recs, config.holdout)),
                          (f"pope_{split}", _pope(split, recs, config.seed))):
            annotations[name] = f"annotations/{name}.json"
            _write_json_atomic(out / annotations[name], obj)
    _write_json_atomic(out / "zeroshot.json", {"classnames": CLASSNAMES, "templates": TEMPLATES}, indent=2)

    for split in SPLITS:  # drop shards (and temp files) left over from an earlier, larger world
        keep = {Path(p).name for p in shards[split]}
        for path in (out / split).iterdir():
            if path.is_file() and (path.name.startswith(".shard-") or
                                   (path.name.startswith("shard-") and path.name not in keep)):
                path.unlink()

    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "splits": {s: {"shards": shards[s], "num_samples": getattr(config, f"num_{s}")} for s in SPLITS},
        "annotations": annotations,
        "zeroshot": "zeroshot.json",
        "classnames": CLASSNAMES,
        "templates": TEMPLATES,
        "eval_scenes_excluded_from_train": excluded,
    }
    _write_json_atomic(out / _MANIFEST, manifest, indent=2)
    (out / _MARKER).unlink(missing_ok=True)
    log(f"done in {time.perf_counter() - start_time:.1f}s")
    return manifest


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-vlm data synth",
        description="Generate the synthetic multimodal world (webdataset shards + COCO/VQAv2 annotations).",
    )
    parser.add_argument("--out", required=True, help="output folder")
    defaults = SynthConfig()
    for f in dataclasses.fields(SynthConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=f"(default: {default})")
        elif isinstance(default, list):
            parser.add_argument(flag, dest=f.name, nargs="*", default=list(default), metavar="'COLOUR SHAPE'",
                                help="colour-shape combinations never drawn in train, e.g. --holdout 'red star'")
        else:
            parser.add_argument(flag, dest=f.name, type=type(default), default=default, help=f"(default: {default})")
    parser.add_argument("--num-workers", type=int, default=None, help="worker processes (default: min(2, cpus))")
    parser.add_argument("--overwrite", action="store_true", help="regenerate over an existing synthetic world")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    """``lit-vlm data synth``: generate the world from command-line flags; return an exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    config = SynthConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig)})
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not _is_ours(out):
            print(f"error: {out} exists, is not empty and is not a synthetic world; refusing to overwrite it",
                  file=sys.stderr)
            return 1
        if not args.overwrite:
            print(f"error: {out} already holds a synthetic world; pass --overwrite to regenerate it",
                  file=sys.stderr)
            return 1
    try:
        start = time.perf_counter()
        manifest = generate(out, config, num_workers=args.num_workers, progress=not args.quiet)
        elapsed = time.perf_counter() - start
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    splits = manifest["splits"]
    print(f"synthetic world written to {out} in {elapsed:.1f}s ({_folder_size(out) / 2**20:.1f} MiB)")
    for split in SPLITS:
        print(f"  {split:5s}: {splits[split]['num_samples']:6d} samples in {len(splits[split]['shards'])} shards "
              f"({out / split})")
    for name, rel in manifest["annotations"].items():
        print(f"  {name}: {out / rel}")
    print(f"  zeroshot: {out / manifest['zeroshot']}")
    print(f"  manifest: {out / _MANIFEST}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
