"""The retrain's parameter search: budgeted, recorded, on training users only, and applied where the model scores."""

import json
from pathlib import Path
from typing import Any

import polars as pl
import psycopg
import pytest

from jobs import nightly, registry, tuning, workdir
from jobs.errors import MissingDataError, UnfitCandidatesError
from jobs.monitoring import drift
from jobs.rollouts import shadow
from jobs.settings import Settings
from jobs.steps import candidates, score, train
from tests.support.batches import ingest_and_prepare
from tests.support.commands import overnight, overnight_env
from tests.support.data import SAMPLE_DATE

pytestmark = pytest.mark.integration

BUDGET_MINUTES = 0.05


def _model(database_url: str, model_id: str) -> registry.ModelVersion:
    with psycopg.connect(database_url) as conn:
        model = registry.model_by_id(conn, model_id)
    assert model is not None
    return model


def test_a_tuned_retrain_records_every_trial_within_its_budget_and_keeps_the_chosen_settings(
    tmp_path: Path, sample_source: Path, database_url: str
) -> None:
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url, tune_budget_minutes=BUDGET_MINUTES)
    ingest_and_prepare(settings, sample_source, SAMPLE_DATE)

    trained = train.train(settings, SAMPLE_DATE)

    model = _model(database_url, trained.model_id)
    searched = model.params[registry.TUNING]
    trials = tuning.recorded_trials(settings, searched["search_id"])
    assert len(trials) == searched["trials"] >= 1
    assert [t.number for t in trials] == list(range(len(trials)))
    # the first trial is the production model's parameters; with none, the settings as given
    assert trials[0].warm_start and not any(t.warm_start for t in trials[1:])
    assert trials[0].params == {name: tuning.SPACE[name].clip(v) for name, v in tuning.current_values(settings).items()}
    # a trial starts only while the budget lasts: all but the last one ended within it
    assert sum(t.seconds for t in trials[:-1]) < BUDGET_MINUTES * 60
    best = max((t for t in trials if t.score is not None), key=lambda t: t.score or 0.0)
    assert model.params[registry.TUNED_SETTINGS] == best.params
    assert searched["best_ndcg@10"] == best.score
    # the ranker was trained with the chosen settings
    assert model.params["learning_rate"] == best.params["learning_rate"]
    assert model.params["num_leaves"] == best.params["num_leaves"]


def test_the_search_never_sees_the_users_the_gate_holds_out(
    tmp_path: Path, sample_source: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url)
    ingest_and_prepare(settings, sample_source, SAMPLE_DATE)
    _, windows, held_out = train.label_data(settings, SAMPLE_DATE)
    assert held_out.len() > 0
    seen: list[pl.Series] = []
    build_examples = train.build_examples

    def recording(window: train.LabelWindow, catalogue: pl.DataFrame, s: Settings, users: Any = None) -> Any:
        assert users is not None, "a trial built examples of every labelled user, held-out ones included"
        seen.append(users)
        return build_examples(window, catalogue, s, users)

    monkeypatch.setattr(train, "build_examples", recording)
    searched = train.tune(settings, SAMPLE_DATE, 0.01)

    assert searched.trials and seen
    users = pl.concat(seen).unique()
    assert not users.is_in(held_out.implode()).any()
    # and the search did use the newest window's other users
    newest = windows[0].relevant["user_id"].unique()
    assert users.is_in(newest.implode()).sum() > 0


