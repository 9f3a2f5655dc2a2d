"""Where a date's work files live (a folder per logical date under ``OVERNIGHT_DATA_DIR/work/``), and what a step
finds there or is told to make first: a missing input fails with one line naming the step to run; only the nightly
runner (``jobs.nightly``) decides what to (re)compute.
"""

import json
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from upath import UPath

from common.text import some
from jobs import storage
from jobs.errors import MissingDataError
from jobs.outcome import Outcome
from jobs.settings import Settings

CANDIDATE_TABLES = ("popular", "neighbours", "similar", "genre_popular", "item_genres")
FEATURE_TABLES = ("item_features", "item_genres")
USERS = "users"  # every user with history as of the date, sorted: what the score shards split
# What the candidates step makes for publish to load beside the user lists (sql.BATCH_TABLES)
SIMILAR_ITEMS = "similar_items"  # item_id, item_ids, scores: each item's neighbours, best first
ITEM_ATTRIBUTES = "item_attributes"  # item_id, popularity, attributes (JSON text): every catalogue item
SEGMENTS = "segments"  # segment, item_ids, scores: each user segment's popular list (none without segments)
USER_SEGMENTS = "user_segments"  # user_id, segment: users with attributes whom the date's USERS lack
BATCH_EXTRAS = (SIMILAR_ITEMS, ITEM_ATTRIBUTES, SEGMENTS, USER_SEGMENTS)
CANDIDATE_SETTINGS = "candidate_settings.json"  # the settings the candidates step built the tables with


def root(settings: Settings) -> UPath:
    """Every date's folder lives under this."""
    return settings.data_dir / "work"


def scratch_root(settings: Settings) -> Path:
    """The scratch folders of one-off jobs (evaluation, backtests): under ``root`` when the data folder is
    local, on this machine otherwise."""
    return settings.machine_dir / "work"


def folder(settings: Settings, logical_date: date) -> UPath:
    return root(settings) / f"date={logical_date.isoformat()}"


def table_path(settings: Settings, logical_date: date, name: str) -> UPath:
    return table_in(folder(settings, logical_date), name)


def table_in(date_folder: UPath, name: str) -> UPath:
    """The file of table `name` in a date's folder (`folder`, `require_tables`)."""
    return date_folder / f"{name}.parquet"


def candidate_settings_path(settings: Settings, logical_date: date) -> UPath:
    return folder(settings, logical_date) / CANDIDATE_SETTINGS


def ingest_staging(settings: Settings, logical_date: date) -> Path:
    """A new folder of this ingest's own: two ingests of one date at once must not share (or delete) one."""
    parent = scratch_root(settings) / f"date={logical_date.isoformat()}"
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="ingest-staging-", dir=parent))


def ingest_report_path(settings: Settings, logical_date: date) -> UPath:
    return settings.reports_dir / "ingest" / f"date={logical_date.isoformat()}.json"


def missing(what: str, logical_date: date, step: str, where: Path | UPath | str) -> MissingDataError:
    """The one-line error of a step whose input is not there: what, where, and the step that makes it."""
    return MissingDataError(
        f"no {what} for {logical_date} in {where}: run the {step} step first "
        f"(`overnight {step} --date {logical_date}`, or `overnight run`)"
    )


def require_tables(settings: Settings, logical_date: date) -> UPath:
    """The date's folder, once the candidates and features steps have written their tables there."""
    for step, names in (("candidates", (*CANDIDATE_TABLES, USERS)), ("features", FEATURE_TABLES)):
        absent = [name for name in names if not table_path(settings, logical_date, name).exists()]
        if absent:
            raise missing(f"{step} tables ({', '.join(absent)})", logical_date, step, folder(settings, logical_date))
    return folder(settings, logical_date)


def require_batch_extras(settings: Settings, logical_date: date) -> dict[str, UPath]:
    """The path of each of the date's BATCH_EXTRAS, once the candidates step has written them."""
    paths = {name: table_path(settings, logical_date, name) for name in BATCH_EXTRAS}
    absent = [name for name, path in paths.items() if not path.exists()]
    if absent:
        where = folder(settings, logical_date)
        raise missing(f"candidates tables ({', '.join(absent)})", logical_date, "candidates", where)
    return paths


# ---------------------------------------------------------------------------- score shards


