"""lit-vlm report: bootstrap intervals on hand-made cases, protocols never ranked together, seeds
merged, user strings escaped, and a page whose every figure exists."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from lit_vlm.cli import main
from lit_vlm.errors import UserError
from lit_vlm.report import build_report
from lit_vlm.report.collect import load_runs
from lit_vlm.report.leaderboard import build
from lit_vlm.report.uncertainty import bootstrap, paired_difference, seed_summary

# ---- uncertainty -----------------------------------------------------------------------------------


def test_bootstrap_of_a_ratio_of_sums_on_a_hand_made_case():
    # two samples, num/den = 1/1 and 2/3: value 3/4; the four equally likely draws give
    # {1/1: 1, 1/1+2/3 -> 3/4 (twice), 2/3+2/3 -> 2/3}: 25% at 2/3, 50% at 3/4, 25% at 1
    out = bootstrap({"m": {"num": [1, 2], "den": [1, 3]}}, resamples=4000, seed=3)["m"]
    assert out.value == 0.75
    assert (out.low, out.high) == pytest.approx((2 / 3, 1.0))
    constant = bootstrap({"m": {"num": [1, 1, 1], "den": [1, 1, 1]}}, resamples=200)["m"]
    assert (constant.value, constant.low, constant.high) == (1.0, 1.0, 1.0)


def test_bootstrap_matches_the_exact_distribution_and_derives_means():
    rng = np.random.default_rng(0)
    hits = (rng.random(200) < 0.3).astype(float)
    out = bootstrap({"a": {"num": hits, "den": np.ones(200)}, "b": {"num": 1 - hits, "den": np.ones(200)}},
                    mean_of={"ab": ["a", "b"]}, resamples=4000, seed=1)
    p, n = hits.mean(), 200
    se = (p * (1 - p) / n) ** 0.5  # the binomial standard error the bootstrap estimates
    assert out["a"].high - out["a"].low == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert (out["ab"].value, out["ab"].low, out["ab"].high) == pytest.approx((0.5, 0.5, 0.5))  # a + b = 1 on every draw


def test_paired_difference_and_seeds():
    a = {"ids": ["x", "y", "z", "w"], "num": [1, 0, 1, 0], "den": [1, 1, 1, 1]}
    same, p_same = paired_difference(a, a, resamples=500)
    assert (same.value, same.low, same.high, p_same) == (0.0, 0.0, 0.0, 1.0)
    better = {"ids": ["w", "z", "y", "x"], "num": [1, 1, 1, 1], "den": [1, 1, 1, 1]}  # aligned by id, not position
    diff, p = paired_difference(a, better, resamples=500)
    assert diff.value == 0.5 and diff.low >= 0 and p <= 0.1
    with pytest.raises(ValueError, match="share no evaluated sample"):
        paired_difference(a, {"ids": ["q"], "num": [1], "den": [1]})
    assert seed_summary([1.0, 2.0, 3.0]) == (2.0, 1.0) and seed_summary([4.0]) == (4.0, 0.0)


# ---- runs written by hand ----------------------------------------------------------------------------


def write_run(folder: Path, *, r1: float, seed: int = 0, annotations: str = "a" * 64, hits: list[int] | None = None,
              family: str = "CLIP", lr: float = 1e-3, caption: str | None = None) -> Path:
    """A results.json (and per-sample scores) as ResultsWriter writes them."""
    folder.mkdir(parents=True)
    hits = hits or [1, 0, 1, 1]
    results = {
        "schema_version": 1, "family": family, "config_file": str(folder / "config.yaml"),
        "config": {"seed_everything": seed, "model": {"init_args": {"lr": lr}}, "trainer": {"logger": str(folder)}},
        "checkpoint": None,
        "task": {"stage": "test", "dataset": {"name": "world", "split": "test", "root": "/data/w", "config_sha256": "c" * 64,
                                               "annotations": {"captions": {"path": "/x.json", "sha256": annotations}}}},
        "metrics": {"test/zeroshot/top1": r1, "test/zeroshot/num_samples": float(len(hits))},
        "evaluations": {"zeroshot": {"protocol": {"callback": "ZeroShotEvaluation", "classes": 4}, "per_sample": "results.per_sample.json"}},
        "parameters": {"total": 1000, "trainable": 1000}, "training": {"samples_seen": 640},
        "machine": {"host": "m", "cpu_count": 2, "torch": "2"}, "commit": "abc", "dirty": False, "date": "2026-12-04",
    }
    (folder / "results.json").write_text(json.dumps(results))
    per_sample = {"zeroshot": {"ids": [f"s{i}" for i in range(len(hits))],
                               "metrics": {"top1": {"num": hits, "den": [1] * len(hits)}}, "mean_of": {}}}
    (folder / "results.per_sample.json").write_text(json.dumps(per_sample))
    if caption is not None:
        (folder / "caption_predictions_test.json").write_text(json.dumps([{"image_id": 1, "caption": caption}]))
        results["metrics"]["test/caption/CIDEr"] = 0.3
        (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_protocols_are_never_ranked_together_and_seeds_merge(tmp_path):
    write_run(tmp_path / "a", r1=0.50, hits=[1, 0, 1, 0])
    write_run(tmp_path / "b", r1=0.75, lr=2e-3)
    write_run(tmp_path / "b-seed1", r1=0.45, seed=1, lr=2e-3, hits=[1, 0, 0, 0])
    write_run(tmp_path / "c", r1=0.99, annotations="b" * 64)  # the best number, on other annotations
    [section] = build(load_runs([str(tmp_path)]), resamples=200)
    assert section.task == "zeroshot" and len(section.groups) == 2
    first, other = section.groups
    assert [r.label for r in first.rows] == ["b (CLIP) (2 seeds)", "a (CLIP)"]  # ranked: mean(0.75, 0.45) = 0.6 > 0.5
    assert first.rows[0].values["top1"] == pytest.approx(0.6) and first.rows[0].spread["top1"] == pytest.approx(0.2121320, rel=1e-6)
    assert first.rows[1].intervals["top1"].value == 0.5 and "top1" not in first.rows[0].intervals  # seeds: std, not CI
    assert [r.label for r in other.rows] == ["c (CLIP)"] and other.differs == ["annotations"]
    assert first.rows[0].baselines["top1"] == 0.25  # chance with 4 classes
    # one run alone (as merged into a committed leaderboard) is named by its run and version, not a local path
    write_run(tmp_path / "runs/d/version_3", r1=0.5)
    assert [r.label for r in load_runs([str(tmp_path / "runs/d/version_3")])] == ["d/version_3 (CLIP)"]


def test_user_strings_are_escaped_and_every_figure_exists(tmp_path):
    write_run(tmp_path / "runs" / "x", r1=0.5, family="CLIP<script>alert(1)</script>", caption="a <script>alert('x')</script> & dog")
    write_run(tmp_path / "runs" / "y", r1=0.25, lr=3e-3)
    files = build_report([str(tmp_path / "runs")], tmp_path / "out", resamples=100)
    page = files["html"].read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; dog" in page  # the caption example
    markdown = files["markdown"].read_text()
    assert "<script>" not in markdown and "&lt;script&gt;" in markdown

    class Page(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags, self.images = [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            if tag == "img":
                self.images.append(dict(attrs)["src"])

    parsed = Page()
    parsed.feed(page)
    assert parsed.tags.count("table") >= 2 and parsed.tags.count("h2") >= 2 and parsed.tags.count("script") == 1
    assert parsed.images and all((files["html"].parent / src).is_file() for src in parsed.images)
    assert "figures/zeroshot_bars.png" in parsed.images
    rows = json.loads(files["json"].read_text())["sections"][0]["groups"][0]["rows"]
    assert [r["rank"] for r in rows] == [1, 2] and rows[0]["values"]["top1"] == 0.5
    assert files["csv"].read_text().count("\n") == 4  # header + a line per (row, metric): 2 zero-shot, 1 caption


def test_an_earlier_report_merges_by_protocol_and_a_rerun_replaces_its_row(tmp_path):
    write_run(tmp_path / "old" / "a", r1=0.50, caption="a red circle")
    write_run(tmp_path / "old" / "b", r1=0.25, lr=2e-3)
    write_run(tmp_path / "old" / "c", r1=0.99, lr=3e-3, annotations="b" * 64)  # another protocol
    earlier = build_report([str(tmp_path / "old")], tmp_path / "first", resamples=100)["json"]
    write_run(tmp_path / "new" / "b", r1=0.75, lr=2e-3)  # b again, better: replaces the stored row
    write_run(tmp_path / "new" / "d", r1=0.60, lr=4e-3)
    files = build_report([str(tmp_path / "new")], tmp_path / "merged", resamples=100, merge=[str(earlier)])
    [section] = json.loads(files["json"].read_text())["sections"][:1]
    first, other = section["groups"]
    assert [r["run"] for r in first["rows"]] == ["b (CLIP)", "d (CLIP)", "a (CLIP)"]  # one ranking, no duplicate b
    assert first["rows"][0]["values"]["top1"] == 0.75 and first["rows"][0]["provenance"]["merged_from"] is None
    stored = first["rows"][2]
    assert stored["provenance"]["merged_from"] == str(earlier) and stored["intervals"]["top1"]["low"] <= 0.5
    assert [r["run"] for r in other["rows"]] == ["c (CLIP)"] and other["differs_from_first"] == ["annotations"]
    assert "a red circle" in files["html"].read_text()  # the stored caption example came along
    with pytest.raises(UserError, match="not a leaderboard.json"):
        build_report([], tmp_path / "bad", merge=[str(tmp_path / "new" / "b" / "results.json")])


def test_the_cli_names_missing_runs_in_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "neither a results file nor a run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_runs_a_suite_skips_what_is_done_and_builds_the_report(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, "-m", "lit_vlm", "bench", "--suite", "tiny", "--only", "clip", "--configs", str(root / "configs"),
            "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--resamples", "50",
            "--", "--data.init_args.root", str(tmp_path / "world"), "--trainer.max_steps", "2"]
    first = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    assert "[1/1] clip-tiny" in first.stdout and "Report: " in first.stdout
    assert (tmp_path / "report" / "index.html").is_file()
    assert list((tmp_path / "runs" / "clip-tiny").glob("version_*/results.per_sample.json"))
    again = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert again.returncode == 0 and "1 already done" in again.stdout and "[1/1]" not in again.stdout
    data = json.loads((tmp_path / "report" / "leaderboard.json").read_text())
    rows = data["sections"][0]["groups"][0]["rows"]
    assert rows[0]["intervals"] and rows[0]["provenance"]["samples_seen"] == 32  # 2 steps of 16


def test_compare_prints_the_paired_difference_of_two_runs(tmp_path, capsys):
    from lit_vlm.report import main as report

    write_run(tmp_path / "runs/a/version_0", r1=0.75, hits=[1, 0, 1, 1])
    write_run(tmp_path / "runs/b/version_0", r1=1.0, hits=[1, 1, 1, 1])
    report([str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--resamples", "2000",
          "--compare", "a/version_0 (CLIP)", "b/version_0 (CLIP)"])
    comparison = json.loads((tmp_path / "report/leaderboard.json").read_text())["comparison"]["metrics"]["zeroshot/top1"]
    assert comparison["difference"] == pytest.approx(0.25)  # one sample of four flips to right
    # B is not better exactly when a resample misses that sample: (3/4)^4 = 0.316
    assert comparison["p_b_not_better"] == pytest.approx(0.75**4, abs=0.04)
    printed = capsys.readouterr().out
    assert "A: a/version_0 (CLIP)" in printed and "zeroshot/top1  +0.2500 [" in printed
