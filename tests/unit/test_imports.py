"""The import contract of docs/ARCHITECTURE.md ("Dependency direction"), read from the source (ast, so
lazy imports inside functions count too):

(a) every import points down the layer table below: a unit never imports a unit of a higher layer;
(b) no cycle between units (Tarjan's strongly connected components over the unit graph);
(c) the pure-Python layers (L0-L2) never import torch.

A unit is a package (or top-level module) of src/scaleinfer, or a part of a package the table places on
its own layer (kv_cache.block_manager on L1 while kv_cache's tensors are D2). Every source module must
belong to a unit: a new package gets a row here (and in the house plan). Failures name file:line and
the edge."""
from __future__ import annotations

import ast
import pathlib
from collections import defaultdict

SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "scaleinfer"
ROOT = SRC.parents[1]

LAYERS: list[tuple[str, tuple[str, ...]]] = [   # bottom to top
    ("L0", ("errors", "config", "sampling_params")),
    ("L1", ("request", "tokenizer", "catalog", "kv_cache.block_manager", "kv_cache.prefix_cache", "kv_cache.kept_encoder",
            "attention.patterns")),      # patterns: pure data the scheduler reads (no torch, see (c))
    ("L2", ("scheduler", "plan")),       # plan: the planner's arithmetic (pure Python)
    ("D0", ("kernels", "distributed.parallel_state", "distributed.communicators")),
    ("D1 layers", ("layers",)),          # D1 in order: layers below attention and quantization
    ("D1", ("attention", "quantization", "structured")),
    ("D2", ("models", "weights", "sampler", "spec_decode", "kv_cache")),   # kv_cache: its tensors
    ("D3", ("runner", "distributed")),   # distributed: workers / executor
    ("L3", ("engine", "speech")),   # speech: audio, features, the transcription loop over the engine
    ("L4", ("llm", "serving", "compress", "bench", "plan.command", "")),   # "": scaleinfer/__init__.py, the public API
    ("L4 cli", ("cli",)),                # nothing imports cli
    ("entry", ("__main__",)),
]
RANK = {unit: rank for rank, (_, units) in enumerate(LAYERS) for unit in units}
LAYER_NAME = {unit: name for name, units in LAYERS for unit in units}
PURE = {unit for unit, rank in RANK.items() if rank <= RANK["scheduler"]}


def unit_of(module: str) -> str | None:
    """The table unit of a module path relative to scaleinfer ("" is the package root)."""
    if not module:
        return ""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in RANK:
            return key
    return None


def source_modules():
    """(module path relative to scaleinfer, file, is_package) for every .py file."""
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        yield ".".join(parts), path, is_package


KNOWN = {module for module, _, _ in source_modules()}


def imports_of(module: str, path: pathlib.Path, is_package: bool):
    """(line, imported module path) for every import in the file, nested ones included; scaleinfer
    imports relative to the package (`scaleinfer.x.y` -> "x.y"), others as written (e.g. "torch")."""
    parts = module.split(".") if module else []
    package = parts if is_package else parts[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, _relative(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:   # relative: resolve against this file's package
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = _relative(node.module)
            for alias in node.names:   # `from scaleinfer.pkg import submodule` imports the submodule
                sub = f"{base}.{alias.name}" if base else alias.name
                yield node.lineno, sub if (base is not None and sub in KNOWN) else base


def _relative(name: str) -> str | None:
    """"scaleinfer.x.y" -> "x.y", "scaleinfer" -> "", anything else -> the name itself with a marker."""
    if name == "scaleinfer":
        return ""
    if name.startswith("scaleinfer."):
        return name.removeprefix("scaleinfer.")
    return "!" + name


def edges():
    """(file:line, from unit, to unit, imported module) for every import between two units."""
    for module, path, is_package in source_modules():
        src = unit_of(module)
        for line, imported in sorted(set(imports_of(module, path, is_package)), key=str):
            if imported is None or imported.startswith("!"):
                continue
            dst = unit_of(imported)
            if dst is not None and dst != src:
                yield f"{path.relative_to(ROOT)}:{line}", src, dst, imported


def _name(unit: str) -> str:
    return f"{unit or 'scaleinfer'} ({LAYER_NAME[unit]})"


def test_every_module_belongs_to_a_layer():
    lost = [str(path.relative_to(ROOT)) for module, path, _ in source_modules() if unit_of(module) is None]
    assert not lost, f"modules with no row in the layer table (add them here and to docs/ARCHITECTURE.md): {lost}"


def test_imports_point_down():
    upward = [f"{where}: {_name(src)} imports {imported or 'scaleinfer'} of {_name(dst)}"
              for where, src, dst, imported in edges() if RANK[dst] > RANK[src]]
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_nothing_imports_cli():
    bad = [f"{where}: {_name(src)} imports {imported}" for where, src, dst, imported in edges()
           if dst == "cli" and src != "__main__"]
    assert not bad, "only `python -m scaleinfer` may import the CLI:\n" + "\n".join(bad)


def test_kernels_import_only_config_and_errors():
    """The C++ library and its loader (D0) sit below every package that calls them."""
    bad = [f"{where}: {_name(src)} imports {imported}" for where, src, dst, imported in edges()
           if src in ("kernels", "quantization.kernels") and dst not in ("config", "errors")]
    assert not bad, "kernels may import only config and errors:\n" + "\n".join(bad)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one node (the cycles), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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


def test_strongly_connected_finds_cycles():
    """The checker itself: a 3-cycle and a 2-cycle found, a chain and a self-import not."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"f", "a"}}
    assert sorted(strongly_connected(graph)) == [["a", "b", "c"], ["d", "e"]]
    assert strongly_connected({"a": {"b"}, "b": {"c"}}) == []


def test_no_cycles_between_units():
    graph: dict[str, set[str]] = defaultdict(set)
    where: dict[tuple[str, str], str] = {}
    for at, src, dst, _ in edges():
        graph[src].add(dst)
        where.setdefault((src, dst), at)
    cycles = strongly_connected(graph)
    lines = [f"{where[(a, b)]}: {a or 'scaleinfer'} -> {b or 'scaleinfer'}"
             for cycle in cycles for a in cycle for b in cycle if (a, b) in where]
    assert not cycles, f"import cycles between units {cycles}; their edges:\n" + "\n".join(lines)


def test_pure_layers_do_not_import_torch():
    bad = [f"{path.relative_to(ROOT)}:{line}: {_name(unit_of(module))} imports {imported[1:]}"
           for module, path, is_package in source_modules() if unit_of(module) in PURE
           for line, imported in imports_of(module, path, is_package)
           if imported and imported.startswith("!") and imported[1:].split(".")[0] == "torch"]
    assert not bad, "the pure-Python layers (L0-L2) import torch:\n" + "\n".join(bad)
