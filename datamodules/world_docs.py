"""The synthetic world's interleaved documents, written in MMC4's converted layout.

A document is a page of several scenes in a row, each image followed by text about it. A page
has a kind and a style, both drawn once per page, so that what a page's next text looks like is
learnt from the page itself (in context), as on the web:

* ``captions``: every image is captioned in one caption form of the world (a listing, counts,
  positions, relations, ...) after one label (``Output:``, ``Caption:``, ...; or none), briefly
  (one sentence) or in detail (a second sentence on the background);
* ``questions``: one or two questions per image with their answers, in one question-answer
  format (``Question: ... Short answer: ...``, ``Q: ... A: ...``, ...), answered in a word or
  phrase or in a sentence (``there are 2.``, ``it is red.``) whatever the format's words say;
* ``labels``: every image labelled with the shape of its largest object (the world's class
  label), after one label word, like a gallery of classified photos;
* ``story``: a scene described, then what changed in each next scene (an object appeared, left,
  moved or changed colour) and how many of a shape have been seen so far.

Each next scene is the previous one changed in one thing (``change_prob``) or a new scene. The
JSON is MMC4's as OpenFlamingo's WebDataset conversion writes it: ``text_list``, ``image_info``
(``image_name``, ``matched_text_index``, ``matched_sim``, ``image_base64``) and
``similarity_matrix``. The similarities are made up, on CLIP's cosine scale: an image's own
sentence 0.27-0.37, another sentence about the same scene 0.18-0.26, any other 0.02-0.20; with
``weak_image_prob`` an image's own similarity is 0.12-0.23, below the 0.24 threshold, so a reader
drops it (as MMC4 readers drop many images). Scenes come from the world's generator with a seed
of their own, so no page shows a scene of the image world.

``lit-vlm data docs --out data/world-docs`` writes them; an :class:`InterleavedDataModule` whose
``root`` is missing writes them there.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lit_vlm.datamodules import synth
from lit_vlm.datamodules.writer_cli import SPLITS, finish, is_written, write_splits, writer_main
from lit_vlm.errors import UserError

FORMAT = "lit-vlm-world-docs"
VERSION = 2  # 2: detailed pages (captions with a background sentence, answers in sentences); labels pages
_SPLIT_SEED = {"train": 101, "val": 102, "test": 103}
PAGE_KINDS: dict[str, float] = {"captions": 0.35, "questions": 0.35, "labels": 0.1, "story": 0.2}
CAPTION_LABELS: tuple[str, ...] = ("Output:", "Caption:", "Description:", "Image:", "")
CAPTION_FORMS: tuple[str, ...] = ("listing", "there_is", "counted", "grouped", "positional", "position_first", "relational")
QA_FORMATS: tuple[tuple[str, str], ...] = (("Question:", "Short answer:"), ("Q:", "A:"), ("Question:", "Answer:"))
TITLES: dict[str, tuple[str, ...]] = {
    "captions": ("pictures of shapes.", "a page of drawings.", "my shape collection."),
    "questions": ("a quiz about shapes.", "questions and answers.", "test yourself."),
    "labels": ("shapes, labelled.", "name the biggest shape.", "a gallery of shapes."),
    "story": ("a story of shapes.", "what happened next.", "watch the shapes change."),
}


@dataclass
class DocsConfig:
    """How the documents are drawn (stored in ``manifest.json``).

    Attributes:
        seed: Master seed; the same config gives byte-identical shards.
        num_train: Training documents.
        num_val: Validation documents.
        num_test: Test documents.
        min_scenes: Fewest scenes (images) per page.
        max_scenes: Most scenes per page.
        change_prob: Probability that a next scene is the previous one with one change.
        weak_image_prob: Probability that an image's similarity to its sentence is below 0.24.
        title_prob: Probability that a page starts with a title (text before any image).
        detailed_prob: Probability that a page's captions have a second sentence and its answers
            are sentences.
        image_size: Side of the square JPEG images.
        shard_size: Documents per shard.
    """

    seed: int = 0
    num_train: int = 20000
    num_val: int = 300
    num_test: int = 300
    min_scenes: int = 3
    max_scenes: int = 6
    change_prob: float = 0.6
    weak_image_prob: float = 0.05
    title_prob: float = 0.5
    detailed_prob: float = 0.5
    image_size: int = 64
    shard_size: int = 1000

    def check(self) -> None:
        if not 1 <= self.min_scenes <= self.max_scenes <= 12:
            raise UserError(f"DocsConfig: need 1 <= min_scenes <= max_scenes <= 12, got {self.min_scenes}, {self.max_scenes}")
        for name in ("change_prob", "weak_image_prob", "title_prob", "detailed_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"DocsConfig: {name} must be in [0, 1], got {getattr(self, name)}")
        if min(self.num_train, self.num_val, self.num_test) < 0 or self.shard_size < 1 or not 32 <= self.image_size <= 512:
            raise UserError(f"DocsConfig: invalid sizes {dataclasses.asdict(self)}")


# ---- scenes in a row ---------------------------------------------------------------------------
def _phrase(obj: synth.SceneObject) -> str:
    return f"{obj.colour} {obj.shape}"


def change_scene(scene: synth.Scene, rng: np.random.Generator) -> tuple[synth.Scene, str] | None:
    """``scene`` with one thing changed, and the sentence that says what changed (None: no change fits)."""
    objs = list(scene.objects)
    free = [(r, c) for r in synth.ROWS for c in synth.COLS if (r, c) not in {o.cell for o in objs}]
    small = [i for i, o in enumerate(objs) if o.size == "small"]
    kinds = [k for k, ok in (("appear", free and len(objs) < 6), ("leave", small), ("move", free), ("recolour", True)) if ok]
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "appear":
        row, col = free[int(rng.integers(len(free)))]
        colour, shape = synth._pick(rng, synth.COLOURS), synth._pick(rng, synth.SHAPES)
        new = synth.SceneObject(shape, colour, "small", row, col, scale=float(rng.uniform(0.42, 0.5)))
        objs.append(new)
        text = f"a {_phrase(new)} appeared {synth._pick(rng, synth._POS_PHRASES[new.cell])}."
    elif kind == "leave":
        gone = objs.pop(small[int(rng.integers(len(small)))])
        text = f"the {_phrase(gone)} is gone."
    elif kind == "move":
        i = int(rng.integers(len(objs)))
        row, col = free[int(rng.integers(len(free)))]
        objs[i] = dataclasses.replace(objs[i], row=row, col=col)
        text = f"the {_phrase(objs[i])} moved; now it is {synth._pick(rng, synth._POS_PHRASES[(row, col)])}."
    else:
        i = int(rng.integers(len(objs)))
        colour = synth._pick(rng, [c for c in synth.COLOURS if c != objs[i].colour])
        text = f"the {_phrase(objs[i])} is now {colour}."
        objs[i] = dataclasses.replace(objs[i], colour=colour)
    return synth.Scene(tuple(objs), scene.background), text


def _caption(scene: synth.Scene, form: str, rng: np.random.Generator) -> str:
    """One caption of ``scene`` in ``form`` (a relation needs two objects: else ``positional``)."""
    builder = synth._CaptionBuilder(scene, rng)
    if form == "relational" and len(scene.objects) < 2:
        form = "positional"
    return getattr(builder, form)() + "."


def _sentence(question: dict) -> str:
    """A question's answer as a sentence (``there are 2.``, ``yes, it is.``, ``it is red.``)."""
    answer, kind = question["multiple_choice_answer"], question["answer_type"]
    if kind == "number":
        return f"there {'is' if answer == '1' else 'are'} {answer}."
    if kind == "yes/no":
        subject = {"is there a": "there is", "are there any": "there are"}.get(question["question_type"], "it is")
        return f"yes, {subject}." if answer == "yes" else f"no, {subject} not."
    return f"it is {answer}."


