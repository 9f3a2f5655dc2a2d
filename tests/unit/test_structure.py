"""The structure the architecture promises: who may import whom, and what operator commands load."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imports_of(folder: str) -> dict[str, set[str]]:
    """Every module under `folder` and the project modules it imports, wherever in the file."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / folder).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        found[str(path.relative_to(ROOT))] = names
    return found


def test_monitoring_imports_no_step_rollout_or_runner() -> None:
    """Monitoring watches the steps; it never computes what a step computes, so it never imports one."""
    higher = ("jobs.steps", "jobs.rollouts", "jobs.nightly", "jobs.cli", "jobs.dev")
    for module, names in imports_of("jobs/monitoring").items():
        assert not [n for n in names if n.startswith(higher)], module


def test_the_lookup_service_and_the_console_import_no_batch_code_nor_each_other() -> None:
    for role, others in (("serving", ("jobs", "console")), ("console", ("jobs", "serving"))):
        for module, names in imports_of(role).items():
            assert not [n for n in names if n.split(".")[0] in others], module


def test_operator_commands_load_no_model_or_data_library() -> None:
    """status, check-freshness, rollback and the hourly freshness DAG read a few rows: they must not pay
    for numba, llvmlite, lightgbm or polars (seconds of start-up, and a JIT cache on disk)."""
    code = (
        "import runpy, sys\n"
        "import jobs.cli\n"
        "from jobs.monitoring.freshness import check_freshness, status\n"
        "from jobs.batches import rollback, canary_status\n"
        f"runpy.run_path({str(ROOT / 'dags' / 'overnight_freshness.py')!r})\n"
        "heavy = ('numba', 'llvmlite', 'lightgbm', 'polars', 'pyarrow')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "", f"operator commands load {loaded.stdout.strip()}"


def test_monitoring_loads_no_model_or_jit_compiler() -> None:
    """Monitoring reads tables (polars), never a model: the publish gate and drift must not pay for numba,
    llvmlite or lightgbm."""
    code = (
        "import sys\n"
        "import jobs.monitoring.gate, jobs.monitoring.drift, jobs.monitoring.outputs\n"
        "print(','.join(m for m in ('numba', 'llvmlite', 'lightgbm') if m in sys.modules))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "", f"monitoring loads {loaded.stdout.strip()}"
