"""The synthetic world's clips with sound, written as video2dataset writes clips (mp4 + flac + json).

A clip is a few seconds of one of the world's shapes doing one thing (moving to the left, right,
top or bottom, appearing, or changing colour), sometimes beside a second, still shape, over a plain
background. Every shape kind makes its own sound (a tone and timbre: the circle a pure tone, the
square a buzz of odd harmonics, ...) and every colour its own pattern (red steady, green pulsing,
blue rising, ...), heard while the shape is visible, the second shape more quietly. So what is
heard says which shapes of which colours are there, and what is seen says also what they do.

Each sample: ``KEY.mp4`` (H.264, no audio stream), ``KEY.flac`` (mono), ``KEY.txt`` (its first
caption) and ``KEY.json`` with ``captions`` (what is seen, some also what is heard),
``audio_captions`` (what is heard), ``label`` (the action, :data:`ACTIONS`), ``audio_label`` (the
sounding main shape, :data:`AUDIO_CLASSES`), ``questions`` (video QA in VQAv2's fields, with
``question_type``), ``conversations`` (the same as video instruction data, in LLaVA's format) and
the objects. The manifest names the VQA annotation files of val and test
and, under ``classes``, each label's class names and prompt templates.

``lit-vlm data clips --out data/world-clips`` writes them; a ``VideoAudioDataModule`` whose ``root``
is missing writes them there.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from lit_vlm.datamodules import synth
from lit_vlm.datamodules.instructions import vqa_prompt
from lit_vlm.datamodules.writer_cli import SPLITS, finish, is_written, write_splits, writer_main
from lit_vlm.errors import UserError
from lit_vlm.io import write_json_atomic

FORMAT = "lit-vlm-world-clips"
VERSION = 3  # 2: conversations (video instruction data, LLaVA format); 3: their turns in a random order
_SPLIT_SEED = {"train": 201, "val": 202, "test": 203}
_CLIP_ID_OFFSET = {"train": 1, "val": 1_000_000, "test": 2_000_000}
#: Video action classes (``label``): what the main shape does.
ACTIONS: tuple[str, ...] = ("moving to the left", "moving to the right", "moving to the top", "moving to the bottom",
                            "appearing", "changing colour")
ACTION_TEMPLATES: list[str] = ["a video of a shape {}.", "a shape {}.", "something {}."]
#: Audio classes (``audio_label``): the main shape, by its sound.
AUDIO_CLASSES: list[str] = list(synth.SHAPES)
AUDIO_TEMPLATES: list[str] = ["the sound of a {}.", "a {} making its sound.", "the sound a {} makes."]

#: Each shape's sound: its name, fundamental (Hz) and partials (frequency ratio, amplitude).
SOUNDS: dict[str, tuple[str, float, tuple[tuple[float, float], ...]]] = {
    "circle": ("hum", 262.0, ((1, 1.0),)),
    "square": ("buzz", 196.0, ((1, 1.0), (3, 0.33), (5, 0.2), (7, 0.14))),
    "triangle": ("beep", 523.0, ((1, 1.0), (3, 0.11))),
    "star": ("chime", 784.0, ((1, 1.0), (2.76, 0.5), (5.4, 0.25))),
    "hexagon": ("drone", 131.0, ((1, 1.0), (2, 0.8), (3, 0.6), (4, 0.5), (5, 0.4), (6, 0.3))),
    "diamond": ("whistle", 1568.0, ((1, 1.0),)),
    "cross": ("honk", 392.0, ((1, 1.0), (2, 0.5), (3, 0.7))),
    "heart": ("thump", 98.0, ((1, 1.0), (2, 0.6))),
}
#: Each colour's pattern: its name (amplitude and pitch over time, see :func:`_envelope`).
PATTERNS: dict[str, str] = {"red": "steady", "green": "pulsing", "blue": "rising", "yellow": "falling",
                            "purple": "trembling", "orange": "stuttering", "white": "swelling", "black": "fading"}
_DIRECTIONS = {"moving to the left": (-1, 0, "left"), "moving to the right": (1, 0, "right"),
               "moving to the top": (0, -1, "top"), "moving to the bottom": (0, 1, "bottom")}
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


@dataclass
class ClipsConfig:
    """What ``lit-vlm data clips`` writes (each field is an option of the same name)."""

    seed: int = 0
    num_train: int = 4000
    num_val: int = 200
    num_test: int = 200
    image_size: int = 64
    fps: int = 8
    duration: float = 2.0
    sample_rate: int = 16000
    second_object_prob: float = 0.4
    shard_size: int = 500

    def check(self) -> None:
        if self.image_size < 16 or self.image_size % 2 or self.fps < 1 or self.duration <= 0 or self.sample_rate < 8000:
            raise UserError(f"clips: an even image_size >= 16, fps >= 1, duration > 0, sample_rate >= 8000; got {self}")
        if min(self.num_train, self.num_val, self.num_test) < 0 or self.shard_size < 1:
            raise UserError(f"clips: num_train/num_val/num_test >= 0 and shard_size >= 1; got {self}")

    @property
    def num_frames(self) -> int:
        return int(round(self.fps * self.duration))


# ---- one clip -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipObject:
    """A shape of a clip: where it is at the start and end (fractions of the frame), when it is
    visible (fractions of the clip) and, when it changes colour, to what and when."""

    shape: str
    colour: str
    start: tuple[float, float]
    end: tuple[float, float]
    visible_from: float = 0.0
    new_colour: str | None = None
    change_at: float = 0.5
    loudness: float = 1.0

    def colour_at(self, t: float) -> str:
        return self.new_colour if self.new_colour and t >= self.change_at else self.colour

    def position(self, t: float) -> tuple[float, float]:
        return tuple(a + (b - a) * t for a, b in zip(self.start, self.end))  # type: ignore[return-value]


def make_clip(rng: np.random.Generator, config: ClipsConfig) -> tuple[str, list[ClipObject], str]:
    """(action, objects with the main one first, background tone)."""
    action = ACTIONS[int(rng.integers(len(ACTIONS)))]
    shapes = rng.choice(len(synth.SHAPES), 2, replace=False)
    colours = rng.choice(len(synth.COLOURS), 3, replace=False)
    shape, colour = synth.SHAPES[shapes[0]], synth.COLOURS[colours[0]]
    lo, hi = 0.22, 0.78
    if action in _DIRECTIONS:
        dx, dy, _ = _DIRECTIONS[action]
        across = float(rng.uniform(0.35, 0.65))
        a, b = (lo, hi) if dx + dy > 0 else (hi, lo)
        start, end = ((a, across), (b, across)) if dx else ((across, a), (across, b))
        main = ClipObject(shape, colour, start, end)
    else:
        where = (float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7)))
        if action == "appearing":
            main = ClipObject(shape, colour, where, where, visible_from=float(rng.uniform(0.3, 0.5)))
        else:
            main = ClipObject(shape, colour, where, where, new_colour=synth.COLOURS[colours[1]],
                              change_at=float(rng.uniform(0.4, 0.6)))
    objects = [main]
    if rng.random() < config.second_object_prob:  # a still shape in a corner, away from the main one's path
        corners = [(0.15, 0.15), (0.85, 0.15), (0.15, 0.85), (0.85, 0.85)]
        far = max(corners, key=lambda c: min(math.dist(c, main.start), math.dist(c, main.end)))
        objects.append(ClipObject(synth.SHAPES[shapes[1]], synth.COLOURS[colours[2]], far, far, loudness=0.35))
    background = list(synth.BACKGROUND_RGB)[int(rng.integers(len(synth.BACKGROUND_RGB)))]
    return action, objects, background


def render_frames(objects: list[ClipObject], background: str, config: ClipsConfig, rng: np.random.Generator) -> np.ndarray:
    """The clip's frames [T, H, W, 3] uint8 (shapes drawn at 2x and downscaled, for smooth edges)."""
    size, big = config.image_size, config.image_size * 2
    tone = synth._jittered(synth.BACKGROUND_RGB[background], rng, 8)
    radius = 0.13 * big
    frames = []
    for k in range(config.num_frames):
        t = k / max(config.num_frames - 1, 1)
        canvas = Image.new("RGB", (big, big), tone)
        draw = ImageDraw.Draw(canvas)
        for obj in objects:
            if t < obj.visible_from:
                continue
            x, y = obj.position(t)
            pts = synth.UNIT_SHAPES[obj.shape] * radius + (x * big, y * big)
            draw.polygon([(float(px), float(py)) for px, py in pts], fill=synth.COLOUR_RGB[obj.colour_at(t)])
        frames.append(np.asarray(canvas.resize((size, size), Image.Resampling.LANCZOS)))
    return np.stack(frames)  # [T, H, W, 3]


