"""The ranker as scoring runs it: compiled to native code by tl2cgen and gcc, with LightGBM's scores (why:
docs/scale.md#throughput), or LightGBM's own ``predict`` where it cannot be. Imported lazily: these libraries load
native code.
"""

import contextlib
import io
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from jobs import lake, registry
from jobs.settings import Settings

logger = logging.getLogger(__name__)

COMPILED = "tl2cgen"
LIGHTGBM = "lightgbm"
TOOLCHAIN = "gcc"
# rows per call (scoring builds its matrix this many rows at a time): tl2cgen copies its input into C order (and the
# scores out), so memory stays bounded
SLICE_ROWS = 1 << 18


@dataclass(frozen=True)
class Predictor:
    """Scores (float64, LightGBM's ``predict`` values) of a feature matrix in the model's feature order."""

    name: str  # COMPILED or LIGHTGBM: what ran the model
    predict: Callable[[np.ndarray], np.ndarray]


class CompileError(Exception):
    """The model could not be compiled here (no C compiler, a model tl2cgen cannot read)."""


def for_model(settings: Settings, model_file: Path, sha256: str, booster: Any) -> Predictor:
    """The compiled model (from the cache beside ``model_file``, compiled now if absent or stale), or
    ``booster``'s own predict when ``compile_ranker`` is off or compiling fails.

    ``sha256`` is the model file's, as the registry recorded and checked it.
    """
    if not settings.compile_ranker:
        return lightgbm_predictor(booster)
    try:
        library = cached_library(model_file, sha256) or compile_library(model_file, sha256)
        return compiled_predictor(library, booster.num_feature())
    except CompileError as error:
        logger.warning("scoring %s with LightGBM's predict: %s", model_file, error)
        return lightgbm_predictor(booster)


def compile_for(settings: Settings, model_file: Path, sha256: str) -> Path | None:
    """Compile a newly trained model into the cache (``compile_ranker`` on), so that its first night
    does not: the library, or None when compiling is off or impossible (scoring will then say why)."""
    if not settings.compile_ranker:
        return None
    try:
        return cached_library(model_file, sha256) or compile_library(model_file, sha256)
    except CompileError as error:
        logger.warning("train: %s is not compiled, scoring will use LightGBM's predict: %s", model_file, error)
        return None


def lightgbm_predictor(booster: Any) -> Predictor:
    return Predictor(LIGHTGBM, lambda matrix: np.asarray(booster.predict(matrix, num_threads=0), dtype=np.float64))


# ------------------------------------------------------------------ the cache


def cache_paths(model_file: Path, sha256: str) -> tuple[Path, Path]:
    """(library, record) beside the model file: one per model, compiler version and architecture."""
    stem = f"{model_file.stem}.{sha256}.{COMPILED}-{_version('tl2cgen')}.{platform.machine()}"
    return model_file.with_name(f"{stem}.so"), model_file.with_name(f"{stem}.json")


# A cached library that does not match its recorded digests is compiled again, never loaded.
def cached_library(model_file: Path, sha256: str) -> Path | None:
    """The cached library when its record names this model and the library's digest matches it."""
    library, record_path = cache_paths(model_file, sha256)
    try:
        record = json.loads(record_path.read_text())
        if record.get("model_sha256") == sha256 and record.get("library_sha256") == registry.file_sha256(library):
            return library
    except (OSError, ValueError, AttributeError):
        pass
    if record_path.exists() or library.exists():
        logger.warning("compiled model %s does not match its record or model: compiling it again", library)
    return None


def compile_library(model_file: Path, sha256: str) -> Path:
    """Compile the LightGBM model file into the cache with tl2cgen and gcc; CompileError if impossible."""
    try:
        import tl2cgen
        import treelite
    except ImportError as error:
        raise CompileError(f"tl2cgen is not installed ({error})") from None
    library, record_path = cache_paths(model_file, sha256)
    started = time.perf_counter()
    digests: list[str] = []

    def write(tmp: Path) -> None:
        forest = treelite.frontend.load_lightgbm_model(model_file)
        units = os.cpu_count() or 1
        tl2cgen.export_lib(forest, toolchain=TOOLCHAIN, libpath=tmp, params={"parallel_comp": units}, nthread=units)
        digests.append(registry.file_sha256(tmp))

    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):  # the native libraries' log lines come through print()
            lake.write_atomically(library, write)
    except (treelite.TreeliteError, tl2cgen.TL2cgenError, ValueError, OSError) as error:
        raise CompileError(f"{type(error).__name__}: {str(error).strip().splitlines()[-1]}") from None
    finally:
        if said.getvalue().strip():
            logger.debug("tl2cgen: %s", said.getvalue().strip())
    seconds = time.perf_counter() - started
    record = {
        "model_sha256": sha256,
        "library_sha256": digests[0],
        "compiler": f"{COMPILED} {_version('tl2cgen')}, treelite {_version('treelite')}, {TOOLCHAIN}",
        "compile_seconds": round(seconds, 2),
    }
    lake.write_json_atomically(record, record_path)
    logger.info("compiled %s in %.1f s: %s", model_file, seconds, library.name)
    return library


# ------------------------------------------------------------------ predicting


def compiled_predictor(library: Path, features: int) -> Predictor:
    """The compiled library as a Predictor, all cores; CompileError when it does not load or does not fit."""
    import tl2cgen

    try:
        compiled = tl2cgen.Predictor(library)
    except (tl2cgen.TL2cgenError, OSError) as error:
        raise CompileError(f"{library} does not load: {error}") from None
    if compiled.num_feature != features or compiled.num_target != 1:
        raise CompileError(f"{library} has {compiled.num_feature} features and {compiled.num_target} targets")

    def predict(matrix: np.ndarray) -> np.ndarray:
        scores = np.empty(matrix.shape[0], dtype=np.float64)
        for start in range(0, matrix.shape[0], SLICE_ROWS):
            rows = np.ascontiguousarray(matrix[start : start + SLICE_ROWS])
            scores[start : start + rows.shape[0]] = compiled.predict(tl2cgen.DMatrix(rows)).reshape(-1)
        return scores

    return Predictor(COMPILED, predict)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"
