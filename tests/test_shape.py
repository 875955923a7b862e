"""The package's shape (issue 23, "One way through"): no module imports another that imports
it back, function-level imports included, none uses another's private names, and no class
or function grows past what a reader holds in mind. Read from the source with ast: nothing
is imported.

  python tests/test_shape.py     prints the import graph
"""
import ast
import os

import pytest

pytestmark = pytest.mark.pure

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ns_kernel")


def modules():
    return sorted(name[:-3] for name in os.listdir(PACKAGE) if name.endswith(".py"))


def imports(name, known):
    """(the package's modules `name` imports, anywhere in it; [(module, private name)] it
    takes from another)."""
    with open(os.path.join(PACKAGE, name + ".py")) as f:
        tree = ast.parse(f.read())
    deps, private = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:           # from .x import y
                module = node.module.split(".")[0]
            elif node.level == 0 and (node.module or "").startswith("ns_kernel."):
                module = node.module.split(".")[1]
            elif node.level == 1:                         # from . import x, y
                deps.update(a.name for a in node.names)
                continue
            else:
                continue
            deps.add(module)
            private += [(module, a.name) for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Import):
            deps.update(a.name.split(".")[1] for a in node.names
                        if a.name.startswith("ns_kernel."))
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id in known and node.value.id != name and _private(node.attr)):
            private.append((node.value.id, node.attr))     # x._y, x a module of ours
    return sorted(deps & set(known) - {name}), private


def _private(attr):
    return attr.startswith("_") and not attr.startswith("__")


def graph():
    known = modules()
    return {name: imports(name, known) for name in known}


def cycles(edges):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    edges = {name: deps for name, (deps, _) in graph().items()}
    assert cycles(edges) == []


def test_no_module_uses_anothers_private_names():
    used = {name: private for name, (_, private) in graph().items() if private}
    assert used == {}


# Lines, docstrings and comments included (they are read too).
MAX_CLASS, MAX_FUNCTION = 210, 100


def too_long(tree):
    """[(name, kind, lines)] of the classes and functions in tree over the limits."""
    found = []
    for node in ast.walk(tree):
        size = (node.end_lineno - node.lineno + 1) if hasattr(node, "end_lineno") else 0
        if isinstance(node, ast.ClassDef) and size > MAX_CLASS:
            found.append((node.name, "class", size))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > MAX_FUNCTION:
            found.append((node.name, "function", size))
    return found


def test_no_class_or_function_is_too_long():
    found = {}
    for name in modules():
        with open(os.path.join(PACKAGE, name + ".py")) as f:
            found.update({f"{name}.{what}": (kind, size)
                          for what, kind, size in too_long(ast.parse(f.read()))})
    assert found == {}


def test_the_check_sees_a_cycle_and_a_private_name():
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    deps, private = imports("template", modules())
    assert "sandbox" in deps and "warm" in deps and private == []
    long = ast.parse("def f():\n" + "    pass\n" * MAX_FUNCTION)
    assert too_long(long) == [("f", "function", MAX_FUNCTION + 1)]


if __name__ == "__main__":
    for name, (deps, private) in graph().items():
        print(f"{name:<14} -> {' '.join(deps)}" + (f"   PRIVATE {private}" if private else ""))
