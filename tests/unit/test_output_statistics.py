"""The publish gate's list statistics, shard by shard, equal those of one pass over every shard."""

from pathlib import Path

import numpy as np
import polars as pl

from jobs.monitoring.outputs import OVERLAP_K, SCORE_SAMPLE_USERS, _sample, list_statistics


def test_list_statistics_shard_by_shard_equal_one_pass(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    files = []
    for shard in range(3):
        lengths = rng.integers(0, 14, size=500)  # some empty and some short lists
        frame = pl.DataFrame(
            {
                "user_id": [f"u{shard}-{n}" for n in range(500)],
                "item_ids": [[f"i{x}" for x in rng.integers(0, 300, size=size)] for size in lengths],
                "scores": [sorted(rng.random(size).tolist(), reverse=True) for size in lengths],
            },
            schema={"user_id": pl.String, "item_ids": pl.List(pl.String), "scores": pl.List(pl.Float32)},
        )
        files.append(tmp_path / f"shard-{shard}.parquet")
        frame.write_parquet(files[-1])
    n_lists, short_at = 1500, 10

    empty, short, mean_length, exposure, scores, tops, sample = list_statistics(files, n_lists, short_at)

    lists = pl.read_parquet([str(f) for f in files])
    lengths = lists["item_ids"].list.len()
    assert (empty, short) == ((lengths == 0).sum(), (lengths < short_at).sum())
    assert mean_length == lengths.mean()
    expected = lists.select(pl.col("item_ids").explode().alias("item_id")).drop_nulls().group_by("item_id").len()
    assert exposure.sort("item_id").equals(expected.sort("item_id").cast({"len": exposure["len"].dtype}))
    sampled = lists.filter(_sample(n_lists, SCORE_SAMPLE_USERS, seed=11))
    assert scores["scores"].to_list() == sampled.select(pl.col("scores").explode()).drop_nulls()["scores"].to_list()
    assert tops.equals(lists.select(pl.col("scores").list.first()).drop_nulls())
    assert sample.equals(sampled.select("user_id", pl.col("item_ids").list.head(OVERLAP_K).alias("item_id")))
