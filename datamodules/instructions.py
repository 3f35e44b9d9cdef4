"""Instruction data and object-hallucination questions of the synthetic world, in the formats real
corpora use: LLaVA's conversations and POPE's yes/no questions.

- :func:`conversation`: a multi-turn LLaVA conversation about a scene (``[{"from": "human" |
  "gpt", "value": ...}]``, ``<image>`` in the first human turn): long-form turns (describe, count,
  locate, compare sizes, yes/no about a present or absent object, a short reasoning step) and the
  scene's VQA questions with LLaVA-1.5's short-answer suffix, answered by their most frequent
  annotator answer, as LLaVA-1.5's VQAv2 mixture does; the turns in random order.
- :func:`caption_pair`: LCS-558K-style stage-1 data: a brief-description instruction and a caption.
- :func:`pope_questions`: POPE (Li et al., 2023): "Is there a {colour} {shape} in the image?" for
  the scene's objects (yes) and as many absent ones (no), drawn ``random`` (any absent colour-shape
  pair), ``popular`` (the split's most frequent pairs) or ``adversarial``. POPE's adversarial
  objects co-occur most with the present ones; this world draws objects independently, so its
  hardest absent object is a near miss: the colour or the shape of a present object, not both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from lit_vlm.datamodules.synth import (
    _ALL_PAIRS,
    _NUM_WORDS,
    _PLURALS,
    _POS_PHRASES,
    SHAPES,
    Scene,
    SceneObject,
    _a,
    _pick,
)

#: LLaVA-1.5's suffix for short-answer VQA (its VQAv2 / GQA training mixture and evaluation).
SHORT_ANSWER = "Answer the question using a single word or phrase."
#: LLaVA-1.5's multiple-choice suffix (ScienceQA, MMBench): the options are listed before it.
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."
#: LLaVA-1.5's suffix for multiple-choice questions (ScienceQA, MMBench): the options follow the
#: question as "A. ...", one per line.
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."
#: Stage-1 instructions, in the spirit of LLaVA's brief-description list.
BRIEF_PROMPTS: tuple[str, ...] = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Give a short and clear explanation of the image.",
    "Summarize the visual content of the image.",
    "Write a terse but informative summary of the picture.",
    "Share a concise interpretation of the image provided.",
)
#: Questions asking for a full description (long-form turns).
DETAIL_PROMPTS: tuple[str, ...] = (
    "Describe the image in detail.",
    "What do you see in this picture?",
    "Can you describe every object in the image?",
)
POPE_KINDS: tuple[str, ...] = ("random", "popular", "adversarial")
POPE_QUESTION = "Is there {a} {c} {s} in the image?"

Turn = dict[str, str]


def _name(obj: SceneObject, size: bool = False) -> str:
    return f"{obj.size} {obj.colour} {obj.shape}" if size else f"{obj.colour} {obj.shape}"


def _count_sentence(n: int, shape: str) -> str:
    if n == 0:
        return f"There are no {_PLURALS[shape]} in the image."
    if n == 1:
        return f"There is one {shape}."
    return f"There are {_NUM_WORDS[n]} {_PLURALS[shape]}."


class _Turns:
    """Long-form question-answer turns about one scene, one kind per method."""

    def __init__(self, scene: Scene, rng: np.random.Generator) -> None:
        self.scene, self.rng = scene, rng
        self.pairs = Counter((o.colour, o.shape) for o in scene.objects)
        self.unique = [o for o in scene.objects if self.pairs[(o.colour, o.shape)] == 1]

    def describe(self) -> tuple[str, str]:
        objs = sorted(self.scene.objects, key=lambda o: (("top", "middle", "bottom").index(o.row), o.col))
        n = len(objs)
        head = "The image shows one object." if n == 1 else f"The image shows {_NUM_WORDS[n]} objects."
        body = " ".join(f"{_a(o.size).capitalize()} {_name(o, True)} is {_POS_PHRASES[o.cell][0]}." for o in objs)
        return _pick(self.rng, DETAIL_PROMPTS), f"{head} {body}"

    def count(self) -> tuple[str, str]:
        shapes = Counter(o.shape for o in self.scene.objects)
        shape = _pick(self.rng, list(shapes)) if self.rng.random() < 0.7 else _pick(self.rng, SHAPES)
        return f"How many {_PLURALS[shape]} are in the image?", _count_sentence(shapes[shape], shape)

    def locate(self) -> tuple[str, str] | None:
        if not self.unique:
            return None
        obj = _pick(self.rng, self.unique)
        return f"Where is the {_name(obj)}?", f"The {_name(obj)} is {_POS_PHRASES[obj.cell][0]}."

    def compare(self) -> tuple[str, str] | None:
        if len(self.unique) < 2:
            return None
        i, j = self.rng.permutation(len(self.unique))[:2]
        a, b = self.unique[int(i)], self.unique[int(j)]
        question = f"Which is bigger, the {_name(a)} or the {_name(b)}?"
        if a.size == b.size:
            return question, f"They are the same size: both are {a.size}."
        big = a if a.size == "large" else b
        return question, f"The {_name(big)} is bigger."

    def present(self) -> tuple[str, str]:
        if self.rng.random() < 0.5:
            obj = _pick(self.rng, self.scene.objects)
            return (f"Is there {_a(obj.colour)} {_name(obj)} in the image?",
                    f"Yes, there is {_a(obj.colour)} {_name(obj)} {_POS_PHRASES[obj.cell][0]}.")
        colour, shape = _pick(self.rng, [p for p in _ALL_PAIRS if p not in self.pairs])
        return f"Is there {_a(colour)} {colour} {shape} in the image?", f"No, there is no {colour} {shape} in the image."

    def reason(self) -> tuple[str, str]:
        n = len(self.scene.objects)
        obj = _pick(self.rng, self.scene.objects)
        left = n - 1
        rest = "nothing would be left" if left == 0 else f"{_NUM_WORDS[left]} would be left"
        objects = "object" if n == 1 else "objects"
        return (f"If the {_name(obj)} were removed, how many objects would be left?",
                f"There {'is' if n == 1 else 'are'} {_NUM_WORDS[n]} {objects} now, so {rest}.")


def vqa_prompt(question: str, suffix: str = SHORT_ANSWER) -> str:
    """A VQA question as LLaVA-1.5 asks it: the question, then the answer-format ``suffix`` on its
    own line (the VQA callback's ``prompt: short_answer`` asks the same)."""
    return f"{question.strip()}\n{suffix}" if suffix else question.strip()


def conversation(scene: Scene, rng: np.random.Generator, vqa: Sequence[dict] = (), long_turns: tuple[int, int] = (2, 4)) -> list[Turn]:
    """A LLaVA conversation about ``scene``: ``long_turns`` (min, max) long-form turns of distinct
    kinds and every question of ``vqa`` (the scene's VQA questions) with :data:`SHORT_ANSWER`,
    answered by its ``multiple_choice_answer``, in random order (so that a short-answer question
    is also asked first, beside the image, as LLaVA-1.5's VQA data and VQA evaluation ask it).
    ``<image>`` opens or closes the first human turn."""
    turns = _Turns(scene, rng)
    kinds = [turns.describe, turns.count, turns.locate, turns.compare, turns.present, turns.reason]
    order = [kinds[int(i)] for i in rng.permutation(len(kinds))]
    n = int(rng.integers(long_turns[0], long_turns[1] + 1))
    pairs: list[tuple[str, str]] = []
    for make in order:
        if len(pairs) == n:
            break
        pair = make()
        if pair is not None:
            pairs.append(pair)
    pairs += [(vqa_prompt(q["question"]), q["multiple_choice_answer"]) for q in vqa]
    pairs = [pairs[int(i)] for i in rng.permutation(len(pairs))]  # any kind may come first, with the image
    out: list[Turn] = []
    for k, (question, answer) in enumerate(pairs):
        if k == 0:
            question = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"
        out += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return out


def caption_pair(caption: str, rng: np.random.Generator) -> list[Turn]:
    """A stage-1 pair: a brief-description instruction with ``<image>``, answered by ``caption``."""
    prompt = _pick(rng, BRIEF_PROMPTS)
    prompt = f"<image>\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n<image>"
    text = caption[0].upper() + caption[1:]
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": text}]


def pair_popularity(records: Sequence[dict]) -> list[tuple[str, str]]:
    """Colour-shape pairs of a split, most frequent first (ties in a fixed order): POPE's ``popular``."""
    counts = Counter((o["colour"], o["shape"]) for r in records for o in r["objects"])
    return sorted(_ALL_PAIRS, key=lambda p: (-counts[p], _ALL_PAIRS.index(p)))


def pope_questions(objects: Sequence[dict], rng: np.random.Generator, kind: str, popular: Sequence[tuple[str, str]],
                   per_image: int = 3) -> list[dict]:
    """POPE questions of one image: up to ``per_image`` present pairs (label ``yes``) and as many
    absent pairs of ``kind`` (label ``no``); each ``{"question", "label", "object"}``."""
    if kind not in POPE_KINDS:
        raise ValueError(f"POPE kind must be one of {POPE_KINDS}, got {kind!r}")
    present = list(dict.fromkeys((o["colour"], o["shape"]) for o in objects))
    yes = [present[int(i)] for i in rng.permutation(len(present))[:per_image]]
    absent = [p for p in _ALL_PAIRS if p not in present]
    if kind == "random":
        no = [absent[int(i)] for i in rng.permutation(len(absent))[: len(yes)]]
    elif kind == "popular":
        no = [p for p in popular if p not in present][: len(yes)]
    else:  # near misses first (shares the colour or the shape of a present object), in random order
        near = [p for p in absent if any(p[0] == c or p[1] == s for c, s in present)]
        no = [near[int(i)] for i in rng.permutation(len(near))[: len(yes)]]
    out = []
    for (colour, shape), label in [(p, "yes") for p in yes] + [(p, "no") for p in no]:
        out.append({"question": POPE_QUESTION.format(a=_a(colour), c=colour, s=shape), "label": label,
                    "object": f"{colour} {shape}"})
    return out


__all__ = [
    "BRIEF_PROMPTS", "DETAIL_PROMPTS", "MULTIPLE_CHOICE", "POPE_KINDS", "POPE_QUESTION", "SHORT_ANSWER",
    "caption_pair", "conversation", "pair_popularity", "pope_questions", "vqa_prompt",
]
