"""The project's shape: the card's files on top, one package below, imports that run one way."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"make_masks", "data", "model", "train", "evaluate", "test_smoke"}
FOLDERS = ("ctkit", "tools", "bench", "docs/study")  # where project code lives besides the top level


def module_name(path):
    """ctkit/prep.py -> ctkit.prep; train.py -> train; tools/predict.py -> tools/predict (a script)."""
    relative = path.relative_to(ROOT).with_suffix("")
    if relative.parts[0] == "ctkit":
        return ".".join(relative.parts)
    return relative.as_posix()


def project_modules():
    files = sorted(ROOT.glob("*.py")) + [p for f in FOLDERS for p in sorted((ROOT / f).glob("*.py"))]
    return {module_name(p): p for p in files if p.name != "__init__.py"}


def imports_of(path, known):
    """The project modules a file imports, anywhere in it (module level or inside a function), and which of
    them are imported inside a function: (set, set)."""
    tree, found, inside = ast.parse(path.read_text()), set(), set()
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    nested = {id(n) for f in functions for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        hits = {n for n in names if n in known}
        found |= hits
        if id(node) in nested:
            inside |= hits
    return found, inside


def import_graph():
    modules = project_modules()
    return {name: imports_of(path, modules)[0] - {name} for name, path in modules.items()}


def find_cycle(graph):
    """One cycle of a {node: successors} graph as a list [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == "open":
                return stack[stack.index(successor) :] + [successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_hand_made_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"x"}}) == ["x", "x"]


def test_top_level_python_files_are_the_cards():
    assert {p.stem for p in ROOT.glob("*.py")} == SCRIPTS


def test_no_import_cycle():
    graph = import_graph()
    assert "ctkit.prep" in graph and "train" in graph  # the walk sees the project
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_imports_run_one_way():
    """The package never imports a script; utils (plumbing) imports nothing of the project; no project module
    is imported inside a function (that is how the old cycles were hidden)."""
    modules = project_modules()
    for name, path in modules.items():
        found, inside = imports_of(path, modules)
        if name.startswith("ctkit."):
            assert all(m.startswith("ctkit") for m in found), (name, found)
        assert not inside, f"{path.name} imports {inside} inside a function"
    assert import_graph()["ctkit.utils"] == set()


@pytest.mark.parametrize("name", ["data", "model", "ctkit"])
def test_no_sys_exit_below_the_scripts(name):
    """Library code raises; only the scripts' entry points (cli) turn an error into a message and a status."""
    paths = sorted((ROOT / name).glob("*.py")) if (ROOT / name).is_dir() else [ROOT / f"{name}.py"]
    for path in paths:
        tree = ast.parse(path.read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "sys.exit"]
        raises = [n for n in ast.walk(tree) if isinstance(n, ast.Raise) and "SystemExit" in ast.unparse(n)]
        assert not calls and not raises, path


@pytest.mark.parametrize("script", ["train", "evaluate", "make_masks"])
def test_each_flag_is_declared_once_as_a_settings_field(script):
    """The scripts' flags come from their Settings dataclass (utils.flag): no second declaration in a
    parser, and every flag sets the field of its name."""
    import dataclasses
    import importlib

    module = importlib.import_module(script)
    assert "add_argument" not in (ROOT / f"{script}.py").read_text()
    flagged = [f.name for f in dataclasses.fields(module.Settings) if "argparse" in f.metadata]
    actions = [a for a in module.get_args_parser()._actions if a.dest != "help"]
    assert [a.dest for a in actions] == flagged
