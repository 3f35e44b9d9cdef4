"""The leaderboard: runs grouped by task and protocol, ranked, with intervals, baselines and cost.

:func:`build` turns loaded runs into plain data (what every output format renders):

* one *section* per task (the evaluation prefix: ``retrieval``, ``zeroshot``, ``vqa``, ``caption``,
  and whatever later evaluations log as ``test/<task>/<metric>``);
* inside a section, one *group* per protocol (:func:`~lit_vlm.report.collect.protocol_of`): rows of
  different groups are never ranked together, and the report names the fields that differ;
* inside a group, one *row* per configuration: runs that differ only in their seed are one row with
  the mean and standard deviation across seeds; rows are ranked by the task's headline metric.

Each value carries its bootstrap interval over evaluation samples (a single run) and its baseline:
the evaluation's own (VQA's majority answer per question type, captioning's nearest-neighbour
caption) or chance (retrieval and zero-shot, computed from the set's sizes).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from lit_vlm.metrics import describe_metric
from lit_vlm.report.collect import Run, protocol_of
from lit_vlm.report.uncertainty import Interval, bootstrap, seed_summary

__all__ = ["HEADLINE", "Group", "Row", "Section", "build"]

#: The metric a task's rows are ranked by (else its first metric).
HEADLINE = {"retrieval": "mean_R@1", "zeroshot": "top1", "vqa": "overall", "caption": "CIDEr"}
_HIDDEN = ("num_samples", "num_questions")


@dataclass
class Row:
    label: str
    runs: list[Run]
    values: dict[str, float]
    intervals: dict[str, Interval] = field(default_factory=dict)  # one run: bootstrap over samples
    spread: dict[str, float] = field(default_factory=dict)  # several seeds: standard deviation
    baselines: dict[str, float] = field(default_factory=dict)
    samples: int | None = None

    @property
    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]

    def provenance(self) -> dict[str, Any]:
        """Cost and provenance of the row's (first) run."""
        run = self.runs[0]
        res, fit = run.results, run.fit or {}
        params = res.get("parameters") or fit.get("parameters") or {}
        training = res.get("training") or {}
        machine = res.get("machine") or {}
        dataset = (res.get("task") or {}).get("dataset") or {}
        return {
            "parameters": params.get("total"),
            "trainable": params.get("trainable"),
            "samples_seen": training.get("samples_seen") or fit.get("samples_seen"),
            "train_s": None if (fit.get("time") or {}).get("train_s") is None else round(float(fit["time"]["train_s"]), 1),
            "test_samples_per_s": None if res.get("samples_per_sec") is None else round(float(res["samples_per_sec"]), 1),
            "machine": f"{machine.get('host', '?')} ({machine.get('cpu_count', '?')} CPU, torch {machine.get('torch', '?')})",
            "commit": (res.get("commit") or "")[:10] + ("+dirty" if res.get("dirty") else ""),
            "config": res.get("config_file"),
            "data": f"{dataset.get('name')} / {dataset.get('split')}",
            "seeds": ", ".join(str(s) for s in self.seeds),
            "date": res.get("date"),
            "results": str(run.path),
        }


@dataclass
class Group:
    protocol: dict[str, Any]
    rows: list[Row]
    metrics: list[str]
    differs: list[str] = field(default_factory=list)  # protocol fields that set it apart from the first group


@dataclass
class Section:
    task: str
    headline: str
    groups: list[Group]