@dataclass(frozen=True)
class ShardManifest:
    """One scored shard, as the score step writes it beside the shard and publish reads it."""

    logical_date: str
    shard: int
    shards: int
    model_id: str
    users: int
    users_without_candidates: int
    candidate_rows: int
    generated_at: str
    path: str
    seconds: float = 0.0
    predict_seconds: float = 0.0  # inside the model's predict: the ceiling the rest of scoring is measured against
    predictor: str = "lightgbm"  # what ran the model: "tl2cgen" (compiled) or "lightgbm" (jobs.predictor)

    def outcome(self) -> Outcome:
        summary = f"shard {self.shard} of {self.shards}: {self.users:,} users, {self.candidate_rows:,} candidates"
        return Outcome(summary, rows_in=self.candidate_rows, rows_out=self.users, model_id=self.model_id)


def scores_dir(settings: Settings, logical_date: date, model_id: str | None = None) -> UPath:
    """Production's shards in ``scores/``; a chosen model's (a shadow, a canary) in
    ``model-scores/<model_id>/``, so a shadow and a canary of the same night never mix."""
    day = folder(settings, logical_date)
    return day / "scores" if model_id is None else day / "model-scores" / model_id


def shard_name(shard: int, shards: int) -> str:
    return f"shard-{shard:05d}-of-{shards:05d}"


def shard_path(settings: Settings, logical_date: date, shard: int, shards: int, model_id: str | None = None) -> UPath:
    return scores_dir(settings, logical_date, model_id) / f"{shard_name(shard, shards)}.parquet"


def manifest_path(shard: UPath) -> UPath:
    return shard.with_suffix(".json")


def read_manifests(settings: Settings, logical_date: date, model_id: str | None = None) -> list[ShardManifest]:
    """The manifests of one complete set of shards for the date (of `model_id`'s folder, with one), or a
    one-line error saying what is missing."""
    where = scores_dir(settings, logical_date, model_id)
    manifests = [_read_manifest(p) for p in storage.glob(where, "shard-*.json")]  # see manifest_path
    if not manifests:
        raise missing("scores", logical_date, "score", where)
    counts = {m.shards for m in manifests}
    if len(counts) != 1:
        raise MissingDataError(f"scores for {logical_date} mix shard counts {sorted(counts)}; re-run `overnight score`")
    shards = counts.pop()
    absent = sorted(set(range(shards)) - {m.shard for m in manifests})
    if absent:
        raise MissingDataError(
            f"scores for {logical_date} are missing {len(absent):,} shard(s) of {shards:,}: {some(absent, 10)}; "
            f"run `overnight score --date {logical_date} --shards {shards} --shard N` for each"
        )
    models = {m.model_id for m in manifests}
    if len(models) != 1:
        raise MissingDataError(
            f"shards of {logical_date} were scored by different models {sorted(models)}; re-run them"
        )
    return sorted(manifests, key=lambda m: m.shard)


def _read_manifest(path: UPath) -> ShardManifest:
    try:
        return ShardManifest(**json.loads(path.read_text()))
    except (ValueError, TypeError) as error:
        raise MissingDataError(
            f"shard manifest {path} is unreadable ({error}); re-run `overnight score` for its date"
        ) from None


def remove_other_shard_counts(settings: Settings, logical_date: date, shards: int, model_id: str | None) -> None:
    """Shard files of an earlier run with another shard count: publishing them with this run's would
    mix two runs."""
    keep = f"-of-{shards:05d}"
    folders = [scores_dir(settings, logical_date, model_id)]
    if model_id is None:
        folders.append(drift_sample_dir(settings, logical_date))
    for where in folders:
        for stale in storage.glob(where, "shard-*"):
            if not stale.name.split(".")[0].endswith(keep):
                stale.unlink()


# ---------------------------------------------------------------------------- monitoring's feature sample


def drift_sample_dir(settings: Settings, logical_date: date) -> UPath:
    """Tonight's ranker features for a stable sample of users, one part per shard: written by the score
    step as it scores them, read by monitoring's drift."""
    return folder(settings, logical_date) / "drift-sample"


def drift_sample_path(settings: Settings, logical_date: date, shard: int, shards: int) -> UPath:
    return drift_sample_dir(settings, logical_date) / f"{shard_name(shard, shards)}.parquet"


def drift_sample_parts(settings: Settings, logical_date: date) -> list[UPath]:
    parts = storage.glob(drift_sample_dir(settings, logical_date), "shard-*.parquet")
    if not parts:
        raise missing("feature sample", logical_date, "score", drift_sample_dir(settings, logical_date))
    return parts