def _envelope(pattern: str, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(amplitude, pitch factor) over ``t`` (seconds from the sound's start, [N])."""
    one = np.ones_like(t)
    if pattern == "pulsing":
        return (np.sin(2 * np.pi * 4 * t) > 0).astype(float), one
    if pattern == "rising":
        return one, 1 + 0.25 * t
    if pattern == "falling":
        return one, 1.5 - 0.25 * t
    if pattern == "trembling":
        return 0.6 + 0.4 * np.sin(2 * np.pi * 11 * t), one
    if pattern == "stuttering":
        return ((t % 0.5) < 0.15).astype(float), one
    if pattern == "swelling":
        return np.clip(t / 1.5, 0.05, 1), one
    if pattern == "fading":
        return np.clip(1 - t / 1.5, 0.05, 1), one
    return one, one  # steady


def synthesize_audio(objects: list[ClipObject], config: ClipsConfig, rng: np.random.Generator) -> np.ndarray:
    """The clip's sound [N] float32 in [-1, 1]: each visible shape's tone in its colour's pattern,
    plus a little noise."""
    n = int(round(config.duration * config.sample_rate))
    t = np.arange(n) / config.sample_rate  # [N] seconds
    out = 0.003 * rng.standard_normal(n)
    for obj in objects:
        _, f0, partials = SOUNDS[obj.shape]
        on = t >= obj.visible_from * config.duration  # [N]
        local = np.maximum(t - obj.visible_from * config.duration, 0)  # seconds since it appeared
        for colour, part in ((obj.colour, t < obj.change_at * config.duration if obj.new_colour else on),
                             (obj.new_colour, t >= obj.change_at * config.duration)):
            if colour is None:
                continue
            amp, pitch = _envelope(PATTERNS[colour], local)
            phase = 2 * np.pi * f0 * np.cumsum(pitch) / config.sample_rate  # [N]
            tone = sum(a * np.sin(r * phase) for r, a in partials) / sum(a for _, a in partials)
            fade = np.clip(np.minimum(local, config.duration - t) / 0.01, 0, 1)  # 10 ms edges, no clicks
            out += 0.5 * obj.loudness * np.where(on & part, amp * tone * fade, 0.0)
    return np.clip(out, -1, 1).astype(np.float32)


def _np(obj: ClipObject, colour: str | None = None) -> str:
    return f"{synth._a(colour or obj.colour)} {colour or obj.colour} {obj.shape}"


def _where(obj: ClipObject) -> str:
    x, y = obj.start
    row = "top" if y < 0.4 else "bottom" if y > 0.6 else "middle"
    col = "left" if x < 0.4 else "right" if x > 0.6 else "center"
    return synth._POS_PHRASES[(row, col)][0]


def describe(action: str, objects: list[ClipObject], rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """(captions of what is seen, the last also of what is heard; captions of what is heard)."""
    main = objects[0]
    sound = SOUNDS[main.shape][0]
    if action in _DIRECTIONS:
        side = _DIRECTIONS[action][2]
        seen = [f"{_np(main)} moving to the {side}", f"{_np(main)} goes from the {_OPPOSITE[side]} to the {side}"]
        heard = f"{_np(main)} making a {PATTERNS[main.colour]} {sound} as it moves to the {side}"
    elif action == "appearing":
        seen = [f"{_np(main)} appears {_where(main)}", f"{_np(main)} appearing {_where(main)}"]
        heard = f"{_np(main)} appears {_where(main)} with a {PATTERNS[main.colour]} {sound}"
    else:
        seen = [f"{_np(main)} turns {main.new_colour}", f"a {main.shape} changing from {main.colour} to {main.new_colour}"]
        before, after = PATTERNS[main.colour], PATTERNS[main.new_colour]
        heard = f"{_np(main)} turns {main.new_colour}, its {sound} going from {before} to {after}"
    audio = [f"the sound of {_np(main)}", f"{synth._a(PATTERNS[main.colour])} {PATTERNS[main.colour]} {sound}"]
    if action == "changing colour":
        audio = [f"the sound of {_np(main)} then {_np(main, main.new_colour)}",
                 f"{synth._a(PATTERNS[main.colour])} {PATTERNS[main.colour]} {sound} that becomes {PATTERNS[main.new_colour]}"]
    if len(objects) > 1:
        other = objects[1]
        seen = [f"{c}, with {_np(other)} {_where(other)}" for c in seen]
        heard += f", beside {_np(other)}"
        audio = [audio[0] + f" and {_np(other)}", audio[1] + f" and a quiet {PATTERNS[other.colour]} {SOUNDS[other.shape][0]}"]
    captions = [seen[int(rng.integers(2))], seen[1 - int(rng.integers(2))], heard]
    return [c + "." for c in captions], [c + "." for c in audio]


def questions(action: str, objects: list[ClipObject], clip_id: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Video QA about the clip, in VQAv2's fields (every annotator gives the same answer)."""
    main = objects[0]
    items = [("what shape is moving?" if action in _DIRECTIONS else "what shape appears?" if action == "appearing"
              else "what shape changes colour?", main.shape, "shape", "other")]
    if action in _DIRECTIONS:
        items.append((f"where does the {main.colour} {main.shape} go?", _DIRECTIONS[action][2], "direction", "other"))
    if action == "changing colour":
        items.append((f"what colour does the {main.shape} turn?", main.new_colour, "colour", "other"))
    else:
        items.append((f"what colour is the {main.shape}?", main.colour, "colour", "other"))
    items.append(("how many shapes are there?", str(len(objects)), "count", "number"))
    shown = [o.shape for o in objects]
    if rng.random() < 0.5:
        asked, present = shown[int(rng.integers(len(shown)))], True
    else:
        absent = [s for s in synth.SHAPES if s not in shown]
        asked, present = absent[int(rng.integers(len(absent)))], False
    items.append((f"is there a {asked}?", "yes" if present else "no", "yes/no", "yes/no"))
    return [{"question_id": clip_id * 10 + j, "question": q, "question_type": qt, "answer_type": at,
             "multiple_choice_answer": a, "answers": [a] * 10, "answer_confidences": ["yes"] * 10}
            for j, (q, a, qt, at) in enumerate(items)]


def conversation(caption: str, asked: list[dict[str, Any]], rng: np.random.Generator) -> list[dict[str, str]]:
    """Video instruction data in LLaVA's format (Video-ChatGPT's, with ``<image>`` as the video's
    place): a description and the clip's questions with their short answers (asked as the VQA
    evaluation asks them, with LLaVA-1.5's short-answer suffix), in a random order; the video goes
    with the first turn, whichever it is, as a question asked about a clip comes first."""
    pairs = [("Describe what happens in the video.", caption)] + [(vqa_prompt(q["question"]), q["multiple_choice_answer"])
                                                                   for q in asked]
    turns = []
    for k, i in enumerate(rng.permutation(len(pairs))):
        ask, answer = pairs[int(i)]
        turns += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + ask}, {"from": "gpt", "value": answer}]
    return turns


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """Frames [T, H, W, 3] uint8 -> H.264 mp4 bytes (yuv420p, every frame a keyframe-free GOP of the clip)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def encode_flac(samples: np.ndarray, sample_rate: int) -> bytes:
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, samples, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def make_sample(config: ClipsConfig, split: str, index: int) -> tuple[dict[str, bytes], dict[str, Any]]:
    """One clip's tar members (by extension) and its JSON record."""
    clip_rng, render_rng, text_rng, audio_rng = (np.random.default_rng(c) for c in np.random.SeedSequence(
        [config.seed, _SPLIT_SEED[split], index]).spawn(4))
    action, objects, background = make_clip(clip_rng, config)
    clip_id = _CLIP_ID_OFFSET[split] + index
    captions, audio_captions = describe(action, objects, text_rng)
    record = {
        "key": f"{split}_{index:07d}", "clip_id": clip_id, "image_id": clip_id, "split": split,
        "captions": captions, "audio_captions": audio_captions,
        "label": ACTIONS.index(action), "action": action,
        "audio_label": AUDIO_CLASSES.index(objects[0].shape), "audio_classname": objects[0].shape,
        "questions": (asked := questions(action, objects, clip_id, text_rng)),
        "conversations": conversation(captions[0], asked, text_rng),
        "objects": [{"shape": o.shape, "colour": o.colour, "new_colour": o.new_colour, "sound": SOUNDS[o.shape][0],
                     "pattern": PATTERNS[o.colour]} for o in objects],
        "background": background, "fps": config.fps, "duration": config.duration, "sample_rate": config.sample_rate,
    }
    members = {
        "mp4": encode_mp4(render_frames(objects, background, config, render_rng), config.fps),
        "flac": encode_flac(synthesize_audio(objects, config, audio_rng), config.sample_rate),
        "txt": captions[0].encode(),
        "json": json.dumps(record).encode(),
    }
    return members, record


# ---- shards and manifest ------------------------------------------------------------------------


def _write_shard(task: tuple[dict, str, str, int, int, int]) -> tuple[str, list[dict]]:
    config_dict, out, split, shard, lo, hi = task
    config = ClipsConfig(**config_dict)
    path = Path(out) / split / f"shard-{shard:06d}.tar"
    records = []
    with tarfile.open(str(path) + ".tmp", "w") as tar:
        for index in range(lo, hi):
            members, record = make_sample(config, split, index)
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{record['key']}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
            records.append({k: record[k] for k in ("clip_id", "image_id", "questions")})
    os.replace(str(path) + ".tmp", path)
    return str(path), records


def is_generated(root: str | os.PathLike) -> bool:
    """True when ``root`` holds complete world clips."""
    return is_written(root, FORMAT)


def generate(out_dir: str | os.PathLike, config: ClipsConfig | None = None, num_workers: int = 2, progress: bool = True) -> dict:
    """Write the clips' shards, the VQA annotation files and ``manifest.json`` (last) to ``out_dir``."""
    config = config or ClipsConfig()
    config.check()
    out = Path(out_dir)
    # spawned, not forked: a forked child can inherit (and crash on) the parent's FFmpeg objects
    shards, written = write_splits(out, config, _write_shard, FORMAT, "world clips", num_workers, progress, spawn=True)
    records: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for path, recs in written:
        records[Path(path).parent.name] += recs
    annotations = {}
    (out / "annotations").mkdir(exist_ok=True)
    for split in ("val", "test"):
        q_json, a_json = synth.vqa_files(split, records[split])
        for name, obj in ((f"vqa_{split}_questions", q_json), (f"vqa_{split}_annotations", a_json)):
            write_json_atomic(out / "annotations" / f"{name}.json", obj)
            annotations[name] = f"annotations/{name}.json"
    return finish(out, {"format": FORMAT, "version": VERSION, "config": dataclasses.asdict(config),
                        "splits": {s: {"shards": shards[s], "num_samples": getattr(config, f"num_{s}")} for s in SPLITS},
                        "annotations": annotations,
                        "classes": {"label": {"classnames": list(ACTIONS), "templates": ACTION_TEMPLATES},
                                    "audio_label": {"classnames": AUDIO_CLASSES, "templates": AUDIO_TEMPLATES}}})


def main(argv: list[str] | None = None) -> int:
    """``lit-vlm data clips --out DIR [--num-train N ...]``."""
    return writer_main(argv, "lit-vlm data clips", "Write the synthetic world's clips with sound (mp4 + flac + json, "
                       "video2dataset's layout) as webdataset shards.", ClipsConfig, generate, "world clips")


__all__ = ["ACTIONS", "AUDIO_CLASSES", "ClipsConfig", "FORMAT", "PATTERNS", "SOUNDS", "describe", "generate",
           "is_generated", "make_clip", "make_sample", "questions", "render_frames", "synthesize_audio"]
