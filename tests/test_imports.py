"""The package's import graph: every module imports in a fresh interpreter, and no two modules import each other,
directly or around a circle (module-level and function-level ``import`` / ``from`` statements, read with ``ast``)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import networkx as nx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIRS = {"uniter_fast": "uniter_fast", "uniter_fast.kernels": "kernels"}  # as setup.py's package_dir
EXTENSIONS = {"uniter_fast._C": ""}  # setup.py's compiled module: a node that imports nothing

IMPORT_ALL = """
import importlib, pkgutil
import uniter_fast, uniter_fast.kernels
failed = []
for package in (uniter_fast, uniter_fast.kernels):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if info.name.endswith("__main__"):  # runs its CLI when imported
            continue
        try:
            importlib.import_module(info.name)
        except Exception as err:
            failed.append(f"{info.name}: {err!r}")
print("\\n".join(failed))
"""


def package_modules() -> dict[str, str]:
    """{module name: file} of every ``.py`` file of the package (packages named by their ``__init__.py``), and the
    compiled extension (file "")."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        root = os.path.join(REPO, folder)
        for directory, _, files in os.walk(root):
            for name in files:
                if not name.endswith(".py"):
                    continue
                parts = os.path.relpath(os.path.join(directory, name), root)[: -len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join([package, *parts])] = os.path.join(directory, name)
    return {**modules, **EXTENSIONS}


