"""The package's layers: the core loads no Ray or pydantic, and no module imports one that
imports it back (imports inside functions count; ``if TYPE_CHECKING:`` blocks do not)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[2] / "ray_quota"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports, at any depth but type-checking blocks."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ray_quota"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("ray_quota"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {dep for dep in _imports(path) if dep in modules and dep != name
                   and dep != "ray_quota"}
            for name, path in modules.items()}


def test_the_package_has_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [node, dep]))
            elif dep not in state:
                visit(dep, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert cycles == []


def test_the_core_imports_only_the_core_and_plain_values() -> None:
    graph = _graph()
    allowed = ("ray_quota._core", "ray_quota._spec", "ray_quota._errors")
    for name, deps in graph.items():
        if name.startswith("ray_quota._core"):
            assert all(dep.startswith(allowed) for dep in deps), (name, deps)


def test_no_core_module_reads_a_clock_or_imports_io() -> None:
    """Time comes from the caller: no core module imports ``time``, Ray, asyncio or metrics."""
    forbidden = {"ray", "pydantic", "prometheus_client", "time", "asyncio", "threading"}
    for path in [*(PACKAGE / "_core").glob("*.py"), PACKAGE / "_spec.py", PACKAGE / "_errors.py"]:
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
        assert not imported & forbidden, (path.name, imported & forbidden)


def test_importing_the_core_loads_no_ray_pydantic_or_asyncio() -> None:
    core = sorted(_module_name(path) for path in (PACKAGE / "_core").glob("*.py"))
    code = (f"import sys\nfor name in {core!r}:\n    __import__(name)\n"
            "print(sorted(m for m in ('ray', 'pydantic', 'asyncio', 'prometheus_client')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == "[]"


def test_importing_the_package_loads_no_ray() -> None:
    code = "import sys, ray_quota\nprint('ray' in sys.modules, 'pydantic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == "False False"
