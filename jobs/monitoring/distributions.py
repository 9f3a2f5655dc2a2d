"""Statistics that compare distributions: PSI, the two-sample KS test, Gini of exposure, list overlap.

Pure functions over numpy arrays, shared by input, drift and output monitoring.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# An empty bin would make PSI infinite; a share this small stands in for zero (the usual convention).
EMPTY_BIN_SHARE = 1e-4
DEFAULT_BINS = 10


@dataclass(frozen=True)
class Histogram:
    """Shares of two samples over the same bins; ``edges`` are the inner bin edges (bins are
    ``(-inf, e0], (e0, e1], ..., (e_last, inf)``)."""

    edges: list[float]
    expected: list[float]
    actual: list[float]


def quantile_edges(reference: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Inner edges at the reference's quantiles; repeated values (point masses) collapse into one bin."""
    finite = reference[np.isfinite(reference)]
    if finite.size == 0:
        return np.array([], dtype=np.float64)
    inner = np.quantile(finite, np.linspace(0.0, 1.0, bins + 1)[1:-1], method="linear")
    return np.unique(inner)


def shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    counts = np.bincount(np.searchsorted(edges, finite, side="left"), minlength=edges.size + 1)
    total = counts.sum()
    return counts / total if total else np.zeros(edges.size + 1)


def histogram(reference: np.ndarray, current: np.ndarray, bins: int = DEFAULT_BINS) -> Histogram:
    edges = quantile_edges(np.asarray(reference, dtype=np.float64), bins)
    return Histogram(
        edges=edges.tolist(),
        expected=shares(np.asarray(reference, dtype=np.float64), edges).tolist(),
        actual=shares(np.asarray(current, dtype=np.float64), edges).tolist(),
    )


def psi_of_shares(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population stability index: sum over bins of (actual - expected) * ln(actual / expected)."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), EMPTY_BIN_SHARE)
    a = np.maximum(np.asarray(actual, dtype=np.float64), EMPTY_BIN_SHARE)
    return float(np.sum((a - e) * np.log(a / e)))


def psi(reference: np.ndarray, current: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """PSI of ``current`` against ``reference`` over ``bins`` quantile bins of the reference.

    Rules of thumb: below 0.1 stable, 0.1-0.25 a moderate shift, above 0.25 a major one.
    """
    found = histogram(reference, current, bins)
    return psi_of_shares(found.expected, found.actual)


@dataclass(frozen=True)
class KsResult:
    statistic: float
    pvalue: float


def ks_test(reference: np.ndarray, current: np.ndarray) -> KsResult:
    """Two-sample Kolmogorov-Smirnov test (scipy): the largest gap between the two empirical CDFs."""
    from scipy.stats import ks_2samp

    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    ref, cur = ref[np.isfinite(ref)], cur[np.isfinite(cur)]
    if ref.size == 0 or cur.size == 0:
        return KsResult(statistic=math.nan, pvalue=math.nan)
    found = ks_2samp(ref, cur)
    return KsResult(statistic=float(found.statistic), pvalue=float(found.pvalue))


def gini(exposure: np.ndarray) -> float:
    """Gini coefficient of exposure counts: 0 when every item is shown equally, near 1 when a few
    items take all the exposure. Items never shown count, with exposure 0."""
    values = np.sort(np.asarray(exposure, dtype=np.float64))
    n = values.size
    total = values.sum()
    if n == 0 or total == 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float(np.sum((2 * ranks - n - 1) * values) / (n * total))


def list_overlap(today: Sequence[str], yesterday: Sequence[str], k: int) -> float:
    """Share of the shorter top-k list that the other top-k list also holds (1.0: same items)."""
    a, b = list(today)[:k], list(yesterday)[:k]
    size = min(len(a), len(b))
    if size == 0:
        return 0.0
    return len(set(a) & set(b)) / size


def quantiles(
    values: np.ndarray, points: Sequence[float] = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
) -> dict[str, float]:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return {}
    found = np.quantile(finite, points)
    return {f"p{round(p * 100)}": float(v) for p, v in zip(points, found, strict=True)}