def test_scoring_applies_the_tuned_candidate_settings_of_its_model(
    tmp_path: Path, sample_source: Path, database_url: str
) -> None:
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url, score_shards=1)
    ingest_and_prepare(settings, sample_source, SAMPLE_DATE)
    trained = train.train(settings, SAMPLE_DATE)
    (untuned,) = score.score(settings, SAMPLE_DATE)
    tuned = {"max_candidates": 12, "covisit_neighbours": 5, "recent_days": 4}
    model = _model(database_url, trained.model_id)
    with psycopg.connect(database_url) as conn:
        registry.register(
            conn,
            registry.ModelVersion(**{**model.__dict__, "params": {**model.params, registry.TUNED_SETTINGS: tuned}}),
        )
    built_with = workdir.candidate_settings_path(settings, SAMPLE_DATE)
    assert json.loads(built_with.read_text()) == candidates.shaping_values(settings)  # the night's settings

    # scoring never rebuilds the tables another step makes: it refuses the wrong ones, naming the step
    with pytest.raises(MissingDataError, match=r"run `overnight candidates --date"):
        score.score_shard(settings, SAMPLE_DATE, 1, 0)
    with pytest.raises(MissingDataError, match=r"run `overnight candidates --date"):
        score.score(settings, SAMPLE_DATE)
    # the nightly graph's refit-candidates step builds them with the settings of the model that scores the
    # date, as `overnight candidates` would, and is skipped once they fit
    # A model whose candidate settings the date's tables did not have when it was trained gets its drift
    # reference from that step too, once the tables are rebuilt for it; monitoring only reads it.
    reference = drift.reference_path(settings, model)
    reference.unlink()
    night = nightly.Night(settings, SAMPLE_DATE)
    assert not isinstance(nightly.run_step("refit-candidates", night), nightly.Skipped)
    written = pl.read_parquet(reference)
    skipped = nightly.run_step("refit-candidates", night)
    assert isinstance(skipped, nightly.Skipped) and skipped.reason == f"the candidate tables fit {model.model_id}"

    (manifest,) = score.score(settings, SAMPLE_DATE)

    assert json.loads(built_with.read_text()) == {**candidates.shaping_values(settings), **tuned}
    assert manifest.model_id == model.model_id
    assert manifest.candidate_rows <= manifest.users * tuned["max_candidates"] < untuned.candidate_rows

    # the reference is the features scoring computed for the same sampled users
    assert written.sort(written.columns).equals(
        drift.tonight(settings, SAMPLE_DATE).select(written.columns).sort(written.columns)
    )
    nightly.run_step("monitor", night)
    assert drift.report(settings, SAMPLE_DATE)["stages"]["drift"]["report"]["features"]
    reference.unlink()
    nightly.run_step("monitor", night)
    assert not reference.exists()
    assert "has no training reference" in drift.report(settings, SAMPLE_DATE)["stages"]["drift"]["report"]["problem"]

    # A chosen model tuned otherwise (here the same model without tuned settings) cannot score the date,
    # whose one set of tables is its own model's: a clear error, and the nightly shadow skips with it.
    other = registry.ModelVersion(**{**model.__dict__, "model_id": "ranker-untuned", "status": "trained"})
    with psycopg.connect(database_url) as conn:
        registry.register(conn, other)
    with pytest.raises(UnfitCandidatesError, match=r"ranker-untuned was tuned with other candidate settings"):
        score.score(settings, SAMPLE_DATE, model_id=other.model_id)
    skipped_shadow = shadow.nightly_shadow(settings, SAMPLE_DATE, other.model_id)
    assert isinstance(skipped_shadow, shadow.ShadowSkipped) and "cannot score" in skipped_shadow.reason


def test_overnight_tune_runs_the_search_alone_and_models_show_the_chosen_settings(
    tmp_path: Path, sample_source: Path, database_url: str
) -> None:
    data_dir = tmp_path / "var"
    settings = Settings(data_dir=data_dir, database_url=database_url)
    ingest_and_prepare(settings, sample_source, SAMPLE_DATE)
    env = overnight_env(database_url, data_dir)
    day = SAMPLE_DATE.isoformat()

    refused = overnight("tune", "--date", day, env=env, check=False)
    assert refused.returncode == 2 and "give --budget-minutes above 0" in refused.stderr

    searched = json.loads(overnight("tune", "--date", day, "--budget-minutes", "0.01", "--json", env=env).stdout)
    assert searched["trials"][0]["warm_start"]
    assert len(tuning.recorded_trials(settings, searched["search_id"])) == len(searched["trials"])
    assert overnight("models", "--online-days", "0", env=env).stdout.strip().endswith("run `overnight train --date D`")

    tuned_env = {**env, "OVERNIGHT_TUNE_BUDGET_MINUTES": str(BUDGET_MINUTES)}
    overnight("train", "--date", day, env=tuned_env)
    listed = overnight("models", "--online-days", "0", env=env).stdout
    assert "tuned (" in listed and "max_candidates=" in listed and "learning_rate=" in listed
    (row,) = json.loads(overnight("models", "--online-days", "0", "--json", env=env).stdout)
    assert set(row[registry.TUNED_SETTINGS]) == set(tuning.SPACE)
