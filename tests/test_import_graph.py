"""No import cycles in trainer/ and pipelines/: every import counts, the ones inside functions too (a lazy import
only hides a cycle until the day someone hoists it). The graph comes from the source (ast); graphlib finds a
cycle and names it."""
from __future__ import annotations

import ast
import graphlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "pipelines")


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of PACKAGES (a package is its __init__.py)."""
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file, with the packages Python imports on the way."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # `from pkg import module` imports the module; `from module import name` not
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    edges = set()
    for target in targets:
        parts = target.split(".")
        edges.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in known)
    edges.discard(name)
    return edges


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_the_graph_sees_lazy_and_relative_imports():
    edges = graph()
    assert "trainer.vlm" in edges["trainer.vqa_task"]  # from .vlm import ArrCocVLM (relative)
    assert "trainer.tasks" in edges["pipelines.kfp_pipeline.steps.evaluate"]  # inside evaluate_adapter
    assert "pipelines.jobs" in edges["pipelines.jobs.local"]  # the package is imported on the way


def test_a_cycle_is_found_and_named():
    sorter = graphlib.TopologicalSorter({"a": {"b"}, "b": {"c"}, "c": {"a"}})
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        assert set(exc.args[1]) == {"a", "b", "c"}
    else:
        raise AssertionError("graphlib found no cycle")


def test_no_import_cycles():
    try:
        graphlib.TopologicalSorter(graph()).prepare()
    except graphlib.CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None
