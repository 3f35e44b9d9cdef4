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
from pathlib import Path
from typing import Any

from lit_vlm.errors import UserError
from lit_vlm.metrics import describe_metric
from lit_vlm.report.collect import Run, protocol_of
from lit_vlm.report.uncertainty import Interval, bootstrap, seed_summary

__all__ = ["HEADLINE", "Group", "Row", "Section", "build", "merge"]

#: The metric a task's rows are ranked by (else its first metric).
HEADLINE = {"retrieval": "mean_R@1", "zeroshot": "top1", "vqa": "overall", "caption": "CIDEr", "compositional": "mean",
            "fewshot": "captioning/random/4shot/CIDEr"}
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
    source: Path | None = None  # the earlier report's leaderboard.json a merged row comes from (no runs)
    stored: dict[str, Any] = field(default_factory=dict)  # that row's provenance as the report wrote it

    @property
    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]

    def provenance(self) -> dict[str, Any]:
        """Cost and provenance of the row's (first) run, or as the earlier report recorded it."""
        if self.source is not None:
            return {**self.stored, "merged_from": str(self.source)}
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
            "merged_from": None,
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
    """Chance level of a retrieval or zero-shot metric, from the evaluated set's sizes; 1/2 for a
    compositional accuracy (true caption against one negative). A task is known by the callback that
    logged it, so ``zeroshot_audio`` or ``retrieval_audio_text`` get theirs too."""
    protocol = (((run.results.get("evaluations") or {}).get(task) or {}).get("protocol") or {})
    callback = protocol.get("callback")
    if callback == "CompositionalEvaluation":
        return 0.5
    if task == "zeroshot" or callback == "ZeroShotEvaluation":
        classes = protocol.get("classes")
        k = {"top1": 1, "top5": 5}.get(metric)
        return min(1.0, k / classes) if classes and k else None
    block = run.per_sample.get(task) or {}
    scores = block.get("metrics") or {}
    if not (task == "retrieval" or callback == "RetrievalEvaluation") or not scores:
        return None
    query, gallery = _initials(protocol.get("modalities") or ["image", "text"])
    counts = next((v["den"] for name, v in scores.items() if name.startswith(f"{gallery}2{query}_")), None)
    if counts is None:
        return None
    items, texts = len(counts), int(sum(counts))
    if metric in (block.get("mean_of") or {}):
        parts = [_chance(task, p, run) for p in block["mean_of"][metric]]
        return None if any(p is None for p in parts) else sum(parts) / len(parts)
    direction, _, k = metric.partition("_R@")
    if not k.isdigit():
        return None
    k = int(k)
    if direction == f"{gallery}2{query}":  # one right item among `items`
        return min(1.0, k / items)
    if direction == f"{query}2{gallery}":  # any of the item's texts among the top k of `texts`
        miss = [math.comb(texts - int(c), k) / math.comb(texts, k) if texts >= k else 0.0 for c in counts]
        return 1.0 - sum(miss) / len(miss)
    return None


def _initials(modalities: list[str]) -> tuple[str, str]:
    """How RetrievalEvaluation names a pair's directions: initials, or full names when they clash."""
    q, g = modalities
    return (q[0], g[0]) if q[0] != g[0] else (q, g)


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


def _rank(task: str, groups: list[Group]) -> Section:
    """Order each group's metrics and rows by the headline; name how later groups differ from the first."""
    for group in groups:
        group.metrics = list(dict.fromkeys([*group.metrics, *(m for row in group.rows for m in row.values)]))
        headline = _headline(task, group.metrics)
        group.metrics.sort(key=lambda m: _order(m, headline))
        better = describe_metric(f"test/{task}/{headline}").get("higher_is_better") is not False
        group.rows.sort(key=lambda r: r.values.get(headline, -math.inf if better else math.inf), reverse=better)
    for group in groups[1:]:
        group.differs = _differs(groups[0].protocol, group.protocol)
    return Section(task, _headline(task, groups[0].metrics), groups)


def build(runs: list[Run], resamples: int = 1000) -> list[Section]:
    """Sections by task, groups by protocol, rows by configuration, ranked (module docstring)."""
    sections = []
    tasks = sorted({t for r in runs for t in r.tasks()}, key=_task_order)
    for task in tasks:
        by_protocol: dict[str, tuple[dict[str, Any], dict[str, list[Run]]]] = {}
        for run in (r for r in runs if task in r.tasks()):
            protocol = protocol_of(run, task)
            key = json.dumps(protocol, sort_keys=True)
            by_protocol.setdefault(key, (protocol, {}))[1].setdefault(run.config_key(), []).append(run)
        groups = [Group(protocol, [_row(task, members, resamples) for members in configs.values()], [])
                  for protocol, configs in by_protocol.values()]
        sections.append(_rank(task, groups))
    return sections


def _task_order(task: str) -> tuple[int, str]:
    return (list(HEADLINE).index(task) if task in HEADLINE else 99, task)


def merge(sections: list[Section], report: Path) -> tuple[list[Section], dict[str, list[dict[str, Any]]]]:
    """Add the rows of an earlier report (its ``leaderboard.json``) to ``sections``: a row joins the
    group with the same protocol, so it is ranked beside today's runs only when its numbers mean the
    same; a row whose label a run of this report has is replaced by that run. Values, intervals,
    seeds' spread, baselines and provenance are kept as that report computed them. Returns the
    sections and the earlier report's qualitative examples of the rows it kept."""
    try:
        data = json.loads(Path(report).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"lit-vlm report --merge: cannot read {report}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("sections"), list):
        raise UserError(f"lit-vlm report --merge: {report} is not a leaderboard.json written by `lit-vlm report` (no 'sections')")
    live = {row.label for s in sections for g in s.groups for row in g.rows}
    by_task = {s.task: s.groups for s in sections}
    for stored_section in data["sections"]:
        groups = by_task.setdefault(stored_section["task"], [])
        for stored_group in stored_section["groups"]:
            key = json.dumps(stored_group["protocol"], sort_keys=True)
            group = next((g for g in groups if json.dumps(g.protocol, sort_keys=True) == key), None)
            if group is None:
                group = Group(stored_group["protocol"], [], list(stored_group.get("metrics") or []))
                groups.append(group)
            for r in stored_group["rows"]:
                if r["run"] in live:
                    continue
                values = {k: float(v) for k, v in r["values"].items()}
                intervals = {k: Interval(values.get(k, math.nan), v["low"], v["high"], v.get("level", 0.95))
                             for k, v in (r.get("intervals") or {}).items()}
                group.rows.append(Row(r["run"], [], values, intervals, dict(r.get("std_over_seeds") or {}),
                                      dict(r.get("baselines") or {}), r.get("samples"), Path(report),
                                      {k: v for k, v in (r.get("provenance") or {}).items() if k != "merged_from"}))
    kept = {task: [g for g in groups if g.rows] for task, groups in by_task.items()}
    merged = [_rank(task, groups) for task, groups in sorted(kept.items(), key=lambda item: _task_order(item[0])) if groups]
    labels = {row.label for s in merged for g in s.groups for row in g.rows if row.source == Path(report)}
    examples = {task: [item for item in items if item.get("run") in labels]
                for task, items in (data.get("examples") or {}).items()}
    return merged, examples
