"""The layout of docs/architecture.md, checked against the code: every module of harness/ and
methods/ is in its module map, imports (module level and inside functions) point from a layer to
the same or a lower one, no import circle, a run's key hashes every module that computes it, and
no function in harness/ runs over 80 lines unless its docstring says why ("Long because")."""
import ast
import re
from pathlib import Path

import yaml

from harness import records

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "methods")
MAP_ROW = re.compile(r"^\|\s*`([a-z0-9_.]+)`\s*\|\s*(\d)\s*\|")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _owner(name: str, known) -> str | None:
    """The project module ``name`` denotes (a module, or a package for its attributes)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(name: str, path: Path, known) -> set[str]:
    """Project modules ``name`` imports anywhere in its source (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(_owner(alias.name, known) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(_owner(f"{base}.{alias.name}", known))
    found.discard(None)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def documented_layers() -> dict[str, int]:
    """Each module's layer as the map documents it; a method module it does not list (a new file
    in methods/, which needs no other edit) is a method: layer 1."""
    text = (ROOT / "docs/architecture.md").read_text()
    documented = {m.group(1): int(m.group(2)) for line in text.splitlines()
                  if (m := MAP_ROW.match(line))}
    return {**{name: 1 for name in modules() if name.startswith("methods.")}, **documented}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_imports_inside_functions():
    graph = import_graph()
    assert "harness.ray_executor" in graph["harness.sweep"]  # imported inside worker_pool
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_the_module_map_lists_every_module():
    documented, actual = documented_layers(), set(modules())
    assert sorted(actual - set(documented)) == [], "modules missing from docs/architecture.md"
    assert sorted(set(documented) - actual) == [], "docs/architecture.md lists modules that do not exist"


def test_imports_point_down_the_layers():
    layer = documented_layers()
    upward = [f"{a} (layer {layer[a]}) imports {b} (layer {layer[b]})"
              for a, targets in import_graph().items() for b in sorted(targets)
              if layer[b] > layer[a]]
    assert upward == []


def test_methods_never_import_harness():
    graph = import_graph()
    assert [(a, b) for a, targets in graph.items() if a.startswith("methods")
            for b in targets if b.startswith("harness")] == []


def test_the_run_key_hashes_every_module_a_run_imports():
    graph, todo, reached = import_graph(), ["harness.run"], set()
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(graph[name])
    hashed = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
              for entry in records.RUN_CODE for p in
              ((ROOT / entry).rglob("*.py") if (ROOT / entry).is_dir() else [ROOT / entry])}
    # harness.records computes the key (code_hash); what else it gives goes into the record only
    assert sorted(reached - hashed - {"harness.records"}) == []


def test_the_stages_that_compute_runs_depend_on_every_file_of_the_run_key():
    """A change to any file of ``RUN_CODE`` changes every run key, so the finetune and search
    stages, which compute runs, must name it among their deps: dvc would call them up to date."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in ("finetune", "search"):
        assert sorted(set(records.RUN_CODE) - set(stages[stage]["deps"])) == [], stage


def test_no_long_function_without_a_reason():
    """No function in harness/ over 80 lines, unless its docstring says why ("Long because")."""
    long = []
    for name, path in modules().items():
        if not name.startswith("harness"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                reason = "Long because" in (ast.get_docstring(node) or "")
                if lines > 80 and not reason:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []
