"""The house's layers (docs/architecture.md): modules import only downward, and no import cycle anywhere.

The walk reads every module's imports from its source (ast), lazy imports inside functions included (a lazy
upward import is still an upward dependency), `if TYPE_CHECKING:` blocks excluded. Each module of the package is
assigned a layer below; a module may import its own layer and the layers under it. `kernels` is a leaf that
imports jax and numpy only. The package's `__init__` (the public surface) stands above everything.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"gemma4_jax": ROOT / "gemma4_jax", "gemma4_jax.serving": ROOT / "serving",
                "gemma4_jax.kernels": ROOT / "kernels"}

CONFIGS, MATH, LOADING, FACADE, SERVING, TOP = range(6)
LAYER_NAMES = ["configs", "model math", "loading", "model facade", "serving", "CLI and benchmarks"]
LAYERS = {
    # configs: the ground floor
    "gemma4_jax.version": CONFIGS, "gemma4_jax.errors": CONFIGS, "gemma4_jax.tower_config": CONFIGS,
    "gemma4_jax.config": CONFIGS, "gemma4_jax.assistant_config": CONFIGS,
    # model math: modules and the forward; no file formats
    "gemma4_jax.layers": MATH, "gemma4_jax.quant": MATH, "gemma4_jax.attention": MATH,
    "gemma4_jax.attention_backends": MATH, "gemma4_jax.mlp": MATH, "gemma4_jax.moe": MATH,
    "gemma4_jax.decoder": MATH, "gemma4_jax.vision": MATH, "gemma4_jax.audio": MATH,
    "gemma4_jax.multimodal": MATH, "gemma4_jax.forward": MATH, "gemma4_jax.kv_view": MATH,
    "gemma4_jax.pallas_attention": MATH, "gemma4_jax.cpu_attention": MATH, "gemma4_jax.assistant": MATH,
    # loading: key tables, quantized formats, orbax, media processors (files and bytes -> arrays)
    "gemma4_jax.checkpoint_rules": LOADING, "gemma4_jax.quant_formats": LOADING, "gemma4_jax.checkpoint": LOADING,
    "gemma4_jax.orbax_io": LOADING, "gemma4_jax.processing": LOADING, "gemma4_jax.audio_processing": LOADING,
    "gemma4_jax.processor": LOADING,
    # the model facade
    "gemma4_jax.sharding": FACADE, "gemma4_jax.model": FACADE, "gemma4_jax.towers": FACADE,
    "gemma4_jax.random_weights": FACADE,
    "gemma4_jax.pipeline": FACADE, "gemma4_jax.memory": FACADE, "gemma4_jax.convert": FACADE,
    # CLI and benchmarks
    "gemma4_jax.cli": TOP,
}


def layer_of(module: str) -> int:
    if module in LAYERS:
        return LAYERS[module]
    if module.startswith("gemma4_jax.serving"):
        return SERVING
    if module.startswith("gemma4_jax.bench"):
        return TOP
    raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_layers.py (and docs/architecture.md)")


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = list(rel.parts)
            if parts[-1].startswith("test_"):
                continue  # tests beside a kernel are not part of the package's layers
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts]) if parts else package] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: pathlib.Path, module: str, known: set[str]) -> set[str]:
    """Package modules that `module` imports (absolute and relative), resolved to the deepest known module."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    out: set[str] = set()

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("gemma4_jax"):
                    out.add(resolve(alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            if base.startswith("gemma4_jax"):
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    full = f"{base}.{alias.name}"
                    out.add(full if full in known else resolve(base))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    out.discard(None)
    out.discard(module)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(p, m, known) for m, p in mods.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in sorted(graph.items()):
        if module == "gemma4_jax":  # the public surface re-exports from every layer
            continue
        if module.startswith("gemma4_jax.kernels"):
            bad += [f"{module} -> {d} (kernels are a leaf: jax only)" for d in sorted(deps)
                    if not d.startswith("gemma4_jax.kernels")]
            continue
        mine = layer_of(module)
        for dep in sorted(deps):
            if dep == "gemma4_jax":
                if mine == TOP:  # the CLI and benchmarks stand above the public surface
                    continue
                bad.append(f"{module} -> gemma4_jax (the public surface; import the defining module)")
            elif dep.startswith("gemma4_jax.kernels"):
                continue  # any layer may call a kernel
            elif layer_of(dep) > mine:
                bad.append(f"{module} ({LAYER_NAMES[mine]}) -> {dep} ({LAYER_NAMES[layer_of(dep)]})")
    return bad


def test_every_module_has_a_layer():
    for module in import_graph():
        if module != "gemma4_jax" and not module.startswith("gemma4_jax.kernels"):
            layer_of(module)


def test_imports_point_down():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


@pytest.mark.parametrize("edge, what", [
    (("gemma4_jax.config", "gemma4_jax.vision"), "upward"),  # a config importing a tower module
    (("gemma4_jax.pipeline", "gemma4_jax.serving.runner"), "upward"),  # the core importing the engine
    (("gemma4_jax.kernels.fp4_grouped_matmul.kernel", "gemma4_jax.quant"), "upward"),  # a kernel that is no leaf
    (("gemma4_jax.serving.runner", "gemma4_jax.serving.engine"), "cycle"),  # engine -> runner -> engine
])
def test_the_walk_catches_planted_violations(edge, what):
    """The checks are not vacuous: adding one bad edge to the real graph makes them fail."""
    graph = import_graph()
    assert upward_imports(graph) == [] and find_cycles(graph) == []
    source, target = edge
    graph[source] = graph[source] | {target}
    if what == "upward":
        assert any(line.startswith(source) for line in upward_imports(graph))
    else:
        assert any(source in c and target in c for c in find_cycles(graph))


def test_imports_are_read_from_source(tmp_path):
    """Lazy imports count, TYPE_CHECKING ones do not, `from pkg import submodule` resolves to the submodule."""
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nfrom gemma4_jax import checkpoint\n"
                   "if TYPE_CHECKING:\n    from gemma4_jax.model import Model\n"
                   "def f():\n    from gemma4_jax.serving.engine import Engine\n")
    known = set(modules())
    assert imports_of(src, "gemma4_jax.x", known) == {"gemma4_jax.checkpoint", "gemma4_jax.serving.engine"}
