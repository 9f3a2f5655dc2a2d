"""The ranker compiled for scoring: LightGBM's scores to 1e-5, a cache checked against the model's sha256,
and LightGBM's own predict where compiling is off or impossible."""

import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import polars as pl
import psycopg
import pytest

from jobs import lake, predictor, registry, workdir
from jobs.settings import Settings
from jobs.steps import features, score, train
from tests.support.batches import ingest_and_prepare
from tests.support.data import SAMPLE_DATE
from tests.support.databases import create_database, drop_database

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Trained:
    settings: Settings
    model: registry.ModelVersion
    model_file: Path


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, postgres_admin_url: str, sample_source: Path
) -> Iterator[Trained]:
    """A ranker trained by the train step on the generated sample."""
    url = create_database(postgres_admin_url)
    try:
        settings = Settings(data_dir=tmp_path_factory.mktemp("compiled") / "var", database_url=url)
        ingest_and_prepare(settings, sample_source, SAMPLE_DATE)
        result = train.train(settings, SAMPLE_DATE)
        with psycopg.connect(url) as conn:
            model = registry.model_by_id(conn, result.model_id)
        assert model is not None
        yield Trained(settings, model, registry.artifact_file(settings, model))
    finally:
        drop_database(postgres_admin_url, url)


def feature_rows(settings: Settings, feature_names: list[str]) -> np.ndarray:
    """The features scoring computes for the date's candidates, every user of the sample."""
    events = lake.scan_interactions(settings.lake_dir, SAMPLE_DATE).select(features.HISTORY_COLUMNS).collect()
    frame = features.candidate_features(settings, SAMPLE_DATE)(events)
    return frame.select(feature_names).to_numpy()


def model_copy(source: Path, folder: Path, trees: int | None = None) -> tuple[Path, str, lgb.Booster]:
    """The model file (its first ``trees`` trees only, with ``trees``) alone in ``folder``: file, sha256, booster."""
    folder.mkdir(parents=True)
    model_file = folder / "model.txt"
    lgb.Booster(model_file=str(source)).save_model(model_file, num_iteration=trees)
    return model_file, registry.file_sha256(model_file), lgb.Booster(model_file=str(model_file))


def test_training_compiles_the_ranker_and_its_scores_are_lightgbms(trained: Trained) -> None:
    assert predictor.cached_library(trained.model_file, trained.model.artifact_sha256) is not None
    booster = lgb.Booster(model_file=str(trained.model_file))
    compiled = predictor.for_model(trained.settings, trained.model_file, trained.model.artifact_sha256, booster)
    assert compiled.name == predictor.COMPILED
    rows = feature_rows(trained.settings, list(trained.model.features))
    expected = booster.predict(rows)
    assert rows.shape[0] > predictor.SLICE_ROWS // 100 and np.unique(expected).size > 100
    np.testing.assert_allclose(compiled.predict(rows), expected, rtol=0, atol=1e-5)
    # rows the slices cut in more than one call, and rows with missing values, score the same too
    many = np.concatenate([rows] * (predictor.SLICE_ROWS // rows.shape[0] + 2))
    many[::7, ::3] = np.nan
    np.testing.assert_allclose(compiled.predict(many), booster.predict(many), rtol=0, atol=1e-5)


def test_the_score_step_says_which_predictor_ran(trained: Trained) -> None:
    manifests = score.score(trained.settings, SAMPLE_DATE)
    assert {m.predictor for m in manifests} == {predictor.COMPILED}
    assert all(0 < m.predict_seconds <= m.seconds for m in manifests)
    assert {m.predictor for m in workdir.read_manifests(trained.settings, SAMPLE_DATE)} == {predictor.COMPILED}
    scored = pl.concat([pl.read_parquet(m.path) for m in manifests])
    assert scored.height == sum(m.users for m in manifests) > 0


def test_a_cache_of_another_model_or_a_damaged_one_is_compiled_again(trained: Trained, tmp_path: Path) -> None:
    rows = feature_rows(trained.settings, list(trained.model.features))
    first_file, first_sha, first = model_copy(trained.model_file, tmp_path / "first")
    predictor.compile_library(first_file, first_sha)
    # a changed model whose cache files are the first model's, under its own names
    changed_file, changed_sha, changed = model_copy(trained.model_file, tmp_path / "changed", trees=3)
    assert changed_sha != first_sha and not np.allclose(changed.predict(rows), first.predict(rows))
    for old, new in zip(
        predictor.cache_paths(first_file, first_sha), predictor.cache_paths(changed_file, changed_sha), strict=True
    ):
        shutil.copyfile(old, new)
    assert predictor.cached_library(changed_file, changed_sha) is None
    rebuilt = predictor.for_model(trained.settings, changed_file, changed_sha, changed)
    assert rebuilt.name == predictor.COMPILED
    np.testing.assert_allclose(rebuilt.predict(rows), changed.predict(rows), rtol=0, atol=1e-5)
    assert predictor.cached_library(changed_file, changed_sha) is not None

    library, _ = predictor.cache_paths(changed_file, changed_sha)
    # a torn copy, put in place by rename as a copy would be: writing into the loaded library would crash
    torn = library.with_name("torn.so")
    torn.write_bytes(library.read_bytes()[: library.stat().st_size // 2])
    torn.replace(library)
    assert predictor.cached_library(changed_file, changed_sha) is None
    again = predictor.for_model(trained.settings, changed_file, changed_sha, changed)
    np.testing.assert_allclose(again.predict(rows), changed.predict(rows), rtol=0, atol=1e-5)
    assert predictor.cached_library(changed_file, changed_sha) == library


def test_without_a_compiler_or_with_compiling_off_lightgbm_predicts(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rows = feature_rows(trained.settings, list(trained.model.features))[:5000]
    model_file, sha, booster = model_copy(trained.model_file, tmp_path / "model")
    off = predictor.for_model(trained.settings.model_copy(update={"compile_ranker": False}), model_file, sha, booster)
    assert off.name == predictor.LIGHTGBM
    assert [p.name for p in model_file.parent.iterdir()] == ["model.txt"]  # nothing compiled

    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no gcc to be found
    with caplog.at_level(logging.WARNING, logger="jobs.predictor"):
        fallback = predictor.for_model(trained.settings, model_file, sha, booster)
    assert fallback.name == predictor.LIGHTGBM
    assert "with LightGBM's predict" in caplog.text and "gcc" in caplog.text
    np.testing.assert_array_equal(fallback.predict(rows), booster.predict(rows))
    assert [p.name for p in model_file.parent.iterdir()] == ["model.txt"]  # no half-written library left
