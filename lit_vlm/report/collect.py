"""Reading runs for a report: ``results.json`` files, the ``fit.json`` of the run that trained each
checkpoint, per-sample scores, and what makes two numbers comparable (the protocol).

A *protocol* is everything that changes what a number means besides the model: the dataset's name,
split, generation config and annotation files (by SHA-256), and the evaluation's own settings (k of
recall@k, zero-shot class names and templates, the caption evaluator's version, ...). Numbers with
different protocols are never averaged or ranked together.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_vlm.errors import MissingFileError, UserError

__all__ = ["Run", "find_results", "load_runs", "protocol_of"]

RESULTS_GLOB = "results*.json"


@dataclass
class Run:
    """One ``results.json`` and what belongs to it."""

    path: Path
    results: dict[str, Any]
    fit: dict[str, Any] | None = None  # fit.json of the run that wrote the checkpoint
    fit_dir: Path | None = None  # that run's directory (TensorBoard events, checkpoints)
    per_sample: dict[str, Any] = field(default_factory=dict)  # evaluation prefix -> per-sample scores
    label: str = ""

    @property
    def metrics(self) -> dict[str, float]:
        return self.results.get("metrics") or {}

    @property
    def seed(self) -> int | None:
        return (self.results.get("config") or {}).get("seed_everything")

    def tasks(self) -> dict[str, dict[str, float]]:
        """Evaluation prefix -> {metric: value} (``test/<prefix>/<metric>``; baselines kept apart)."""
        out: dict[str, dict[str, float]] = {}
        for key, value in self.metrics.items():
            stage, _, rest = key.partition("/")
            prefix, _, name = rest.partition("/")
            if stage == "test" and name:
                out.setdefault(prefix, {})[name] = float(value)
        return out

    def config_key(self) -> str:
        """The run's config without what a seed sweep or another output folder changes."""
        config = json.loads(json.dumps(self.results.get("config") or {}))
        config.pop("seed_everything", None)
        config.pop("ckpt_path", None)
        trainer = config.get("trainer") or {}
        for key in ("logger", "default_root_dir", "callbacks"):
            trainer.pop(key, None)
        data_args = (config.get("data") or {}).get("init_args") or {}
        data_args.pop("seed", None)
        return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def find_results(paths: list[str]) -> list[Path]:
    """``results*.json`` files named, found under run folders, or matched by globs (sorted, unique)."""
    found: list[Path] = []
    for spec in paths:
        matches = [Path(p) for p in sorted(glob.glob(spec, recursive=True))] or [Path(spec)]
        for match in matches:
            if match.is_dir():
                found += sorted(p for p in match.rglob(RESULTS_GLOB) if not p.name.endswith(".per_sample.json"))
            elif match.is_file():
                found.append(match)
            else:
                raise MissingFileError(f"lit-vlm report: {spec!r} is neither a results file nor a run folder")
    unique = sorted({p.resolve() for p in found})
    if not unique:
        raise UserError(f"lit-vlm report: no results.json under {paths} (run `lit-vlm test` first)")
    return unique


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"lit-vlm report: cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or "metrics" not in data:
        raise UserError(f"lit-vlm report: {path} is not a lit-vlm results.json (no 'metrics')")
    return data


def _fit_of(results: dict[str, Any]) -> tuple[dict[str, Any] | None, Path | None]:
    """``fit.json`` of the run whose checkpoint was tested: ``<run>/checkpoints/x.ckpt`` -> ``<run>``."""
    ckpt = results.get("checkpoint")
    if not ckpt:
        return None, None
    run_dir = Path(ckpt).parent.parent
    fit_file = run_dir / "fit.json"
    try:
        return json.loads(fit_file.read_text(encoding="utf-8")), run_dir
    except (OSError, ValueError):
        return None, run_dir if run_dir.is_dir() else None


def load_runs(paths: list[str]) -> list[Run]:
    """Every results file of ``paths`` with its fit record and per-sample scores."""
    runs = []
    for path in find_results(paths):
        results = _read(path)
        fit, fit_dir = _fit_of(results)
        per_sample: dict[str, Any] = {}
        for prefix, info in (results.get("evaluations") or {}).items():
            name = info.get("per_sample") if isinstance(info, dict) else None
            if name and (path.parent / name).is_file():
                per_sample[prefix] = json.loads((path.parent / name).read_text(encoding="utf-8")).get(prefix)
        runs.append(Run(path, results, fit, fit_dir, per_sample))
    common = Path(os.path.commonpath([str(r.path.parent) for r in runs])) if len(runs) > 1 else None
    for run in runs:  # "<its folder, relative to what all runs share; one run: <run>/<version>> (<family class>)"
        folder = Path(*run.path.parent.parts[-2:]) if common is None else run.path.parent.relative_to(common)
        name = str(folder) if str(folder) != "." else run.path.parent.name
        run.label = f"{name} ({run.results.get('family', '?')})" + (f" [{run.path.stem}]" if run.path.stem != "results" else "")
    return runs


def protocol_of(run: Run, prefix: str) -> dict[str, Any]:
    """What a number of this evaluation means besides the model (see the module docstring)."""
    dataset = (run.results.get("task") or {}).get("dataset") or {}
    annotations = {k: v.get("sha256", "")[:16] for k, v in (dataset.get("annotations") or {}).items() if isinstance(v, dict)}
    evaluation = ((run.results.get("evaluations") or {}).get(prefix) or {}).get("protocol") or {}
    return {
        "dataset": dataset.get("name"),
        "split": dataset.get("split"),
        "dataset_config": (dataset.get("config_sha256") or "")[:16] or None,
        "annotations": annotations,
        "shards": None if dataset.get("root") else dataset.get("shards"),
        "evaluation": evaluation,
    }
