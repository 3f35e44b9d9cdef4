"""``lit-vlm report``: a leaderboard of runs as Markdown, CSV, JSON and one HTML page.

    lit-vlm report runs/ --out reports/leaderboard
    lit-vlm report 'runs/*/version_*' --compare "CLIP runs/clip-a/version_0" "CLIP runs/clip-b/version_0"
    lit-vlm report runs/coca-quickstart --merge benchmarks/leaderboard/quickstart/leaderboard.json --out reports/all

Rooms: :mod:`~lit_vlm.report.collect` (reading runs, protocols), :mod:`~lit_vlm.report.uncertainty`
(bootstrap, seeds, paired comparisons), :mod:`~lit_vlm.report.leaderboard` (sections, groups, rows),
:mod:`~lit_vlm.report.render` (the formats), :mod:`~lit_vlm.report.figures` (PNG figures, examples).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lit_vlm.errors import UserError
from lit_vlm.io import write_json_atomic

__all__ = ["build_report", "main"]


def build_report(paths: list[str], out: str | Path, resamples: int = 1000, title: str = "lit-vlm leaderboard",
                 compare: tuple[str, str] | None = None, merge: list[str] | None = None) -> dict[str, Path]:
    """Collect the runs under ``paths``, add the rows of earlier reports' ``leaderboard.json`` files
    (``merge``), and write the report into ``out``; returns the files written."""
    from lit_vlm.report import figures, render
    from lit_vlm.report.collect import load_runs
    from lit_vlm.report.leaderboard import build
    from lit_vlm.report.leaderboard import merge as merge_report

    runs = load_runs(paths) if paths else []
    sections = build(runs, resamples=resamples)
    shown = figures.examples(runs)
    for earlier in merge or []:
        sections, stored = merge_report(sections, Path(earlier))
        for task, items in stored.items():
            shown.setdefault(task, []).extend(items)
    if not sections:
        raise UserError(f"lit-vlm report: nothing to report in {paths + (merge or [])}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    drawn = figures.write_figures(runs, sections, out)
    data = render.to_json(sections, shown)
    if compare:
        data["comparison"] = compare_runs(runs, *compare, resamples=resamples)
    files = {
        "markdown": out / "leaderboard.md",
        "csv": out / "leaderboard.csv",
        "json": out / "leaderboard.json",
        "html": out / "index.html",
    }
    files["markdown"].write_text(render.to_markdown(sections, drawn, title), encoding="utf-8")
    files["csv"].write_text(render.to_csv(sections), encoding="utf-8")
    write_json_atomic(files["json"], data)
    files["html"].write_text(render.to_html(sections, drawn, shown, title), encoding="utf-8")
    return files


def compare_runs(runs: list, label_a: str, label_b: str, resamples: int = 1000) -> dict:
    """Paired bootstrap of B - A on every metric both evaluated with per-sample scores."""
    from lit_vlm.report.uncertainty import paired_difference

    by_label = {r.label: r for r in runs}
    missing = [label for label in (label_a, label_b) if label not in by_label]
    if missing:
        raise UserError(f"lit-vlm report --compare: no run labelled {missing}; the runs are {sorted(by_label)}")
    a, b = by_label[label_a], by_label[label_b]
    out: dict = {"a": label_a, "b": label_b, "metrics": {}}
    for task, block_a in a.per_sample.items():
        block_b = b.per_sample.get(task)
        if not block_b:
            continue
        for metric, scores in block_a["metrics"].items():
            if metric in block_b["metrics"]:
                diff, p = paired_difference({"ids": block_a["ids"], **scores}, {"ids": block_b["ids"], **block_b["metrics"][metric]},
                                            resamples=resamples)
                out["metrics"][f"{task}/{metric}"] = {"difference": diff.value, "low": diff.low, "high": diff.high,
                                                      "p_b_not_better": p}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lit-vlm report", description="Build a leaderboard (Markdown, CSV, JSON, HTML) from results.json files.")
    parser.add_argument("paths", nargs="*", help="results.json files, run folders (searched recursively) or globs")
    parser.add_argument("--merge", nargs="+", metavar="LEADERBOARD_JSON", default=[],
                        help="earlier reports' leaderboard.json: their rows join this report (a run of this report replaces a row "
                             "of the same label), ranked beside it only under the same protocol")
    parser.add_argument("--out", default="reports/leaderboard", help="output folder (default: reports/leaderboard)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--title", default="lit-vlm leaderboard")
    parser.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="paired bootstrap of B - A (run labels)")
    args = parser.parse_args(argv)
    if args.resamples < 10:
        raise UserError(f"--resamples must be >= 10, got {args.resamples}")
    if not args.paths and not args.merge:
        parser.error("give run folders or results.json files, or --merge an earlier leaderboard.json")
    files = build_report(args.paths, args.out, args.resamples, args.title, tuple(args.compare) if args.compare else None,
                         args.merge)
    data = json.loads(files["json"].read_text(encoding="utf-8"))
    rows = sum(len(g["rows"]) for s in data["sections"] for g in s["groups"])
    print(f"Leaderboard: {len(data['sections'])} task(s), {rows} row(s)")
    for kind, path in files.items():
        print(f"  {kind:8s} {path.resolve()}")
    if "comparison" in data:
        print(format_comparison(data["comparison"]))
    return 0


def format_comparison(comparison: dict) -> str:
    """``compare_runs``' result as lines: each metric's B - A, its 95% interval and p."""
    lines = [f"B - A, paired bootstrap over the samples both runs scored (95% interval; p: share of resamples "
             f"where B is not better)\n  A: {comparison['a']}\n  B: {comparison['b']}"]
    width = max((len(m) for m in comparison["metrics"]), default=0)
    for metric, d in comparison["metrics"].items():
        interval = f"[{d['low']:+.4f}, {d['high']:+.4f}]"
        lines.append(f"  {metric:<{width}}  {d['difference']:+.4f} {interval}  p={d['p_b_not_better']:.3f}")
    return "\n".join(lines)
