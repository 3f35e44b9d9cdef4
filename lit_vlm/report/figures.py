"""Figures and examples of a report, written as PNG files (matplotlib, no display needed).

* per task: the headline metric of every row with its interval (or ± std over seeds) and the
  baseline; the headline against training cost (wall seconds, samples seen) and parameters;
* training curves (``train/loss`` and the validation headline) read from the runs' TensorBoard files;
* what the evaluations logged for people: the zero-shot confusion matrix with class names and the
  retrieval example grids (copied from the test run's TensorBoard images), and generated captions and
  VQA answers next to their references (from the prediction files the evaluations wrote).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from lit_vlm.report.collect import Run
from lit_vlm.report.leaderboard import Section

__all__ = ["examples", "write_figures"]

_TB_IMAGES = {"zeroshot": ("test/zeroshot/confusion_matrix", "zero-shot confusion matrix"),
              "retrieval": ("test/retrieval/i2t_example_images", "image-to-text retrieval examples")}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80] or "run"


def _bars(section: Section, path: Path) -> None:
    plt = _plt()
    groups = section.groups
    fig, axes = plt.subplots(1, len(groups), figsize=(max(4, 1.2 * sum(len(g.rows) for g in groups) + 2), 3.2), squeeze=False)
    for ax, (g, group) in zip(axes[0], enumerate(groups)):
        metric = section.headline if section.headline in group.metrics else group.metrics[0]
        scale = _scale(section.task, metric)
        values = [scale * row.values.get(metric, float("nan")) for row in group.rows]
        errors = [[0.0] * len(values), [0.0] * len(values)]
        for i, row in enumerate(group.rows):
            if metric in row.spread:
                errors[0][i] = errors[1][i] = scale * row.spread[metric]
            elif metric in row.intervals:
                errors[0][i] = max(0.0, values[i] - scale * row.intervals[metric].low)
                errors[1][i] = max(0.0, scale * row.intervals[metric].high - values[i])
        ax.bar(range(len(values)), values, yerr=errors, capsize=4, color="#4c72b0")
        baseline = group.rows[0].baselines.get(metric)
        if baseline is not None:
            ax.axhline(scale * baseline, color="#c44e52", linestyle="--", label="baseline")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(values)), [row.label[:28] for row in group.rows], rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{section.task}: {metric}{' (%)' if scale == 100 else ''} (protocol {g + 1})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scale(task: str, metric: str) -> float:
    """100 for fractions (shown in percent, as in the tables), else 1."""
    from lit_vlm.metrics import describe_metric

    return 100.0 if describe_metric(f"test/{task}/{metric}").get("unit") == "fraction" else 1.0


def _cost(section: Section, path: Path) -> bool:
    plt = _plt()
    group = section.groups[0]
    metric = section.headline
    scale = _scale(section.task, metric)
    axes_spec = (("train_s", "training wall time (s)"), ("samples_seen", "training samples seen"), ("parameters", "parameters"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    drawn = False
    for ax, (key, title) in zip(axes, axes_spec):
        points = [(row.provenance().get(key), scale * row.values.get(metric, float("nan")), row.label) for row in group.rows]
        points = [(x, y, label) for x, y, label in points if isinstance(x, (int, float)) and x > 0 and y is not None]
        for x, y, label in points:
            ax.scatter([x], [y])
            ax.annotate(label[:24], (x, y), fontsize=6)
        if points:
            ax.set_xscale("log")
            drawn = True
        ax.set_xlabel(title, fontsize=8)
        ax.set_ylabel(metric + (" (%)" if scale == 100 else ""), fontsize=8)
    fig.suptitle(f"{section.task}: {metric} against cost (protocol 1)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def _scalars(run_dir: Path, tags: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    have = set(events.Tags().get("scalars", []))
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags if tag in have}


def _curves(runs: list[Run], sections: list[Section], path: Path) -> bool:
    plt = _plt()
    tags = ("train/loss", *(f"val/{s.task}/{s.headline}" for s in sections))
    fig, axes = plt.subplots(1, len(tags), figsize=(4.2 * len(tags), 3.2), squeeze=False)
    drawn = False
    for run in runs:
        if run.fit_dir is None or not run.fit_dir.is_dir():
            continue
        series = _scalars(run.fit_dir, tags)
        for ax, tag in zip(axes[0], tags):
            if tag in series:
                steps, values = zip(*series[tag])
                ax.plot(steps, values, label=run.label[:30], marker="." if len(steps) < 20 else None)
                drawn = True
    for ax, tag in zip(axes[0], tags):
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if ax.lines:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def _tb_image(run_dir: Path, tag: str, path: Path) -> bool:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    if tag not in events.Tags().get("images", []):
        return False
    path.write_bytes(events.Images(tag)[-1].encoded_image_string)  # PNG, as the evaluation logged it
    return True


def write_figures(runs: list[Run], sections: list[Section], out: Path) -> dict[str, list[tuple[str, str]]]:
    """Write every figure under ``out/figures``; returns ``task -> [(caption, path relative to out)]``
    (the training curves under the task ``"training"``)."""
    folder = out / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    figures: dict[str, list[tuple[str, str]]] = {}
    for section in sections:
        items = figures.setdefault(section.task, [])
        name = f"{_slug(section.task)}_bars.png"
        _bars(section, folder / name)
        items.append((f"{section.task}: {section.headline} per run, with its interval and baseline", f"figures/{name}"))
        name = f"{_slug(section.task)}_cost.png"
        if _cost(section, folder / name):
            items.append((f"{section.task}: {section.headline} against training cost and parameters", f"figures/{name}"))
        else:
            (folder / name).unlink(missing_ok=True)
        if section.task in _TB_IMAGES:
            tag, caption = _TB_IMAGES[section.task]
            for row in section.groups[0].rows[:4]:
                name = f"{_slug(row.label)}_{section.task}.png"
                if _tb_image(row.runs[0].path.parent, tag, folder / name) if row.runs else _copy_merged(row, name, folder):
                    items.append((f"{row.label}: {caption}", f"figures/{name}"))
    if _curves(runs, sections, folder / "training_curves.png"):
        figures["training"] = [("training loss and validation headline metrics against steps", "figures/training_curves.png")]
    else:
        (folder / "training_curves.png").unlink(missing_ok=True)
    merged = sorted({row.source for s in sections for g in s.groups for row in g.rows if row.source is not None})
    for n, source in enumerate(merged, 1):  # earlier reports' training curves, as they drew them
        name = f"training_curves_merged_{n}.png"
        if (source.parent / "figures" / "training_curves.png").is_file():
            shutil.copyfile(source.parent / "figures" / "training_curves.png", folder / name)
            figures.setdefault("training", []).append((f"training curves of the runs merged from {source}", f"figures/{name}"))
    return figures


def _copy_merged(row, name: str, folder: Path) -> bool:
    """A merged row's example figure, copied from the report it comes from (same file name)."""
    found = row.source.parent / "figures" / name
    if not found.is_file():
        return False
    if found.resolve() != (folder / name).resolve():  # a report merged into its own folder keeps its figures
        shutil.copyfile(found, folder / name)
    return True


