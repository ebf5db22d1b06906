"""No unsafe deserialisation anywhere in the project: every ``torch.load`` passes
``weights_only=True``, every ``np.load`` ``allow_pickle=False``, every YAML load a safe loader,
and every pickle is read through a restricted unpickler (a ``pickle.Unpickler`` subclass with
its own ``find_class``). The scan walks the syntax tree of every module, so a load added later
fails here until it is made safe."""

from __future__ import annotations

import ast
import io
import pickle
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO / "timematch").rglob("*.py"), REPO / "launch.py", *(REPO / "benchmarks").glob("*.py")])
#: Modules whose loading functions run code from the data, whatever the arguments.
FORBIDDEN_MODULES = {"dill", "cloudpickle", "joblib", "marshal", "shelve", "jsonpickle"}


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return ""


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def _is_constant(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_loads(path: Path, restricted: set[str]) -> list[str]:
    """The unsafe loads of module ``path``; ``restricted``: the project's restricted unpicklers."""
    tree = ast.parse(path.read_text(), str(path))
    problems = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in FORBIDDEN_MODULES:
                    problems.append(f"{where}: imports {name}")
        if not isinstance(node, ast.Call):
            continue
        called = _name(node.func)
        if called == "torch.load" and not _is_constant(_keyword(node, "weights_only"), True):
            problems.append(f"{where}: torch.load without weights_only=True")
        elif called in ("np.load", "numpy.load") and not _is_constant(_keyword(node, "allow_pickle"), False):
            problems.append(f"{where}: np.load without allow_pickle=False")
        elif called in ("pickle.load", "pickle.loads", "pickle.Unpickler"):
            problems.append(f"{where}: {called} (use a restricted Unpickler subclass)")
        elif called.endswith("Unpickler") and called.split(".")[-1] not in restricted:
            problems.append(f"{where}: {called} is not a restricted unpickler")
        elif called in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
            problems.append(f"{where}: {called}")
        elif called in ("yaml.load", "yaml.load_all"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or "Safe" not in _name(loader):
                problems.append(f"{where}: {called} without a safe loader")
        elif called in ("mlflow.pytorch.load_model", "mlflow.pyfunc.load_model"):
            problems.append(f"{where}: {called} unpickles a model (fine for a user's own runs, not in the package)")
    return problems


def _project_unpicklers() -> set[str]:
    names = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(_name(b).endswith("Unpickler") for b in node.bases) and any(
                    isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                names.add(node.name)
    return names


def test_no_unsafe_load_in_the_code():
    restricted = _project_unpicklers()
    problems = [p for path in SOURCES for p in unsafe_loads(path, restricted)]
    assert not problems, "\n".join(problems)
    assert {"RestrictedUnpickler", "SearcherStateUnpickler"} <= _project_unpicklers()


def test_the_scan_finds_unsafe_loads(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle, torch, numpy as np, yaml\nimport dill\n"
                   "torch.load('m.pt')\nnp.load('a.npy')\npickle.loads(b'')\nyaml.load(s)\n"
                   "torch.load('m.pt', weights_only=True)\n")
    problems = unsafe_loads(bad, set())
    assert len(problems) == 5, problems


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_the_searcher_state_refuses_foreign_globals():
    from timematch.runner.search import SearcherStateUnpickler

    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        SearcherStateUnpickler(io.BytesIO(pickle.dumps(_Evil()))).load()
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        SearcherStateUnpickler(io.BytesIO(pickle.dumps(eval))).load()
    state = {"groups": [1, 2.5, "a"], "nested": {"b": (None, True)}}
    assert SearcherStateUnpickler(io.BytesIO(pickle.dumps(state))).load() == state
