"""The package's import graph has no cycles, counting imports inside functions too (a cycle hidden by a local
import is still a cycle: dependencies point down, cli -> harness -> api -> adapters / methods -> functional ->
kernels)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "vtprune"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
                ]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 50 and "vtprune.registry" in graph["vtprune.methods.divprune"]
    cycles = _cycles(graph)
    detail = [[f"{a} -> {b}" for a in c for b in sorted(graph[a] & set(c))] for c in cycles]
    assert not cycles, detail


def test_the_checker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_script_shadows_an_importable_package():
    """Running a script puts its folder first on ``sys.path``: a script named like an installed package (``kernels``:
    Hugging Face's kernels hub, which newer transformers import) or a standard-library module would shadow it."""
    import sys
    from importlib.metadata import packages_distributions
    from pathlib import Path

    taken = set(sys.stdlib_module_names) | set(packages_distributions())
    root = Path(__file__).resolve().parents[2]
    clashes = [str(p) for folder in ("eval", "eval/bench", "eval/gpu") for p in (root / folder).glob("*.py")]
    assert [p for p in clashes if Path(p).stem in taken] == []
