"""PSI, KS, Gini, list overlap and histogram quantiles against cases computed by hand."""

import math

import numpy as np
import pytest

from console.service_metrics import _quantile
from jobs.monitoring.distributions import (
    gini,
    histogram,
    ks_test,
    list_overlap,
    psi,
    psi_of_shares,
    quantile_edges,
    quantiles,
)


def test_psi_of_shares_by_hand() -> None:
    # (0.5 - 0.25) ln 2 + 0 + (0.25 - 0.5) ln 0.5 = 0.5 ln 2
    assert psi_of_shares([0.25, 0.25, 0.5], [0.5, 0.25, 0.25]) == pytest.approx(0.5 * math.log(2))


def test_psi_over_quantile_bins_by_hand() -> None:
    # two bins split at the reference median 2.5: reference 50/50, current 75/25
    expected = 0.25 * math.log(0.75 / 0.5) + (-0.25) * math.log(0.25 / 0.5)
    assert psi(np.array([1.0, 2, 3, 4]), np.array([1.0, 1, 1, 4]), bins=2) == pytest.approx(expected)


def test_psi_is_zero_for_the_same_distribution_and_symmetric_in_its_terms() -> None:
    sample = np.arange(100, dtype=float)
    assert psi(sample, sample) == 0.0
    assert psi(sample, sample[::-1].copy()) == 0.0


def test_an_empty_bin_counts_as_a_tiny_share_not_infinity() -> None:
    # all of the current sample falls above the reference's largest value
    value = psi(np.array([1.0, 2, 3, 4]), np.array([9.0, 9, 9, 9]), bins=2)
    assert math.isfinite(value)
    # bins (-inf, 2.5], (2.5, inf): reference 0.5/0.5, current 0 (as 1e-4) and 1
    assert value == pytest.approx((1e-4 - 0.5) * math.log(1e-4 / 0.5) + 0.5 * math.log(2))


def test_point_masses_share_one_bin() -> None:
    reference = np.array([0.0] * 8 + [5.0, 7.0])
    edges = quantile_edges(reference, bins=10)
    assert list(edges) == sorted(set(edges))  # no bin repeated
    found = histogram(reference, reference, bins=10)
    assert found.expected[0] == pytest.approx(0.8)  # every zero in the first bin
    assert sum(found.expected) == pytest.approx(1.0)


def test_ks_statistic_by_hand() -> None:
    # empirical CDFs of 1..4 and 3..6 are furthest apart at 2 (0.5 against 0)
    assert ks_test(np.array([1.0, 2, 3, 4]), np.array([3.0, 4, 5, 6])).statistic == pytest.approx(0.5)
    separated = ks_test(np.array([1.0, 2, 3]), np.array([4.0, 5, 6]))
    assert separated.statistic == 1.0
    assert separated.pvalue == pytest.approx(0.1)  # exact two-sided p for n = m = 3, D = 1: 2 / C(6, 3)
    assert ks_test(np.array([1.0, 2]), np.array([1.0, 2])).statistic == 0.0
    assert math.isnan(ks_test(np.array([]), np.array([1.0])).statistic)


def test_gini_of_exposure_by_hand() -> None:
    assert gini(np.array([5, 5, 5, 5])) == 0.0
    assert gini(np.array([0, 0, 0, 10])) == pytest.approx(0.75)  # sum((2i - n - 1) x) / (n sum x) = 30 / 40
    assert gini(np.array([4, 1, 3, 2])) == pytest.approx(10 / 40)
    assert gini(np.array([])) == 0.0


def test_list_overlap_counts_the_shorter_top_k() -> None:
    assert list_overlap(["a", "b", "c"], ["c", "d", "a"], k=3) == pytest.approx(2 / 3)
    assert list_overlap(["a", "b", "c"], ["c", "d", "a"], k=2) == 0.0
    assert list_overlap(["a", "b", "c"], ["b"], k=10) == 1.0
    assert list_overlap([], ["a"], k=10) == 0.0


def test_quantiles_skip_non_finite_values() -> None:
    found = quantiles(np.array([1.0, 2, 3, 4, 5, np.nan, np.inf]), points=(0.5,))
    assert found == {"p50": 3.0}


def test_latency_quantile_from_cumulative_buckets_like_prometheus() -> None:
    buckets = {0.001: 50.0, 0.01: 100.0, math.inf: 100.0}
    assert _quantile(buckets, 0.5) == pytest.approx(0.001)
    assert _quantile(buckets, 0.75) == pytest.approx(0.001 + 0.009 * 0.5)
    assert math.isnan(_quantile({}, 0.5))
