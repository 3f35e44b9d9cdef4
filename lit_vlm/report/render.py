"""The leaderboard as Markdown, CSV, JSON and one HTML page.

Every string that can come from a user (run labels, config paths, captions, answers, class names)
is escaped for its format: :func:`html.escape` in the page, ``md_escape`` in Markdown. The HTML page
needs no network: its style and the small table-sorting script are inline and its figures are PNG
files beside it.
"""

from __future__ import annotations

import csv
import html
import io
import json
from typing import Any

from lit_vlm.callbacks.base import md_escape
from lit_vlm.metrics import describe_metric
from lit_vlm.report.leaderboard import Group, Row, Section

__all__ = ["fmt", "to_csv", "to_html", "to_json", "to_markdown"]

PROVENANCE = ("parameters", "trainable", "samples_seen", "train_s", "test_samples_per_s", "machine", "commit", "seeds",
              "config", "data", "date", "merged_from")


def fmt(task: str, metric: str, value: float | None) -> str:
    """A value as researchers read it: fractions in percent, scores and ranks with fixed decimals."""
    if value is None:
        return ""
    unit = describe_metric(f"test/{task}/{metric}").get("unit")
    if unit == "fraction":
        return f"{100 * value:.1f}"
    if unit == "rank":
        return f"{value:.1f}"
    return f"{value:.3f}"


def shown(metrics: list[str]) -> list[str]:
    """The metrics the tables show: all but the per-question-type breakdowns (dozens of columns for
    VQA); CSV and JSON keep every metric."""
    return [m for m in metrics if not m.startswith("question_type/")]


def _cell(task: str, metric: str, row: Row) -> str:
    text = fmt(task, metric, row.values.get(metric))
    if metric in row.spread:
        text += f" ± {fmt(task, metric, row.spread[metric])}"
    elif metric in row.intervals:
        ci = row.intervals[metric]
        text += f" [{fmt(task, metric, ci.low)}, {fmt(task, metric, ci.high)}]"
    return text


def _metric_title(task: str, metric: str) -> str:
    info = describe_metric(f"test/{task}/{metric}")
    arrow = {True: " ↑", False: " ↓"}.get(info.get("higher_is_better"), "")
    unit = " (%)" if info.get("unit") == "fraction" else ""
    return f"{metric}{unit}{arrow}"


def _protocol_line(group: Group) -> str:
    p = group.protocol
    evaluation = {k: v for k, v in (p.get("evaluation") or {}).items() if k != "callback"}
    parts = [f"{p.get('dataset')} / {p.get('split')}"]
    if p.get("dataset_config"):
        parts.append(f"world config {p['dataset_config']}")
    if p.get("annotations"):
        parts.append("annotations " + ", ".join(f"{k} {v}" for k, v in sorted(p["annotations"].items())))
    if evaluation:
        parts.append(", ".join(f"{k}={json.dumps(v)}" for k, v in evaluation.items()))
    return "; ".join(parts)


def to_json(sections: list[Section], examples: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Plain data: every section, group, row, value, interval, spread, baseline and provenance, and the
    qualitative examples (so that a later report can merge this one, examples included)."""
    out = []
    for section in sections:
        groups = []
        for group in section.groups:
            rows = [{
                "rank": rank, "run": row.label, "samples": row.samples, "values": row.values,
                "intervals": {k: {"low": v.low, "high": v.high, "level": v.level} for k, v in row.intervals.items()},
                "std_over_seeds": row.spread, "baselines": row.baselines, "provenance": row.provenance(),
            } for rank, row in enumerate(group.rows, 1)]
            groups.append({"protocol": group.protocol, "differs_from_first": group.differs, "metrics": group.metrics, "rows": rows})
        out.append({"task": section.task, "headline": section.headline, "groups": groups})
    return {"schema_version": 2, "sections": out, "examples": examples or {}}


def to_csv(sections: list[Section]) -> str:
    """One line per (row, metric), with the protocol's index inside its task and the provenance."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["task", "protocol", "rank", "run", "metric", "value", "ci_low", "ci_high", "std_over_seeds", "baseline",
                     "higher_is_better", "unit", *PROVENANCE])
    for section in sections:
        for g, group in enumerate(section.groups):
            for rank, row in enumerate(group.rows, 1):
                prov = row.provenance()
                for metric in group.metrics:
                    info = describe_metric(f"test/{section.task}/{metric}")
                    ci = row.intervals.get(metric)
                    writer.writerow([section.task, g, rank, row.label, metric, row.values.get(metric),
                                     ci.low if ci else "", ci.high if ci else "", row.spread.get(metric, ""),
                                     row.baselines.get(metric, ""), info.get("higher_is_better"), info.get("unit"),
                                     *(prov.get(k) for k in PROVENANCE)])
    return buffer.getvalue()


