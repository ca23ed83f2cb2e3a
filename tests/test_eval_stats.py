"""Seed statistics and paired tests (eval/stats.py) against hand-worked answers and naive references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from eval.stats import bootstrap_ci, mean_std, paired_t_test


def _reference_paired_t(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """t = mean(d) / (sd(d) / √n) with the sample sd; two-sided p from Student's t with n − 1 df."""
    d = np.asarray(a, float) - np.asarray(b, float)
    n = d.size
    t = d.mean() / (d.std(ddof=1) / math.sqrt(n))
    return t, 2 * scipy_stats.t.sf(abs(t), n - 1)


def test_mean_std_known_values():
    s = mean_std([1.0, 2.0, 3.0, 4.0])
    assert s.mean == 2.5 and s.n == 4
    assert s.std == pytest.approx(math.sqrt(5 / 3))  # sample std: Σ(x − 2.5)² = 5, / (n − 1)
    assert mean_std([1.0, 2.0, 3.0, 4.0], ddof=0).std == pytest.approx(math.sqrt(5 / 4))
    assert math.isnan(mean_std([7.0]).std)


def test_paired_t_hand_worked():
    # d = [2, 3, 4]: mean 3, sample sd 1, t = 3 / (1/√3) = √27; df = 2, where the two-sided p is 1 − |t|/√(t² + 2).
    result = paired_t_test([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])
    assert result.mean_diff == pytest.approx(3.0)
    assert result.t == pytest.approx(math.sqrt(27))
    assert result.df == 2
    assert result.p == pytest.approx(1 - math.sqrt(27) / math.sqrt(29))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_t_matches_reference(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(20, 1, 5)
    b = a + rng.normal(0.5, 0.3, 5)
    t, p = _reference_paired_t(a, b)
    result = paired_t_test(a, b)
    assert result.t == pytest.approx(t) and result.p == pytest.approx(p)


def test_paired_t_constant_differences_and_errors():
    assert paired_t_test([2.0, 3.0], [1.0, 2.0]).t == math.inf
    assert paired_t_test([2.0, 3.0], [1.0, 2.0]).p == 0.0
    assert math.isnan(paired_t_test([1.0, 2.0], [1.0, 2.0]).t)
    with pytest.raises(ValueError, match="at least 2"):
        paired_t_test([1.0], [2.0])
    with pytest.raises(ValueError, match="equal lengths"):
        paired_t_test([1.0, 2.0], [2.0])
    with pytest.raises(ValueError, match="NaN"):
        paired_t_test([1.0, math.nan], [2.0, 1.0])


def test_bootstrap_constant_differences_give_a_point_interval():
    ci = bootstrap_ci(np.full(100, 0.25))
    assert (ci.mean, ci.low, ci.high) == (0.25, 0.25, 0.25)


def test_bootstrap_matches_the_normal_approximation_on_large_samples():
    rng = np.random.default_rng(0)
    d = rng.normal(0.3, 2.0, 4000)
    ci = bootstrap_ci(d, n_resamples=2000, seed=1)
    half = 1.959964 * d.std(ddof=1) / math.sqrt(d.size)  # mean of many iid values is ~normal (CLT)
    assert ci.mean == pytest.approx(d.mean())
    assert ci.low == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert ci.high == pytest.approx(d.mean() + half, abs=0.1 * half)


def test_bootstrap_is_reproducible_and_shift_equivariant():
    d = np.random.default_rng(3).normal(0, 1, 200)
    a, b = bootstrap_ci(d, n_resamples=500, seed=7), bootstrap_ci(d, n_resamples=500, seed=7)
    assert a == b
    shifted = bootstrap_ci(d + 5.0, n_resamples=500, seed=7)
    assert shifted.low == pytest.approx(a.low + 5.0) and shifted.high == pytest.approx(a.high + 5.0)
    assert a.low < a.mean < a.high
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(d, confidence=1.5)


def test_bootstrap_by_image_keeps_the_seeds_of_an_image_together():
    """3 seeds × 200 images whose effect repeats across seeds: only 200 independent units, not 600."""
    rng = np.random.default_rng(0)
    effect = rng.normal(0.2, 1.0, 200)
    diffs = np.concatenate([effect + rng.normal(0, 0.1, 200) for _ in range(3)])  # seed-major, as the report pairs
    images = np.tile(np.arange(200), 3)
    by_image = bootstrap_ci(diffs, n_resamples=4000, seed=1, units=images)
    per_pair = bootstrap_ci(diffs, n_resamples=4000, seed=1)
    per_image_means = diffs.reshape(3, 200).mean(axis=0)
    assert by_image.n == 200 and per_pair.n == 600 and by_image.mean == pytest.approx(diffs.mean())
    half = 1.959964 * per_image_means.std(ddof=1) / math.sqrt(200)  # the image-level width (CLT)
    assert by_image.high - by_image.low == pytest.approx(2 * half, rel=0.1)
    assert (by_image.high - by_image.low) / (per_pair.high - per_pair.low) > 1.6  # pairs as units: ~√3 too narrow
    # equal seeds per image: the same interval as bootstrapping the per-image means
    means_only = bootstrap_ci(per_image_means, n_resamples=4000, seed=1)
    assert (by_image.low, by_image.high) == pytest.approx((means_only.low, means_only.high), rel=1e-9)
    with pytest.raises(ValueError, match="one unit per difference"):
        bootstrap_ci(diffs, units=images[:10])
