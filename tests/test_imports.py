"""The package's import graph: no circle, and every import of minidetr's own modules at
the top of its file, where a reader sees it.

Walks the ast of minidetr/*.py (no module is imported to do it). Optional third-party
packages imported inside a function (matplotlib, pycocotools) are fine.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minidetr"


def own_imports(tree):
    """(node, module name) for every import of a minidetr module in an ast, at any depth."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "minidetr":
            if node.module == "minidetr":      # `from minidetr import box_ops, smca`
                for alias in node.names:
                    yield node, alias.name if (PACKAGE / f"{alias.name}.py").exists() else "__init__"
            else:
                yield node, node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("minidetr."):
                    yield node, alias.name.split(".")[1]


def import_graph():
    """{module: (set of own modules it imports at top level, [function-level imports])}."""
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        edges, hidden = set(), []
        for node, target in own_imports(tree):
            edges.add(target)
            if id(node) not in top:
                hidden.append(f"{path.name}:{node.lineno} imports {target}")
        graph[path.stem] = (edges - {path.stem}, hidden)
    return graph


def find_cycle(edges):
    """A list of modules forming a cycle in {module: set of modules}, or None (depth-first)."""
    state, stack = {}, []

    def visit(node):
        state[node], _ = "open", stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node], _ = "done", stack.pop()
        return None

    return next((c for n in sorted(edges) if n not in state and (c := visit(n))), None)


def test_find_cycle_on_hand_graphs():
    """The cycle finder itself: a -> b -> c -> a is found, a diamond is not a cycle."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None


def test_no_import_circle():
    """No module reaches itself through its imports of the package's own modules."""
    graph = import_graph()
    cycle = find_cycle({m: edges for m, (edges, _) in graph.items()})
    assert cycle is None, " -> ".join(cycle)


def test_no_function_level_imports_of_own_modules():
    """Every `from minidetr... import` sits at a module's top, not inside a function."""
    hidden = [h for _, (_, found) in sorted(import_graph().items()) for h in found]
    assert not hidden, hidden


def test_convert_is_a_leaf():
    """Nothing in the package imports convert.py (the official-checkpoint converter)."""
    assert [m for m, (edges, _) in import_graph().items() if "convert" in edges] == []


def test_the_data_knows_nothing_of_the_check_nor_of_the_training():
    """One way: check.py reads with the data's functions (how an image is decoded, what a box
    becomes, where a split's files are); data.py imports neither check.py nor the run's
    machinery (engine, checkpoint), so a dataset can be used without them."""
    graph = import_graph()
    assert "data" in graph["check"][0]
    assert not {"check", "engine", "checkpoint", "train"} & graph["data"][0]
    assert not {"check", "data"} & graph["checkpoint"][0]
