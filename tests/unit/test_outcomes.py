"""Every step's result says what the run history records of it: rows in and out, the batch and model it
published or used, and whether those are the night's production ones."""

from jobs import workdir
from jobs.rollouts.shadow import ShadowResult
from jobs.steps.ingest import IngestResult
from jobs.steps.publish import PublishResult
from jobs.steps.score import ScoredShards
from jobs.steps.train import TrainResult


def manifest(shard: int, users: int, rows: int) -> workdir.ShardManifest:
    return workdir.ShardManifest("2026-11-20", shard, 2, "m1", users, 0, rows, "2026-11-21T00:00:00", f"s{shard}")


def test_rows_in_and_out_of_each_step_and_the_nights_batch_and_model() -> None:
    ingested = IngestResult("2026-11-20", "src", "csv", 10, 8, 2, {"duplicate": 2}, 0.2, 1, 3, 4, None, None, None)
    assert (ingested.outcome().rows_in, ingested.outcome().rows_out) == (10, 8)
    trained = TrainResult("2026-11-20", True, "m2", "rejected", "gate", "m1", {"ndcg@10": 0.3}, training_rows=42)
    assert (trained.outcome().rows_in, trained.outcome().model_id) == (42, "m1")  # the model that scores the night
    scored = ScoredShards([manifest(0, 5, 100), manifest(1, 3, 50)]).outcome()
    assert (scored.rows_in, scored.rows_out, scored.model_id, scored.batch_id) == (150, 8, "m1", None)
    published = PublishResult("2026-11-20", 17, "m1", 8, True, "newest date").outcome()
    assert (published.rows_out, published.batch_id, published.model_id, published.production) == (8, 17, "m1", True)
    shadow = ShadowResult("2026-11-20", "m9", 18, 8).outcome()
    assert (shadow.batch_id, shadow.model_id, shadow.production) == (18, "m9", False)  # its own, not the night's
    assert "18" in shadow.summary and "m9" in shadow.summary
