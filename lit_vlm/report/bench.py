"""``lit-vlm bench``: run a suite of configs (fit, then test the best checkpoint) and build the report.

    lit-vlm bench --suite quickstart                 # every configs/*/quickstart.yaml, seed 0
    lit-vlm bench --suite tiny --seeds 0 1 2         # the smoke suite, three seeds
    lit-vlm bench --suite quickstart --only clip lit -- --trainer.max_epochs 1
    lit-vlm bench --only coca --merge benchmarks/leaderboard/quickstart/leaderboard.json   # add a family

Each run is a ``lit-vlm fit`` and a ``lit-vlm test --ckpt_path best`` (``last`` when the fit never
validated) in a subprocess, logged to
``<runs>/<name>/bench.log``; ``<name>`` is the config's own run name (seed 0) or ``<name>-seed<S>``.
A run whose ``results.json`` exists is skipped, so an interrupted bench continues where it stopped.
Configs that start from another run (``init_from``, e.g. LiT from the CLIP quickstart) run last.
Arguments after ``--`` go to every fit and test (another data root, fewer epochs, ...).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml

from lit_vlm.errors import UserError

__all__ = ["main", "suite_configs"]


def suite_configs(suite: str, configs_dir: Path, only: list[str] | None = None) -> list[Path]:
    """The suite's configs (``<configs_dir>/*/<suite>.yaml``), those that start from another run last."""
    found = sorted(configs_dir.glob(f"*/{suite}.yaml"))
    if only:
        found = [c for c in found if c.parent.name in only]
    if not found:
        raise UserError(f"lit-vlm bench: no {configs_dir}/*/{suite}.yaml" + (f" among {only}" if only else ""))

    def starts_from_a_run(config: Path) -> bool:
        model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
        return bool((model.get("init_args") or {}).get("init_from"))

    return sorted(found, key=starts_from_a_run)


def _run_name(config: Path, seed: int) -> str:
    logger = ((yaml.safe_load(config.read_text()) or {}).get("trainer") or {}).get("logger") or {}
    name = (logger.get("init_args") or {}).get("name") if isinstance(logger, dict) else None
    name = name or f"{config.parent.name}-{config.stem}"
    return name if seed == 0 else f"{name}-seed{seed}"


def _tested_checkpoint(runs: Path, name: str) -> str:
    """``best``, or ``last`` when the fit never validated (its index has no best)."""
    import json

    indexes = sorted((runs / name).glob("version_*/checkpoints/index.json"), key=lambda p: p.stat().st_mtime)
    if indexes:
        try:
            if json.loads(indexes[-1].read_text(encoding="utf-8")).get("best") is None:
                return "last"
        except (OSError, ValueError):
            pass
    return "best"


def _done(runs: Path, name: str) -> bool:
    return any((runs / name).glob("version_*/results.json"))


def _format(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    parser = argparse.ArgumentParser(prog="lit-vlm bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="quickstart", help="config file stem to run in every family folder (quickstart, tiny)")
    parser.add_argument("--configs", default="configs", help="the configs folder (default: configs)")
    parser.add_argument("--only", nargs="*", help="family folders to run (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--runs", default="runs", help="where the runs are written (the logger's save_dir)")
    parser.add_argument("--out", default=None, help="report folder (default: reports/<suite>)")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--merge", nargs="+", default=[], metavar="LEADERBOARD_JSON",
                        help="earlier reports whose rows join the report (see `lit-vlm report --merge`)")
    args = parser.parse_args(argv)
    configs = suite_configs(args.suite, Path(args.configs), args.only)
    runs = Path(args.runs)
    plan = [(c, s) for s in args.seeds for c in configs]
    todo = [(c, s) for c, s in plan if not _done(runs, _run_name(c, s))]
    print(f"lit-vlm bench: {len(plan)} run(s) in suite {args.suite!r}, {len(plan) - len(todo)} already done", flush=True)
    failed, took = [], []
    for i, (config, seed) in enumerate(todo, 1):
        name = _run_name(config, seed)
        left = f", about {_format(sum(took) / len(took) * (len(todo) - i + 1))} left" if took else ""
        print(f"[{i}/{len(todo)}] {name} ({config}){left}", flush=True)
        common = ["--config", str(config), "--seed_everything", str(seed), "--trainer.logger.init_args.save_dir", str(runs),
                  "--trainer.logger.init_args.name", name, "--trainer.enable_progress_bar", "false", *extra]
        (runs / name).mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(runs / name / "bench.log", "a", encoding="utf-8") as log:
            for step in ("fit", "test"):
                command = ["fit"] if step == "fit" else ["test", "--ckpt_path", _tested_checkpoint(runs, name)]
                code = subprocess.call([sys.executable, "-m", "lit_vlm", *command, *common], stdout=log, stderr=subprocess.STDOUT)
                if code != 0:
                    failed.append(name)
                    print(f"    {step} failed (exit {code}); see {runs / name / 'bench.log'}", flush=True)
                    break
        took.append(time.perf_counter() - start)
        print(f"    {_format(took[-1])}", flush=True)
    from lit_vlm.report import build_report

    finished = [str(runs / _run_name(c, s)) for c, s in plan if _done(runs, _run_name(c, s))]
    if not finished:
        print(f"lit-vlm bench: no run of the suite finished ({', '.join(failed)} failed)", file=sys.stderr)
        return 1
    files = build_report(finished,
                         args.out or f"reports/{args.suite}", resamples=args.resamples, title=f"lit-vlm {args.suite} leaderboard",
                         merge=args.merge)
    print(f"Report: {files['html'].resolve()}\n  Markdown: {files['markdown'].resolve()}")
    if failed:
        print(f"lit-vlm bench: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
