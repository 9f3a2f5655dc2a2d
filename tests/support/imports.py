"""The project's import graph, read from source with `ast`: which module imports which, and what that reaches.

A module is named as Python names it (``jobs.monitoring.freshness``; a package by its ``__init__``,
``jobs.monitoring``); a DAG file as ``dags.<file>``. An import of anything outside the project is kept as
its top-level package (``numba``), a leaf of the graph.

Edges are the imports a module states: ``import a.b`` and ``from a import b`` where ``b`` is a submodule
lead to ``a.b``, ``from a import name`` to ``a``; relative imports are resolved against the importing
module's package. Imports under ``if TYPE_CHECKING:`` are left out: they never run. Loading a module also
runs its packages' ``__init__``: `reachable` follows those too, while the edges (and so `find_cycle`) hold
only what the source states.
"""

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROJECT_PACKAGES = ("jobs", "serving", "console", "sql", "common", "dags")


@dataclass(frozen=True)
class Import:
    target: str
    module_level: bool  # runs when the module is loaded (not inside a function)
    line: int


def module_files(root: Path, packages: Iterable[str] = PROJECT_PACKAGES) -> dict[str, Path]:
    """Every Python module under `packages` of `root`, by module name."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if any(part.startswith(".") or part == "__pycache__" for part in parts):
                continue
            found[".".join(parts).removesuffix(".__init__")] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Each import statement that can run, and whether it runs at import time (outside any function)."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def walk(node: ast.AST, module_level: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append((node, module_level))
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for branch in node.orelse:
                walk(branch, module_level)
            return
        inside_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            walk(child, module_level and not inside_function)

    walk(tree, True)
    return found


class ImportGraph:
    def __init__(self, root: Path, packages: Iterable[str] = PROJECT_PACKAGES) -> None:
        self.files = module_files(root, packages)
        self.imports: dict[str, list[Import]] = {name: self._imports_of(name) for name in self.files}

    def _package_of(self, module: str) -> str:
        is_package = self.files[module].name == "__init__.py"
        return module if is_package else module.rpartition(".")[0]

    def _target(self, name: str) -> str:
        """A dotted name as a node: the longest project module it names, else its top-level package."""
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in self.files:
                return candidate
        return parts[0]

    def _imports_of(self, module: str) -> list[Import]:
        tree = ast.parse(self.files[module].read_text(encoding="utf-8"), filename=str(self.files[module]))
        found: list[Import] = []
        for node, module_level in _import_nodes(tree):
            if isinstance(node, ast.Import):
                targets = [self._target(alias.name) for alias in node.names]
            else:
                if node.level:
                    base = self._package_of(module).split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join([*base, node.module] if node.module else base)
                else:
                    source = node.module or ""
                targets = []
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    targets.append(submodule if submodule in self.files else self._target(source))
            found += [Import(t, module_level, node.lineno) for t in targets if t != module]
        return found

    def edges(self, *, module_level_only: bool = False) -> dict[str, set[str]]:
        return {
            name: {i.target for i in imports if i.module_level or not module_level_only}
            for name, imports in self.imports.items()
        }

    def reachable(self, start: str, *, module_level_only: bool = False) -> dict[str, list[str]]:
        """Every module (or outside package) loading `start` loads, each with a chain of imports leading to it.

        Loading a module loads its packages first, so their ``__init__`` imports count too."""
        edges = self.edges(module_level_only=module_level_only)
        chains: dict[str, list[str]] = {start: [start]}
        pending = [start]
        while pending:
            current = pending.pop()
            parts = current.split(".")
            parents = {".".join(parts[:end]) for end in range(1, len(parts))} & edges.keys()
            for nxt in sorted(edges.get(current, set()) | parents):
                if nxt not in chains:
                    chains[nxt] = [*chains[current], nxt]
                    pending.append(nxt)
        return chains

    def find_cycle(self) -> list[str]:
        """A cycle of imports among the project's modules (first module repeated at the end), or []."""
        edges = {name: targets & self.files.keys() for name, targets in self.edges().items()}
        state: dict[str, int] = {}  # 1 on the current path, 2 done
        path: list[str] = []

        def visit(module: str) -> list[str]:
            state[module] = 1
            path.append(module)
            for nxt in sorted(edges[module]):
                if state.get(nxt) == 1:
                    return [*path[path.index(nxt) :], nxt]
                if nxt not in state and (cycle := visit(nxt)):
                    return cycle
            path.pop()
            state[module] = 2
            return []

        for module in sorted(edges):
            if module not in state and (cycle := visit(module)):
                return cycle
        return []
