"""The indexer's module layout: reader -> mapper -> writer without circles, private names kept
private, the torch-free modules free of torch, and the model config read once per job."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from indexer.jobs import JobSpec, run_index_job
from indexer.store import open_index

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("indexer", "retrieval", "app")
#: Imports inside a function that are there for a reason other than a circle: the engines'
#: package stays light because ``python -m indexer.engines.reaper`` (a small watcher process)
#: imports it first.
LAZY = {("indexer/engines/__init__.py", "indexer.engines.local"), ("indexer/engines/__init__.py", "indexer.engines.ray")}
#: Modules the merge step (``vtr index merge``) and the work directory need: no torch.
TORCH_FREE = ("indexer.errors", "indexer.plan", "indexer.parts", "indexer.publish", "indexer.ondisk")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((REPO / "indexer").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _own(name: str | None) -> bool:
    return bool(name) and name.split(".")[0] in PACKAGES


def _imports(tree: ast.Module) -> list[tuple[ast.AST, str, list[str], bool]]:
    """(node, module, names imported from it, inside a function) of every vtr import."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.level == 0 and _own(child.module):
                found.append((child, child.module, [alias.name for alias in child.names], nested))
            elif isinstance(child, ast.Import):
                found.extend((child, alias.name, [], nested) for alias in child.names if _own(alias.name))
            visit(child, nested)

    visit(tree, False)
    return found


def test_no_import_circles_no_function_imports_and_no_private_names_across_modules() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    problems = []
    for name, path in modules.items():
        relative = str(path.relative_to(REPO))
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bound: set[str] = set()  # names this file binds to vtr modules (``from indexer import store``)
        for node, module, names, in_function in _imports(tree):
            private = [imported for imported in names if imported.startswith("_")]
            if private:
                problems.append(f"{relative}:{node.lineno} imports private {private} from {module}")
            if in_function and (relative, module) not in LAZY:
                problems.append(f"{relative}:{node.lineno} imports {module} inside a function")
            targets = [f"{module}.{imported}" if f"{module}.{imported}" in modules else module for imported in names]
            for target in targets or [module]:
                if target in modules and not in_function:
                    graph[name].add(target)
                if target in modules and target != module:
                    bound.add(target.rsplit(".", 1)[1])
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in bound):
                problems.append(f"{relative}:{node.lineno} uses private {node.value.id}.{node.attr}")
    assert not problems, "\n".join(problems)

    # the module-level import graph is acyclic (depth-first search for a back edge)
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target):], target] if target in path else [name, target]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    # the seams are where the design puts them
    assert {"indexer.mapper", "indexer.parts"} <= graph["indexer.engines.local"] & graph["indexer.engines.ray"]
    assert "indexer.jobs" not in graph["indexer.guards"] | graph["indexer.publish"] | graph["indexer.ondisk"]


def test_every_indexer_module_imports_in_a_fresh_interpreter_and_the_writer_needs_no_torch() -> None:
    names = sorted(_modules())
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(TORCH_FREE)!r}:\n"
        "    importlib.import_module(name)\n"
        "torch_free = 'torch' not in sys.modules\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps({'torch_free': torch_free}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"torch_free": True}


def test_the_model_config_is_read_once_per_job(model_dir: Path, corpus_of, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    videos = corpus_of(["test/0000.mp4", "test/0001.mp4", "test/0002.mp4"])
    reads = []
    real = Path.read_text

    def counting(self: Path, *args, **kwargs) -> str:
        if self.name == "config.json" and self.parent == model_dir:
            reads.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    out = tmp_path / "index"
    summary = run_index_job(JobSpec(model_dir=model_dir, out=out, videos=videos, part_size=2), workers=0,
                            batch_size=2, progress=False)
    assert summary.indexed == 3 and len(open_index(out)) == 3
    assert len(reads) == 1
