"""perf/ is layered: the commands (``python -m perf.<name>``: the modules with a ``main`` or a
``__main__`` block) stand on a library (every other module) that never imports them, and no
perf module imports another in a cycle. Read from the source, imports inside functions included,
so a lazy import cannot hide a cycle."""

import ast
from pathlib import Path

PERF = Path(__file__).resolve().parents[1] / "perf"
COMMANDS = {"report", "training", "traffic", "overhead"}  # perf/README.md's commands


def _imported(tree: ast.AST, modules: set) -> set:
    """The perf modules a module imports anywhere in its source."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "perf" + (f".{node.module}" if node.module else "") if node.level else (
                node.module or "")
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            names = [str(node.args[0].value)]
        else:
            continue
        found |= {parts[1] for parts in (name.split(".") for name in names)
                  if len(parts) > 1 and parts[0] == "perf" and parts[1] in modules}
    return found


def _is_command(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "main":
            return True
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return True
    return False


def import_graph(folder: Path):
    """({module: perf modules it imports}, the command modules) of the package in ``folder``."""
    trees = {path.stem: ast.parse(path.read_text()) for path in sorted(folder.glob("*.py"))}
    graph = {name: _imported(tree, set(trees)) - {name} for name, tree in trees.items()}
    return graph, {name for name, tree in trees.items() if _is_command(tree)}


def find_cycle(graph: dict):
    """A list of modules [a, b, ..., a] that import each other in a circle, or None."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def library_importing_commands(graph: dict, commands: set) -> dict:
    return {name: sorted(imports & commands) for name, imports in graph.items()
            if name not in commands and imports & commands}


def test_perf_has_no_import_cycle():
    graph, _ = import_graph(PERF)
    cycle = find_cycle(graph)
    assert cycle is None, "perf modules import each other in a circle: " + " -> ".join(cycle)


def test_library_never_imports_a_command():
    graph, commands = import_graph(PERF)
    assert COMMANDS <= commands and "counting" not in commands, commands
    assert library_importing_commands(graph, commands) == {}


def test_the_checks_see_lazy_and_relative_imports(tmp_path):
    """A circle closed by a function-level import, and a library module importing a command
    inside a function, are both found."""
    sources = {
        "a.py": "from perf import b\n",
        "b.py": "def f():\n    from .a import x\n    return x\n",
        "c.py": "import perf.a\n\n\ndef main():\n    pass\n",
        "d.py": "import importlib\n\n\ndef f():\n    return importlib.import_module('perf.c')\n",
    }
    for name, text in sources.items():
        (tmp_path / name).write_text(text)
    graph, commands = import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"a"}, "c": {"a"}, "d": {"c"}}
    assert commands == {"c"}
    assert find_cycle(graph) == ["a", "b", "a"]
    assert library_importing_commands(graph, commands) == {"d": ["c"]}
