"""The structure the architecture promises: who may import whom, and what operator commands load."""

import ast
import subprocess
import sys
from pathlib import Path

from tests.support.imports import ImportGraph

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
    """status, check-freshness, rollback, the canary's state changes and the hourly freshness DAG read a few
    rows: they must not pay for numba, llvmlite, lightgbm or polars (seconds of start-up, and a JIT cache on
    disk)."""
    code = (
        "import runpy, sys\n"
        "import jobs.cli\n"
        "from jobs.monitoring.freshness import check_freshness\n"
        "from jobs.monitoring.status import status\n"
        "from jobs.batches import rollback, canary_status\n"
        "from jobs.rollouts.canary import start_canary, ramp_canary, stop_canary, promote_canary\n"
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


# The import graph, read from source (tests/support/imports.py): what loading a module loads, before any of
# it runs. The tests above that start a Python see what one run loads; these see every path, including the
# imports inside functions, which a run loads only when it calls them.

# What `overnight status`, `check-freshness`, `rollback` and `canary status` import (jobs/cli.py imports
# them inside the commands), the CLI module itself, and the hourly freshness DAG as the scheduler parses it.
OPERATOR_MODULES = (
    "jobs.cli",
    "jobs.monitoring.freshness",
    "jobs.monitoring.status",
    "jobs.batches",
    "jobs.rollouts.canary",  # canary start batch, ramp, stop, promote
    "dags.overnight_freshness",
)
MODEL_MODULES = ("numba", "llvmlite", "lightgbm", "jobs.kernels")


def _within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(f"{p}.") for p in packages)


def _show(chain: list[str]) -> str:
    return " -> ".join(chain)


def test_the_import_graph_sees_what_loading_a_module_runs() -> None:
    """The graph the tests below read: if it lost the imports inside functions, or took them for module-level
    ones, those tests would pass or fail for nothing."""
    graph = ImportGraph(ROOT)
    assert {
        "jobs.cli",
        "jobs.monitoring.freshness",
        "jobs.batches",
        "jobs.kernels",
        "serving.app",
    } <= graph.files.keys()
    assert {"dags.overnight_freshness", "sql", "common.text", "console.app"} <= graph.files.keys()
    at_import = graph.edges(module_level_only=True)
    anywhere = graph.edges()
    # jobs/cli.py imports its settings at the top and each step inside the command that runs it
    assert {"jobs.settings", "common.text", "typer"} <= at_import["jobs.cli"]
    assert "jobs.steps.train" in anywhere["jobs.cli"] - at_import["jobs.cli"]
    assert "jobs.kernels" in graph.reachable("jobs.cli")
    # `from jobs.monitoring.freshness import as_dict` names the module, not the package
    assert "jobs.monitoring.freshness" in anywhere["jobs.cli"]


def test_no_import_cycle_among_the_projects_modules() -> None:
    """Counting the imports inside functions too: a cycle deferred into a function is still a cycle, one
    call away from a partly initialised module."""
    cycle = ImportGraph(ROOT).find_cycle()
    assert not cycle, f"import cycle: {_show(cycle)}"


def test_monitoring_never_reaches_a_step() -> None:
    """Not through another module either, nor through an import inside a function."""
    graph = ImportGraph(ROOT)
    monitoring = [m for m in graph.files if _within(m, "jobs.monitoring")]
    assert len(monitoring) > 5
    for module in monitoring:
        reached = graph.reachable(module)
        assert not [_show(c) for m, c in reached.items() if _within(m, "jobs.steps")], module


def test_the_lookup_service_never_reaches_batch_code_or_the_console() -> None:
    """Its image holds serving/, sql/ and common/ only: a path to jobs/ or console/, however indirect, is an import
    error in production."""
    graph = ImportGraph(ROOT)
    service = [m for m in graph.files if _within(m, "serving")]
    assert len(service) > 5
    for module in service:
        reached = graph.reachable(module)
        assert not [_show(c) for m, c in reached.items() if _within(m, "jobs", "console")], module


def test_operator_commands_reach_no_model_library_at_import() -> None:
    """The modules of the operator commands, and all they import at module level, never import numba,
    llvmlite, lightgbm or the kernels (which compile with numba); only a function may, when it is called."""
    graph = ImportGraph(ROOT)
    for module in OPERATOR_MODULES:
        assert module in graph.files, module
        reached = graph.reachable(module, module_level_only=True)
        assert not [_show(c) for m, c in reached.items() if _within(m, *MODEL_MODULES)], module


def _top_level_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_the_helpers_every_role_shares_are_defined_once() -> None:
    """common/text.py, common/web.py and common/server.py hold what the batch side, the lookup service and the
    console do alike (one-line errors, short lists, JSON-safe values, redacted access-log fields, key lists, the
    server's start and its checks, ...): a role that writes its own copy again (public or private) lets the two
    drift apart."""
    shared = {
        name
        for module in ("text", "web", "server")
        for name in _top_level_names(ROOT / "common" / f"{module}.py")
        if name[0] != "_"
    }
    assert {"first_line", "some", "jsonable", "loggable_query", "split_keys", "REDACTED"} <= shared
    assert {
        "HEADER_READ_TIMEOUT_MS",
        "IGNORED_AUTH_VARIABLE",
        "ENV_PREFIX",
        "run_granian",
        "open_app_factory",
    } <= shared
    copies = [
        f"{path.relative_to(ROOT)}: {name}"
        for package in ("jobs", "serving", "console")
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in _top_level_names(path)
        if name in shared or name.lstrip("_") in shared
    ]
    assert not copies, copies


# The folders of jobs/ from the top down, as docs/architecture.md draws them: a module may import its own
# folder's modules and those of folders below it, never above. The top-level modules of jobs/ other than
# these (settings, database, lake, workdir, batches, ...) are the bottom layer.
FOLDER_ORDER = (
    ("jobs.cli", "jobs.dev"),
    ("jobs.evaluation",),
    ("jobs.nightly",),
    ("jobs.rollouts",),
    ("jobs.steps",),
    ("jobs.monitoring",),
)


def _layer(module: str) -> int:
    for depth, folders in enumerate(FOLDER_ORDER):
        if _within(module, *folders):
            return depth
    return len(FOLDER_ORDER)


def test_the_folders_of_jobs_import_one_way_only() -> None:
    graph = ImportGraph(ROOT)
    upward = [
        f"{module} imports {target}"
        for module, targets in graph.edges().items()
        if _within(module, "jobs")
        for target in targets
        if _within(target, "jobs") and _layer(target) < _layer(module)
    ]
    assert not upward, upward