def imported_modules(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The package modules that module ``name`` imports anywhere in its file (``from a import b`` counts as a.b when
    that is a module, else as a)."""
    if not path:
        return set()
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
    return {m for m in found if m in modules and m != name}


def import_graph() -> nx.DiGraph:
    """The package's import graph: an edge a -> b when module a imports module b."""
    modules = package_modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        graph.add_edges_from((name, imported) for imported in imported_modules(name, path, modules))
    return graph


def circles(graph: nx.DiGraph) -> list[set[str]]:
    """The strongly connected components of more than one module."""
    return [c for c in nx.strongly_connected_components(graph) if len(c) > 1]


def test_circles_finds_a_circle_and_nothing_else() -> None:
    graph = nx.DiGraph([("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")])
    graph.add_node("e")
    assert circles(graph) == [{"a", "b", "c"}]


def test_the_import_graph_has_no_circle() -> None:
    graph = import_graph()
    assert "uniter_fast.checkpoint" in graph and "uniter_fast.kernels.ipot" in graph
    assert graph.has_edge("uniter_fast.model.uniter", "uniter_fast.checkpoint")
    assert circles(graph) == []


def floor_imports(graph: nx.DiGraph, source: str, target: str) -> list[tuple[str, str]]:
    """Edges from modules under ``source`` to modules under ``target`` (dotted prefixes)."""
    under = lambda name, prefix: name == prefix or name.startswith(prefix + ".")  # noqa: E731
    return [(a, b) for a, b in graph.edges if under(a, source) and under(b, target)]


FLOORS = {
    0: ("config", "files", "layout", "backends", "syncs", "errors", "entry", "json_types"),
    1: ("kernels", "_C", "losses", "ot", "checkpoint", "checkpoint_layouts", "hub"),
    2: ("model", "extract"),
    3: ("data", "importers"),
    4: ("training",),
    5: ("pretraining", "tasks"),
    6: ("pretraining.run", "finetuning", "inference"),
    7: ("pretrain", "finetune", "evaluate", "benchmark", "build", "info", "predict", "search", "convert", "demo"),
}
"""docs/architecture.md's floors: module prefixes under ``uniter_fast`` (the longest prefix decides: the commands
``extract.cli`` / ``extract.__main__`` sit on floor 7 above the detector's library)."""
FLOORS[7] += ("extract.cli", "extract.__main__")
PROBES = {("uniter_fast.backends", "uniter_fast._C")}
"""Imports that only probe whether something loads (the compiled extension, as ``backends`` probes Triton)."""


def floor_of(module: str) -> int:
    """The floor of a package module (its longest prefix in :data:`FLOORS`); KeyError for one that has none. The
    package itself is on the top floor: its public names (``Model``, ``Pipeline``) come from the floors below."""
    if module == "uniter_fast":
        return max(FLOORS)
    matches = [
        (len(prefix), floor)
        for floor, prefixes in FLOORS.items()
        for prefix in prefixes
        if module == f"uniter_fast.{prefix}" or module.startswith(f"uniter_fast.{prefix}.")
    ]
    if not matches:
        raise KeyError(f"{module} is on no floor of docs/architecture.md")
    return max(matches)[1]


def test_every_module_is_on_a_floor_and_imports_no_floor_above() -> None:
    graph = import_graph()
    floors = {m: floor_of(m) for m in graph.nodes}
    upwards = [(a, b) for a, b in graph.edges if floors[b] > floors[a] and (a, b) not in PROBES]
    assert upwards == []
    assert floor_of("uniter_fast.extract.cli") == 7 and floor_of("uniter_fast.extract.extractor") == 2


def test_floors_import_only_downwards() -> None:
    """The floors of docs/architecture.md: fine-tuning uses nothing of pretraining, the training floor nothing of
    the recipes or tasks, data (importers included) nothing of tasks, the model nothing above it."""
    graph = import_graph()
    forbidden = [
        ("uniter_fast.finetuning", "uniter_fast.pretraining"),
        ("uniter_fast.training", "uniter_fast.pretraining"),
        ("uniter_fast.training", "uniter_fast.finetuning"),
        ("uniter_fast.training", "uniter_fast.tasks"),
        ("uniter_fast.data", "uniter_fast.tasks"),
        ("uniter_fast.data", "uniter_fast.training"),
        ("uniter_fast.model", "uniter_fast.data"),
        ("uniter_fast.model", "uniter_fast.training"),
        ("uniter_fast.tasks", "uniter_fast.inference"),
        ("uniter_fast.data", "uniter_fast.inference"),
        ("uniter_fast.extract", "uniter_fast.inference"),
        ("uniter_fast.importers", "uniter_fast.tasks"),
        ("uniter_fast.importers", "uniter_fast.training"),
        ("uniter_fast.data", "uniter_fast.importers"),
        ("uniter_fast.model", "uniter_fast.importers"),
    ]
    assert [edge for pair in forbidden for edge in floor_imports(graph, *pair)] == []
    scripts = {
        f"uniter_fast.{name}"
        for name in ("pretrain", "finetune", "evaluate", "build", "info", "predict", "search", "convert", "demo.cli")
    }
    runs = lambda a, b: a == b.rpartition(".")[0] + ".__main__"  # noqa: E731  (python -m pkg runs pkg's command)
    assert [(a, b) for a, b in graph.edges if b in scripts and not runs(a, b)] == []  # no script imports a script
    assert graph.has_edge("uniter_fast.demo.__main__", "uniter_fast.demo.cli")


def gradio_imports(path: str) -> list[tuple[int, bool]]:
    """(line, whether at module level) of every ``import gradio`` / ``from gradio ...`` in the file ``path``."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if any(name.split(".")[0] == "gradio" for name in names):
            found.append((node.lineno, id(node) in top))
    return found


def test_only_the_demo_imports_gradio_and_only_when_it_runs() -> None:
    """gradio (the ``[demo]`` extra) is imported by ``uniter_fast/demo/`` alone, inside functions, so the package
    imports without it and a missing gradio is the demo's own one-line error."""
    found = {name: gradio_imports(path) for name, path in package_modules().items() if path}
    found = {name: lines for name, lines in found.items() if lines}
    assert set(found) == {"uniter_fast.demo.app"}, found
    assert not any(top for _, top in found["uniter_fast.demo.app"]), found


SHADOWED = """
import os, runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
import deepspeed, matplotlib.figure, torch.utils.tensorboard  # what a training run imports on its way
here = os.path.dirname(os.path.abspath(sys.argv[0]))
print([n for n, m in list(sys.modules.items()) if (getattr(m, "__file__", None) or "").startswith(here + os.sep)
       and not n.startswith("uniter_fast") and n not in ("__main__", "__mp_main__")])
"""


def test_scripts_run_from_inside_the_package_shadow_nothing() -> None:
    """``python uniter_fast/pretrain.py`` puts ``uniter_fast/`` first on ``sys.path``; the scripts edit no path, so
    no subpackage (``ot``, ``data``, ...) may be imported under a bare top-level name by anything they load."""
    for script in ("pretrain.py", "finetune.py"):
        path = os.path.join(REPO, "uniter_fast", script)
        env = {**os.environ, "PYTHONPATH": REPO, "DS_ACCELERATOR": "cpu"}
        cmd = [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {os.path.dirname(path)!r}); exec({SHADOWED!r})",
            path,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-2000:]
    for name in ("pretrain.py", "finetune.py", "evaluate.py", "build.py", "predict.py", "search.py"):
        with open(os.path.join(REPO, "uniter_fast", name), encoding="utf-8") as f:
            assert "sys.path" not in f.read(), name


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    env = {**os.environ, "PYTHONPATH": REPO}
    done = subprocess.run([sys.executable, "-c", IMPORT_ALL], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == ""
