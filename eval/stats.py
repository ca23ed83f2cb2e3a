"""Seed statistics and paired significance tests for Table 9 and beyond; pure functions on arrays.

FID exists once per (method, scale, seed), so methods are compared with a paired t-test over seeds. CLIP score
exists per image, so methods are compared with a bootstrap CI of per-image differences paired by (seed, image) that
resamples images (all seeds of an image together).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as _scipy_stats


@dataclass(frozen=True)
class MeanStd:
    """Mean and standard deviation of `n` values (Table 9 reports mean ± std over seeds)."""

    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class PairedTTest:
    """Paired t-test of a − b: mean difference, t statistic, two-sided p-value, degrees of freedom."""

    mean_diff: float
    t: float
    p: float
    df: int


@dataclass(frozen=True)
class BootstrapCI:
    """Mean of the differences and its percentile bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    confidence: float
    n: int


def _as_1d(values: object, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or inf")
    return array


def mean_std(values: object, ddof: int = 1) -> MeanStd:
    """Mean ± std over seeds; `ddof=1` (sample std) by default, NaN std for a single value.

    Deviation: the paper (App. F) does not say which std it reports; the sample std is the usual choice.
    """
    array = _as_1d(values, "values")
    std = float(np.std(array, ddof=ddof)) if array.size > ddof else math.nan
    return MeanStd(float(np.mean(array)), std, int(array.size))


def paired_t_test(a: object, b: object) -> PairedTTest:
    """Paired two-sided t-test of a − b (e.g. per-seed FID of a method minus CFG at the same seeds).

    Needs at least two pairs; differences that are all equal give t = ±inf (p = 0) or NaN when all zero.
    """
    a, b = _as_1d(a, "a"), _as_1d(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal lengths, got {a.size} and {b.size}")
    if a.size < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {a.size}")
    diff = a - b
    if np.all(diff == diff[0]):
        t = math.copysign(math.inf, diff[0]) if diff[0] != 0 else math.nan
        return PairedTTest(float(diff[0]), t, 0.0 if diff[0] != 0 else math.nan, int(a.size - 1))
    result = _scipy_stats.ttest_rel(a, b)
    return PairedTTest(float(np.mean(diff)), float(result.statistic), float(result.pvalue), int(a.size - 1))


def _ratio_of_sums(sums: np.ndarray, counts: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.sum(sums, axis=axis) / np.sum(counts, axis=axis)


def bootstrap_ci(
    diffs: object,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
    batch: int = 200,
    units: object | None = None,
) -> BootstrapCI:
    """Percentile bootstrap CI of the mean of paired differences (e.g. per-image CLIP of a method minus CFG).

    `units`: the resampling unit of each difference (e.g. its image id). The bootstrap then draws units, each with all
    its differences (every seed of an image together), and the statistic is the mean over the drawn differences; an
    image's effect repeated across seeds is not counted as independent evidence. Without `units` every difference is
    its own unit. `n` of the result is the number of units. Wraps `scipy.stats.bootstrap`; `batch` resamples are drawn
    at a time to bound memory for 30k-image sets.
    """
    diffs = _as_1d(diffs, "diffs")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if units is None:
        sums, counts = diffs, np.ones_like(diffs)
    else:
        labels = np.asarray(units)
        if labels.shape != diffs.shape:
            raise ValueError(f"need one unit per difference, got {labels.shape} for {diffs.shape}")
        _, inverse = np.unique(labels, return_inverse=True)
        sums, counts = np.bincount(inverse, weights=diffs), np.bincount(inverse).astype(np.float64)
    mean = float(np.mean(diffs))
    if sums.size == 1 or np.all(diffs == diffs[0]):
        return BootstrapCI(mean, mean, mean, confidence, int(sums.size))
    result = _scipy_stats.bootstrap(
        (sums, counts),
        _ratio_of_sums,
        paired=True,
        vectorized=True,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        batch=batch,
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return BootstrapCI(mean, float(interval.low), float(interval.high), confidence, int(sums.size))
