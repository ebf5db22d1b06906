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


def runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """The nodes of ``tree`` that run: everything but ``if TYPE_CHECKING:`` blocks (imports
    for type hints alone, which never execute and so can make no cycle)."""
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
               for stmt in node.body for n in ast.walk(stmt)}
    return [node for node in ast.walk(tree) if id(node) not in skipped]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported(node: ast.AST, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package's modules that an import statement ``node`` of module ``name`` imports."""
    package = name if is_package else name.rpartition(".")[0]
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if not isinstance(node, ast.ImportFrom):
        return set()
    base = node.module or ""
    if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
    found = set()
    for alias in node.names:
        child = f"{base}.{alias.name}"
        found.add(child if child in modules else base)
    return found


def imports() -> dict[str, set[str]]:
    """module -> the modules it imports explicitly when it runs (anywhere in its body)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in runtime_nodes(ast.parse(path.read_text())):
            edges |= imported(node, name, path.name == "__init__.py", set(modules))
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


def test_no_test_module_imports_another():
    """Test modules share helpers through ``tests/support/``, never by importing one another:
    a test module is a set of tests, and importing one drags its fixtures and imports along."""
    tests = Path(__file__).parent

    def is_test_module(name: str) -> bool:
        last = name.split(".")[-1]
        return last.startswith("test_") and name in (last, f"tests.{last}")

    offenders = []
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = ".".join(["tests"] * bool(node.level) + [node.module] * bool(node.module))
                names = [module] + [f"{module}.{alias.name}" for alias in node.names]
            else:
                continue
            offenders += [f"{path.name}:{node.lineno} imports {name}" for name in names if is_test_module(name)]
    assert not offenders, offenders


#: The third-party libraries a function may import where it needs them, and why: the command
#: line answers a malformed option without torch (0.2 s instead of 3 s), and ``--dry-run`` and
#: bad input that needs the plan (one line, exit 2) without Ray, MLflow or Optuna; only plots
#: load matplotlib, and only statistics scipy. Seconds of ``python -c "import X"`` on 2 cores (2026-12-06).
DEFERRED = {"torch": 3.5, "mlflow": 3.1, "scipy": 1.6, "matplotlib": 1.2, "ray": 0.8, "zarr": 0.6, "optuna": 0.5}


def _top_level_imports(tree: ast.Module, name: str, is_package: bool, modules: set[str]) -> tuple[set, set]:
    """(the package's modules, the third-party roots) that a module imports when it loads."""
    own, third = set(), set()
    for stmt in tree.body:
        for node in runtime_nodes(stmt):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                break
            found = imported(node, name, is_package, modules)
            own |= {m for m in found if m in modules}
            third |= {m.split(".")[0] for m in found if m not in modules and not m.startswith("timematch")}
    return own, third


def _function_imports(tree: ast.Module) -> list[ast.AST]:
    inside = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside += [n for stmt in node.body for n in runtime_nodes(stmt)
                       if isinstance(n, (ast.Import, ast.ImportFrom))]
    return list({id(n): n for n in inside}.values())


def test_imports_inside_functions_only_defer_heavy_libraries():
    """An import inside a function is a deferred heavy library (:data:`DEFERRED`), directly or
    through a module of the package that loads one; anything else is imported at the top,
    where a reader sees a module's dependencies (type hints: under ``TYPE_CHECKING``)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    trees = {name: ast.parse(path.read_text()) for name, path in paths.items()}
    loads = {name: _top_level_imports(tree, name, paths[name].name == "__init__.py", modules)
             for name, tree in trees.items()}

    def heavy(module: str, seen: set[str]) -> bool:
        own, third = loads[module]
        return bool(third & set(DEFERRED)) or any(heavy(m, seen | {m}) for m in own - seen)

    offenders = []
    for name, tree in trees.items():
        for node in _function_imports(tree):
            for target in imported(node, name, paths[name].name == "__init__.py", modules):
                root = target.split(".")[0]
                if root in DEFERRED or (target in modules and heavy(target, {target})):
                    continue
                offenders.append(f"{paths[name].relative_to(PACKAGE.parent)}:{node.lineno} imports {target}")
    assert not offenders, "import these at the top:\n" + "\n".join(offenders)
