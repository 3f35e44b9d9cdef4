"""Uncertainty of evaluation numbers: bootstrap intervals over evaluation samples, seeds, paired tests.

Evaluations store, per sample, the numerator and denominator of every metric that is a ratio of sums
(``metric = sum(num) / sum(den)``: recall@k, accuracy, means of per-image scores; see
``EvalCallback.sample_scores``). The bootstrap draws the samples with replacement ``resamples``
times, recomputes the ratio each time and reports the percentile interval (Efron & Tibshirani,
1993, ch. 13). A metric that is the mean of other ratios (``rmean``) is recomputed from its parts on
the same draws. A *paired* comparison of two runs draws the same samples for both (they must have
been evaluated on the same sample ids) and gives the interval of the difference and the fraction of
draws in which the second run does not beat the first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "bootstrap", "paired_difference", "seed_summary"]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided ``level`` percentile interval."""

    value: float
    low: float
    high: float
    level: float = 0.95


def _draws(units: int, resamples: int, seed: int) -> np.ndarray:
    """``[resamples, units]`` indices drawn with replacement (the same for every metric of a run)."""
    return np.random.default_rng(seed).integers(0, units, size=(resamples, units))


def _ratios(num: np.ndarray, den: np.ndarray, draws: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return num[draws].sum(1) / den[draws].sum(1)  # [resamples]; NaN where a draw has no denominator


def _interval(value: float, stats: np.ndarray, level: float) -> Interval:
    stats = stats[np.isfinite(stats)]
    alpha = (1 - level) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha]) if stats.size else (np.nan, np.nan)
    return Interval(float(value), float(low), float(high), level)


def bootstrap(
    metrics: Mapping[str, Mapping[str, Sequence[float]]],
    mean_of: Mapping[str, Sequence[str]] | None = None,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """Percentile intervals of every ratio metric (``{name: {"num": [U], "den": [U]}}``) and of
    every ``mean_of`` metric, from the same ``resamples`` draws of the U samples."""
    arrays = {k: (np.asarray(v["num"], dtype=float), np.asarray(v["den"], dtype=float)) for k, v in metrics.items()}
    if not arrays:
        return {}
    units = len(next(iter(arrays.values()))[0])
    draws = _draws(units, resamples, seed)
    stats = {k: _ratios(n, d, draws) for k, (n, d) in arrays.items()}
    out = {k: _interval(n.sum() / d.sum(), stats[k], level) for k, (n, d) in arrays.items()}
    for name, parts in (mean_of or {}).items():
        if all(p in stats for p in parts):
            value = float(np.mean([out[p].value for p in parts]))
            out[name] = _interval(value, np.mean([stats[p] for p in parts], axis=0), level)
    return out


def paired_difference(
    a: Mapping[str, Sequence], b: Mapping[str, Sequence], resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[Interval, float]:
    """B minus A on the samples both were evaluated on, each given as ``{"ids", "num", "den"}``.

    Returns the difference with its interval and the one-sided bootstrap p-value: the fraction of
    draws in which B is not better than A."""
    index_b = {sid: i for i, sid in enumerate(b["ids"])}
    shared = [(i, index_b[sid]) for i, sid in enumerate(a["ids"]) if sid in index_b]
    if not shared:
        raise ValueError("the two runs share no evaluated sample: a paired comparison needs the same samples")
    ia, ib = (np.array(x) for x in zip(*shared))
    na, da = np.asarray(a["num"], float)[ia], np.asarray(a["den"], float)[ia]
    nb, db = np.asarray(b["num"], float)[ib], np.asarray(b["den"], float)[ib]
    draws = _draws(len(shared), resamples, seed)
    diffs = _ratios(nb, db, draws) - _ratios(na, da, draws)
    value = nb.sum() / db.sum() - na.sum() / da.sum()
    finite = diffs[np.isfinite(diffs)]
    return _interval(value, diffs, level), float((finite <= 0).mean()) if finite.size else float("nan")


def seed_summary(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value) across seeds."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0