def _so_far(seen: Counter, rng: np.random.Generator) -> str:
    shape, n = list(seen.items())[int(rng.integers(len(seen)))]
    noun = shape if n == 1 else synth._PLURALS[shape]
    return f"so far we have seen {synth._NUM_WORDS[min(n, 10)]} {noun}."


# ---- one page ----------------------------------------------------------------------------------
def make_document(config: DocsConfig, split: str, index: int) -> dict[str, Any]:
    """Document ``index`` of ``split`` as MMC4's converted JSON (see the module docstring)."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, _SPLIT_SEED[split], index]))
    world = synth.SynthConfig()
    kind = list(PAGE_KINDS)[int(rng.choice(len(PAGE_KINDS), p=list(PAGE_KINDS.values())))]
    label = synth._pick(rng, CAPTION_LABELS)
    form = synth._pick(rng, CAPTION_FORMS)
    q_label, a_label = QA_FORMATS[int(rng.integers(len(QA_FORMATS)))]
    detailed = bool(rng.random() < config.detailed_prob)  # captions with a second sentence, answers in sentences
    sentences: list[str] = []
    owner: list[int] = []  # the scene each sentence is about (-1: none)
    if rng.random() < config.title_prob:
        sentences.append(synth._pick(rng, TITLES[kind]))
        owner.append(-1)
    scenes: list[synth.Scene] = []
    own: list[int] = []  # each scene's own sentence
    seen: Counter = Counter()
    for i in range(int(rng.integers(config.min_scenes, config.max_scenes + 1))):
        changed = change_scene(scenes[-1], rng) if scenes and rng.random() < config.change_prob else None
        scene = changed[0] if changed else synth.make_scene(rng, world, allow_holdout=False)
        scenes.append(scene)
        seen.update(o.shape for o in scene.objects)
        own.append(len(sentences))
        if kind == "captions":
            extra = f" the background is {scene.background.name}." if detailed else ""
            texts = [f"{label} {_caption(scene, form, rng)}{extra}".strip()]
        elif kind == "labels":
            texts = [f"{label} {scene.classname}".strip()]
        elif kind == "questions":
            qs = synth.questions(scene, rng, 1, 2)
            texts = [f"{q_label} {q['question']} {a_label} {_sentence(q) if detailed else q['multiple_choice_answer']}" for q in qs]
        else:
            texts = [changed[1] if changed else _caption(scene, synth._pick(rng, CAPTION_FORMS), rng)]
            if i > 0 and rng.random() < 0.5:
                texts.append(_so_far(seen, rng))
        sentences += texts
        owner += [i] * len(texts)

    # similarities on CLIP's cosine scale: own sentence > same scene > unrelated
    sim = rng.uniform(0.02, 0.20, (len(scenes), len(sentences)))  # [N, S]
    for i in range(len(scenes)):
        same = [j for j, o in enumerate(owner) if o == i]
        sim[i, same] = rng.uniform(0.18, 0.26, len(same))
        sim[i, own[i]] = rng.uniform(0.12, 0.23) if rng.random() < config.weak_image_prob else rng.uniform(0.27, 0.37)
    sim = np.round(sim, 4)
    key = f"{split}_{index:07d}"
    info = []
    for i, scene in enumerate(scenes):
        buf = io.BytesIO()
        synth.render(scene, config.image_size, rng).save(buf, format="JPEG", quality=90)
        best = int(sim[i].argmax())
        info.append({"image_name": f"{key}-{i}.jpg", "raw_url": f"synthetic://{key}/{i}.jpg",
                     "matched_text_index": best, "matched_sim": float(sim[i, best]),
                     "image_base64": base64.b64encode(buf.getvalue()).decode("ascii")})
    return {"url": f"synthetic://{key}", "text_list": sentences, "image_info": info,
            "similarity_matrix": sim.tolist(), "could_have_url_duplicate": 0, "page": kind}


# ---- shards ------------------------------------------------------------------------------------
def _write_shard(task: tuple[dict, str, str, int, int, int]) -> str:
    config_dict, out, split, shard, start, stop = task
    config = DocsConfig(**config_dict)
    path = Path(out) / split / f"shard-{shard:06d}.tar"
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index in range(start, stop):
            data = json.dumps(make_document(config, split, index)).encode("utf-8")
            member = tarfile.TarInfo(f"{split}_{index:07d}.json")
            member.size, member.mtime, member.mode = len(data), 0, 0o644
            tar.addfile(member, io.BytesIO(data))
    os.replace(tmp, path)
    return str(path)


def is_generated(root: str | os.PathLike) -> bool:
    """True when ``root`` holds complete world documents."""
    return is_written(root, FORMAT)


def generate(out_dir: str | os.PathLike, config: DocsConfig | None = None, num_workers: int = 2, progress: bool = True) -> dict:
    """Write the documents' shards and ``manifest.json`` (last) to ``out_dir``; return the manifest."""
    config = config or DocsConfig()
    config.check()
    shards, _ = write_splits(out_dir, config, _write_shard, FORMAT, "world documents", num_workers, progress)
    return finish(out_dir, {"format": FORMAT, "version": VERSION, "config": dataclasses.asdict(config),
                            "splits": {s: {"shards": shards[s], "num_samples": getattr(config, f"num_{s}")} for s in SPLITS}})


def main(argv: list[str] | None = None) -> int:
    """``lit-vlm data docs --out DIR [--num-train N ...]``."""
    return writer_main(argv, "lit-vlm data docs", "Write the synthetic world's interleaved documents (MMC4's converted "
                       "layout) as webdataset shards.", DocsConfig, generate, "world documents")


__all__ = ["DocsConfig", "FORMAT", "change_scene", "generate", "is_generated", "make_document"]
