"""The shape of the package: imports run downwards (no cycles, no worker importing its driver, no
layer importing one below it) and no function is longer than 60 lines. Read from the source with
``ast``, function-local imports included, so a lazy import cannot hide a cycle."""

from __future__ import annotations

import ast
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cxr_batch"
MAX_FUNCTION_LINES = 60
# Top to bottom: a module may import from its own layer or one above it (see docs/architecture.md).
LAYERS = ("errors", "pixels", "archive", "model", "synth", "reports", "jobs", "bench", "cli")
# Worker code: runs inside Ray tasks, actors and Train workers, and must not pull in its driver.
WORKERS = {"cxr_batch.jobs.score_stages": "cxr_batch.jobs.score",
           "cxr_batch.jobs.train_worker": "cxr_batch.jobs.train"}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: dict) -> set[str]:
    """Every cxr_batch module that ``name`` imports, at the top or inside a function."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] if node.level else [])
            mod = ".".join(p for p in (base, node.module or "") if p)
            # "from . import storage" names a module; "from .x import f" names something in x.
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t not in known and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in known and t != name:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a set that imports itself."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on_stack.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_there_are_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_run_downwards_through_the_layers():
    upward = [(m, t) for m, targets in import_graph().items() for t in targets
              if layer(m) is not None and layer(t) is not None and layer(t) > layer(m)]
    assert upward == []


def test_worker_code_never_imports_its_driver():
    graph = import_graph()
    for worker, driver in WORKERS.items():
        assert worker in graph, worker
        reach, todo = set(), [worker]
        while todo:
            for t in graph[todo.pop()] - reach:
                reach.add(t)
                todo.append(t)
        assert driver not in reach, f"{worker} imports {driver}"


def long_functions(paths) -> list[str]:
    out = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{path}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_is_longer_than_60_lines():
    assert long_functions([*PACKAGE.rglob("*.py"), *(REPO / "jobs").glob("*.py")]) == []


def test_the_length_check_sees_a_long_function(tmp_path):
    f = tmp_path / "long.py"
    f.write_text("def f():\n" + "    x = 1\n" * (MAX_FUNCTION_LINES - 1) + "\n\ndef g():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert [line.split()[-3] for line in long_functions([f])] == ["g"]  # 61 lines; f has 60


def test_a_function_local_import_is_an_edge_too(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n    return g\n")
    (tmp_path / "b.py").write_text("from . import a\n")
    known = {"pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py"}
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}} and cycles(graph) == [["pkg.a", "pkg.b"]]