def examples(runs: list[Run], limit: int = 5) -> dict[str, list[dict[str, Any]]]:
    """Generated captions and VQA answers beside their references (first ``limit`` of each run)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        folder = run.path.parent
        annotations = ((run.results.get("task") or {}).get("dataset") or {}).get("annotations") or {}
        captions_file = folder / "caption_predictions_test.json"
        if captions_file.is_file():
            refs = _references(annotations.get("captions", {}).get("path"))
            for item in json.loads(captions_file.read_text(encoding="utf-8"))[:limit]:
                texts = [f"generated: {item['caption']}", *(f"reference: {r}" for r in refs.get(str(item["image_id"]), [])[:3])]
                out.setdefault("caption", []).append({"run": run.label, "texts": texts})
        vqa_file = folder / "vqa_predictions_test.json"
        if vqa_file.is_file():
            questions, answers = _vqa(annotations)
            for item in json.loads(vqa_file.read_text(encoding="utf-8"))[:limit]:
                qid = item["question_id"]
                texts = [f"question: {questions.get(qid, '?')}", f"answer: {item['answer']}",
                         f"annotators: {', '.join(answers.get(qid, [])[:5])}"]
                out.setdefault("vqa", []).append({"run": run.label, "texts": texts})
    return out


def _references(path: str | None) -> dict[str, list[str]]:
    if not path or not Path(path).is_file():
        return {}
    refs: dict[str, list[str]] = {}
    for ann in json.loads(Path(path).read_text(encoding="utf-8")).get("annotations", []):
        refs.setdefault(str(ann["image_id"]), []).append(ann["caption"])
    return refs


def _vqa(annotations: dict[str, Any]) -> tuple[dict[int, str], dict[int, list[str]]]:
    questions, answers = {}, {}
    qfile, afile = (annotations.get(k, {}).get("path") for k in ("vqa_questions", "vqa_annotations"))
    if qfile and Path(qfile).is_file():
        questions = {q["question_id"]: q["question"] for q in json.loads(Path(qfile).read_text(encoding="utf-8"))["questions"]}
    if afile and Path(afile).is_file():
        for ann in json.loads(Path(afile).read_text(encoding="utf-8"))["annotations"]:
            answers[ann["question_id"]] = [a["answer"] if isinstance(a, dict) else a for a in ann.get("answers", [])]
    return questions, answers
