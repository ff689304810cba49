"""The package's layering, read from the source (AST only: nothing is imported or compiled).

- `dynamicid_jax/models/` is generic SD code: it never imports `dynamicid_jax/dynamicid/` nor
  `dynamicid_jax/base_models/` (the families pass their configs down).
- No import cycles among the package's modules, counting function-local imports (they run
  later, but a cycle through them still ties two modules into one) and the package
  `__init__` that importing `a.b.c` runs first. Imports under `if TYPE_CHECKING:` never run
  and are not counted.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = "dynamicid_jax"
ROOT = pathlib.Path(__file__).resolve().parent.parent


def _modules() -> dict[str, tuple[pathlib.Path, bool]]:
    """Dotted module name -> (file, is_package)."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Absolute dotted names this module imports anywhere (a `from X import y` gives X.y)."""
    names, stack = [], [tree]
    package = module if is_package else module.rpartition(".")[0]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.extend(f"{source}.{a.name}" for a in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return [n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")]


def import_graph() -> dict[str, set[str]]:
    """module -> modules whose execution importing it triggers (directly)."""
    modules = _modules()
    graph = {}
    for module, (path, is_package) in modules.items():
        targets = set()
        for name in _imported_names(ast.parse(path.read_text()), module, is_package):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # a.b.c runs a, a.b, then a.b.c
                prefix = ".".join(parts[:i])
                ancestor = module == prefix or module.startswith(prefix + ".")
                if prefix in modules and not ancestor:  # ancestors are already running
                    targets.add(prefix)
        graph[module] = targets - {module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_graph_sees_the_package():
    graph = import_graph()
    # Guards against a reader that finds nothing (then the checks below pass vacuously).
    assert "dynamicid_jax.models.weight_sources" in graph["dynamicid_jax.models.unet"]
    assert "dynamicid_jax.models.layers" in graph["dynamicid_jax.dynamicid.saa"]
    assert "dynamicid_jax.models" in graph["dynamicid_jax.dynamicid.saa"]  # the __init__ it runs


def test_models_never_import_dynamicid():
    graph = import_graph()
    bad = {m: sorted(t for t in targets if t.startswith(f"{PACKAGE}.dynamicid"))
           for m, targets in graph.items() if m.startswith(f"{PACKAGE}.models")}
    assert {m: t for m, t in bad.items() if t} == {}


def test_models_never_import_base_models():
    """The base-model families pass their configs down (`base_models.single_file_config`);
    `models/` knows no family's numbers."""
    graph = import_graph()
    bad = {m: sorted(t for t in targets if t.startswith(f"{PACKAGE}.base_models"))
           for m, targets in graph.items() if m.startswith(f"{PACKAGE}.models")}
    assert {m: t for m, t in bad.items() if t} == {}


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _python_files(*folders: str) -> list[pathlib.Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


def _edits_sys_path(tree: ast.AST) -> bool:
    """True when the code calls a method of `sys.path` (insert, append, ...) or assigns to it."""
    def is_sys_path(node) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id == "sys")

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_sys_path(node.func.value):
            return True
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(is_sys_path(t) or (isinstance(t, ast.Subscript) and is_sys_path(t.value)) for t in targets):
                return True
    return False


def test_no_sys_path_edits_in_the_library_and_entry_points():
    """configs/ are reached through the installed package (they import the library's defaults),
    never by putting the repository on sys.path."""
    files = _python_files(PACKAGE, "launch", "data_pipelines")
    assert len(files) > 50
    assert [str(p.relative_to(ROOT)) for p in files if _edits_sys_path(ast.parse(p.read_text()))] == []


def test_sys_path_check_sees_an_edit():
    assert _edits_sys_path(ast.parse("import sys\nsys.path.insert(0, '.')"))
    assert _edits_sys_path(ast.parse("import sys\nsys.path += ['.']"))
    assert not _edits_sys_path(ast.parse("import sys\nprint(sys.path)"))


def test_library_never_imports_configs():
    """Defaults are owned by the library (`base_models`, `training.defaults`); configs import them."""
    bad = []
    for path in _python_files(PACKAGE):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "configs" or n.startswith("configs.")]
    assert bad == []