def to_markdown(sections: list[Section], figures: dict[str, list[tuple[str, str]]] | None = None, title: str = "lit-vlm leaderboard") -> str:
    """The tables (value [95% bootstrap interval] or mean ± std over seeds), baselines, cost and
    provenance, and links to the figures (``task -> [(caption, relative path)]``)."""
    lines = [f"# {md_escape(title)}", "",
             "Values in percent for fractions; [95% bootstrap interval over evaluation samples] for one run, "
             "± standard deviation for several seeds. Rows are ranked only within one protocol.", ""]
    for section in sections:
        lines += [f"## {md_escape(section.task)} (ranked by {md_escape(section.headline)})", ""]
        for g, group in enumerate(section.groups):
            lines.append(f"Protocol {g + 1}: {md_escape(_protocol_line(group))}")
            if group.differs:
                lines.append(f"(not ranked with protocol 1: differs in {md_escape(', '.join(group.differs))})")
            lines.append("")
            header = ["#", "run", *(_metric_title(section.task, m) for m in shown(group.metrics)), "n", "params", "samples seen", "train s"]
            lines += ["| " + " | ".join(md_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
            for rank, row in enumerate(group.rows, 1):
                prov = row.provenance()
                cells = [str(rank), md_escape(row.label), *(md_escape(_cell(section.task, m, row)) for m in shown(group.metrics)),
                         str(row.samples or ""), _count(prov["parameters"]), _count(prov["samples_seen"]), _seconds(prov["train_s"])]
                lines.append("| " + " | ".join(cells) + " |")
            baselines = {m: group.rows[0].baselines[m] for m in shown(group.metrics) if m in group.rows[0].baselines}
            if baselines:
                lines += ["", "Baseline: " + ", ".join(f"{md_escape(m)} {fmt(section.task, m, v)}" for m, v in baselines.items())]
            lines.append("")
        for caption, path in (figures or {}).get(section.task, []):
            lines += [f"![{md_escape(caption)}]({path})", ""]
    lines += ["## Provenance", "", "| run | " + " | ".join(PROVENANCE) + " |", "|" + "---|" * (len(PROVENANCE) + 1)]
    seen = set()
    for section in sections:
        for group in section.groups:
            for row in group.rows:
                if row.label in seen:
                    continue
                seen.add(row.label)
                prov = row.provenance()
                lines.append("| " + " | ".join([md_escape(row.label), *(md_escape(prov.get(k) if prov.get(k) is not None else "") for k in PROVENANCE)]) + " |")
    return "\n".join(lines) + "\n"


def _count(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return ""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(int(value))


def _seconds(value: Any) -> str:
    return f"{value:.0f}" if isinstance(value, (int, float)) else ""


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1em}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f0f0f0;cursor:pointer}td:nth-child(2),th:nth-child(2){text-align:left}.protocol{color:#555;font-size:90%}
.note{color:#a33}figure{display:inline-block;margin:0.5em}figure img{max-width:560px;border:1px solid #ddd}
.examples td{text-align:left;vertical-align:top}"""

_SORT = """document.querySelectorAll('table.sortable th').forEach(function(th,i){th.addEventListener('click',function(){
var t=th.closest('table'),b=t.tBodies[0],rows=Array.from(b.rows),asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
rows.sort(function(x,y){var a=x.cells[i].dataset.v||x.cells[i].textContent,c=y.cells[i].dataset.v||y.cells[i].textContent;
var fa=parseFloat(a),fc=parseFloat(c);if(!isNaN(fa)&&!isNaN(fc))return asc?fa-fc:fc-fa;return asc?a.localeCompare(c):c.localeCompare(a);});
rows.forEach(function(r){b.appendChild(r);});});});"""


def to_html(sections: list[Section], figures: dict[str, list[tuple[str, str]]] | None = None,
            examples: dict[str, list[dict[str, Any]]] | None = None, title: str = "lit-vlm leaderboard") -> str:
    """One page: a sortable table per task and protocol, baselines, provenance, figures (PNG files
    beside the page) and qualitative examples (``task -> [{"run", "image" (path or None), "texts"}]``)."""
    e = html.escape
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_STYLE}</style></head><body>",
           f"<h1>{e(title)}</h1>",
           "<p>Fractions in percent. For one run each value shows its 95% bootstrap interval over the evaluation samples; "
           "for several seeds, ± the standard deviation across them. Rows are ranked only within one protocol; click a "
           "column to sort.</p>"]
    for section in sections:
        out.append(f"<h2 id='{e(section.task)}'>{e(section.task)} <small>(ranked by {e(section.headline)})</small></h2>")
        for g, group in enumerate(section.groups):
            out.append(f"<p class='protocol'>Protocol {g + 1}: {e(_protocol_line(group))}</p>")
            if group.differs:
                out.append(f"<p class='note'>Not ranked with protocol 1: it differs in {e(', '.join(group.differs))}.</p>")
            head = ["#", "run", *(_metric_title(section.task, m) for m in shown(group.metrics)), "n", "params", "samples seen", "train s", "commit"]
            out.append("<table class='sortable'><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>")
            for rank, row in enumerate(group.rows, 1):
                prov = row.provenance()
                cells = [f"<td>{rank}</td>", f"<td title='{e(str(prov.get('results')))}'>{e(row.label)}</td>"]
                for m in shown(group.metrics):
                    value = row.values.get(m)
                    cells.append(f"<td data-v='{'' if value is None else value}'>{e(_cell(section.task, m, row))}</td>")
                cells += [f"<td>{row.samples or ''}</td>", f"<td data-v='{prov['parameters'] or ''}'>{_count(prov['parameters'])}</td>",
                          f"<td data-v='{prov['samples_seen'] or ''}'>{_count(prov['samples_seen'])}</td>",
                          f"<td>{_seconds(prov['train_s'])}</td>", f"<td>{e(str(prov.get('commit') or ''))}</td>"]
                out.append("<tr>" + "".join(cells) + "</tr>")
            out.append("</tbody></table>")
            baselines = {m: group.rows[0].baselines[m] for m in shown(group.metrics) if m in group.rows[0].baselines}
            if baselines:
                out.append("<p>Baseline: " + ", ".join(f"{e(m)} {e(fmt(section.task, m, v))}" for m, v in baselines.items()) + "</p>")
        for caption, path in (figures or {}).get(section.task, []):
            out.append(f"<figure><img src='{e(path)}' alt='{e(caption)}'><figcaption>{e(caption)}</figcaption></figure>")
        picked = (examples or {}).get(section.task, [])
        if picked:
            out.append("<table class='examples'><thead><tr><th>run</th><th>image</th><th>output and references</th></tr></thead><tbody>")
            for ex in picked:
                image = f"<img src='{e(ex['image'])}' alt='' width='96'>" if ex.get("image") else ""
                texts = "<br>".join(e(t) for t in ex.get("texts", []))
                out.append(f"<tr><td>{e(ex.get('run', ''))}</td><td>{image}</td><td>{texts}</td></tr>")
            out.append("</tbody></table>")
    out.append("<h2>Provenance</h2><table class='sortable'><thead><tr><th>#</th><th>run</th>"
               + "".join(f"<th>{e(k)}</th>" for k in PROVENANCE) + "</tr></thead><tbody>")
    seen: list[str] = []
    for section in sections:
        for group in section.groups:
            for row in group.rows:
                if row.label not in seen:
                    seen.append(row.label)
                    prov = row.provenance()
                    out.append(f"<tr><td>{len(seen)}</td><td>{e(row.label)}</td>"
                               + "".join(f"<td>{e('' if prov.get(k) is None else str(prov.get(k)))}</td>" for k in PROVENANCE) + "</tr>")
    out.append(f"</tbody></table><script>{_SORT}</script></body></html>")
    return "\n".join(out)
