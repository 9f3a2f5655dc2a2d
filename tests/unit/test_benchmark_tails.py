"""The serving benchmark merges its phases' latency tails: the merge must give the percentile of all
their requests together, which neither a mean nor a median of the phases' own percentiles is."""

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.serving import TAIL_LEVELS, merged_percentile, pooled_logging_cost


def phase(latencies_ms: np.ndarray) -> dict[str, object]:
    """What wrk reports of a phase: its count, its tail's quantile function and its maximum."""
    return {
        "requests": len(latencies_ms),
        "tail_ms": np.percentile(latencies_ms, TAIL_LEVELS, method="inverted_cdf").tolist(),
        "max_ms": float(latencies_ms.max()),
    }


@pytest.mark.parametrize("level", [95.0, 99.0, 99.9])
def test_merged_percentile_is_the_percentile_of_all_requests(level: float) -> None:
    rng = np.random.default_rng(7)
    # Phases of different sizes and speeds, as on a machine whose speed drifts.
    samples = [
        np.round(rng.lognormal(np.log(median), 0.6, size), 3)
        for median, size in ((1.0, 40_000), (1.6, 25_000), (0.8, 60_000))
    ]
    together = np.concatenate(samples)
    merged = merged_percentile([phase(sample) for sample in samples], level)
    exact = float(np.percentile(together, level, method="inverted_cdf"))
    assert merged == pytest.approx(exact, rel=0.01)
    # The phases' own percentiles disagree by far more than that: merging is not averaging them.
    own = [float(np.percentile(sample, level)) for sample in samples]
    assert max(own) / min(own) > 1.5


def test_one_phase_gives_its_own_percentile() -> None:
    latencies = np.round(np.random.default_rng(3).exponential(2.0, 50_000), 3)
    assert merged_percentile([phase(latencies)], 99) == float(np.percentile(latencies, 99, method="inverted_cdf"))


def test_pooling_runs_takes_every_pair_and_refuses_a_run_without_pairs(tmp_path: Path) -> None:
    runs = [[1.2, 0.9, 1.1], [1.0, 1.3]]
    paths = []
    for n, pairs in enumerate(runs):
        path = tmp_path / f"run{n}.json"
        path.write_text(json.dumps({"prediction_log_cost": {"p99_ratio_1_to_0_by_pair": pairs}}))
        paths.append(str(path))
    pooled = pooled_logging_cost(paths)
    every = [ratio for pairs in runs for ratio in pairs]
    assert (pooled["runs"], pooled["pairs"]) == (2, 5)
    assert pooled["p99_ratio_geometric_mean"] == pytest.approx(float(np.exp(np.mean(np.log(every)))), abs=0.001)
    low, high = pooled["p99_ratio_geometric_mean_95ci"]
    assert min(every) <= low < pooled["p99_ratio_geometric_mean"] < high <= max(every)
    assert pooled["p99_ratio_median"] == 1.1 and pooled["p99_ratio_range"] == [0.9, 1.3]

    flat_out_only = tmp_path / "flat.json"
    flat_out_only.write_text(json.dumps({"benchmark": "serving"}))
    with pytest.raises(SystemExit, match="no prediction_log_cost pairs"):
        pooled_logging_cost([*paths, str(flat_out_only)])
