"""The layout shows the architecture: no import cycles in the package (module-level or
inside functions), and the library below ``timematch/runner`` imports neither Ray nor
MLflow."""

import ast
from pathlib import Path

import timematch

PACKAGE = Path(timematch.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the modules it imports explicitly (anywhere in its body)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    child = f"{base}.{alias.name}"
                    edges.add(child if child in modules else base)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    graph = imports()
    assert "timematch.training" in graph and "timematch.runner.cli" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_library_imports_neither_ray_nor_mlflow():
    for path in PACKAGE.rglob("*.py"):
        if "runner" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("ray", "mlflow") for n in names), path


#: MLflow client calls that set or end a run's status (or make a run the global active one).
STATUS_CALLS = {"set_terminated", "update_run", "start_run", "end_run", "create_run"}
RUNNER = PACKAGE / "runner"


def test_only_the_run_module_sets_a_run_status():
    """One owner for a run's life (timematch/runner/runs.py), in the driver and in trials."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path == RUNNER / "runs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in STATUS_CALLS:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.func.attr}")
    assert not offenders, offenders


def test_every_runner_module_says_what_it_owns_and_a_long_one_why():
    for path in sorted(RUNNER.glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert len(doc) >= 40, f"{path.name}: no docstring saying what it owns"
        lines = len(path.read_text().splitlines())
        if lines > 400:
            assert "Longer than 400 lines" in doc, f"{path.name}: {lines} lines and no stated reason"