def _chance(task: str, metric: str, run: Run) -> float | None:
    """Chance level of a retrieval or zero-shot metric, from the evaluated set's sizes."""
    if task == "zeroshot":
        classes = (((run.results.get("evaluations") or {}).get(task) or {}).get("protocol") or {}).get("classes")
        k = {"top1": 1, "top5": 5}.get(metric)
        return min(1.0, k / classes) if classes and k else None
    block = run.per_sample.get(task) or {}
    scores = block.get("metrics") or {}
    if task != "retrieval" or not scores:
        return None
    counts = next((v["den"] for name, v in scores.items() if name.startswith("t2i_")), None)
    if counts is None:
        return None
    images, texts = len(counts), int(sum(counts))
    if metric in (block.get("mean_of") or {}):
        parts = [_chance(task, p, run) for p in block["mean_of"][metric]]
        return None if any(p is None for p in parts) else sum(parts) / len(parts)
    direction, _, k = metric.partition("_R@")
    if not k.isdigit():
        return None
    k = int(k)
    if direction == "t2i":  # one right image among `images`
        return min(1.0, k / images)
    if direction == "i2t":  # any of the image's captions among the top k of `texts`
        miss = [math.comb(texts - int(c), k) / math.comb(texts, k) if texts >= k else 0.0 for c in counts]
        return 1.0 - sum(miss) / len(miss)
    return None


def _row(task: str, runs: list[Run], resamples: int) -> Row:
    values_per_run = [r.tasks()[task] for r in runs]
    metrics = [m for m in values_per_run[0] if not m.startswith("baseline/") and m not in _HIDDEN]
    row = Row(runs[0].label if len(runs) == 1 else f"{runs[0].label} ({len(runs)} seeds)", runs, {})
    row.samples = int(values_per_run[0].get("num_samples", 0)) or None
    for metric in metrics:
        values = [v[metric] for v in values_per_run if metric in v]
        row.values[metric], spread = seed_summary(values)
        if len(values) > 1:
            row.spread[metric] = spread
        baseline = values_per_run[0].get(f"baseline/{metric}")
        chance = _chance(task, metric, runs[0]) if baseline is None else None
        if baseline is not None or chance is not None:
            row.baselines[metric] = baseline if baseline is not None else chance
    block = runs[0].per_sample.get(task)
    if len(runs) == 1 and block:
        row.intervals = bootstrap(block["metrics"], block.get("mean_of"), resamples=resamples)
    return row


def _headline(task: str, metrics: list[str]) -> str:
    """The task's own headline, else the first known headline among its metrics (a second VQA
    evaluation ranks by ``overall`` too), else its first metric."""
    for name in (HEADLINE.get(task), *HEADLINE.values()):
        if name in metrics:
            return name
    return metrics[0]


def _order(metric: str, headline: str) -> tuple:
    """Headline first, then recall@k by direction and k, then the rest alphabetically."""
    stem, _, k = metric.rpartition("@")
    if k.isdigit():
        return (metric != headline, 0, stem, int(k))
    return (metric != headline, 1, metric, 0)


def _differs(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [k for k in keys if json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True)]


def build(runs: list[Run], resamples: int = 1000) -> list[Section]:
    """Sections by task, groups by protocol, rows by configuration, ranked (module docstring)."""
    sections = []
    tasks = sorted({t for r in runs for t in r.tasks()}, key=lambda t: (list(HEADLINE).index(t) if t in HEADLINE else 99, t))
    for task in tasks:
        by_protocol: dict[str, tuple[dict[str, Any], dict[str, list[Run]]]] = {}
        for run in (r for r in runs if task in r.tasks()):
            protocol = protocol_of(run, task)
            key = json.dumps(protocol, sort_keys=True)
            by_protocol.setdefault(key, (protocol, {}))[1].setdefault(run.config_key(), []).append(run)
        groups = []
        for protocol, configs in by_protocol.values():
            rows = [_row(task, members, resamples) for members in configs.values()]
            metrics = list(dict.fromkeys(m for row in rows for m in row.values))
            headline = _headline(task, metrics)
            metrics.sort(key=lambda m: _order(m, headline))
            better = describe_metric(f"test/{task}/{headline}").get("higher_is_better") is not False
            rows.sort(key=lambda r: r.values.get(headline, -math.inf if better else math.inf), reverse=better)
            groups.append(Group(protocol, rows, metrics))
        for group in groups[1:]:
            group.differs = _differs(groups[0].protocol, group.protocol)
        headline = _headline(task, groups[0].metrics)
        sections.append(Section(task, headline, groups))
    return sections
