"""The import graph of defend/, recipes/ and launchers/ (every import, top-level or inside a function,
read from the source): no cycles, and the library never reaches up into the CLI, a recipe or a launcher
(data flows config -> recipe -> library; the CLI and launchers sit on top)."""
import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("defend", "recipes", "launchers")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for file in (ROOT / package).rglob("*.py"):
            name = ".".join(file.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = file
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (``from a.b import c`` counts a.b.c when that is a module)."""
    mods = modules()

    def ours(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, file in mods.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets.update([base, *(f"{base}.{alias.name}" for alias in node.names)])
        graph[name] = {m for t in targets if (m := ours(t)) and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
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


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert "defend.models.archs.base" in graph["defend.models.archs.llava"]  # from defend.models.archs.base import ...
    assert "defend.runner" in graph["defend.cli"] and "launchers.ray_train" in graph["defend.cli"]  # inside functions
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the detector finds one


def test_no_module_imports_itself_back():
    assert cycles(import_graph()) == []


def test_the_library_never_imports_the_cli_a_recipe_or_a_launcher_and_recipes_never_the_cli():
    graph = import_graph()
    upward = sorted((module, target) for module, targets in graph.items() if module.startswith("defend.")
                    and module != "defend.cli" for target in targets
                    if target == "defend.cli" or target.startswith(("recipes", "launchers")))
    assert upward == []
    assert sorted(m for m, targets in graph.items() if m.startswith(("recipes", "launchers")) and "defend.cli" in targets) == []
