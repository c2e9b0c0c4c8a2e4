"""The import direction of vijax's modules: no cycles, and no module imports from a layer above
its own (STYLE.md: data flows one way). Read from the source with ``ast`` (imports at module
top and inside functions alike), so nothing is imported and nothing compiles."""

import ast
import fnmatch
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "vijax"

LAYERS = (
    # (label, module patterns), from the bottom up: a module imports only from its own layer
    # (the cycle test keeps those imports one-way) and the layers below it
    ("foundations", ("vijax.version", "vijax.optim", "vijax.psis", "vijax.curvature",
                     "vijax.estimators", "vijax.convergence", "vijax.datasets", "vijax.data",
                     "vijax.stream", "vijax.nets", "vijax.locals", "vijax.nn.priors",
                     "vijax.nn.value", "vijax.memory_maps", "vijax.launch",
                     "vijax.placement", "vijax.device_memory")),
    # Bayesian layers are declared in models beside latents (vijax.model reads them)
    ("model", ("vijax.nn.layers", "vijax.model", "vijax.net_params")),
    # CAVI for the Gaussian mixture: its own conjugate updates; gmm_model builds a vj.Model
    ("closed-form VI", ("vijax.cavi",)),
    # sparse variational GPs: their own closed-form ELBO, natural gradients and loop; the
    # kernels' hyper-parameters are vj.Param declarations
    ("Gaussian processes", ("vijax.gp", "vijax.gp.*")),
    ("target", ("vijax.target",)),
    ("model front ends", ("vijax.numpyro_data", "vijax.numpyro_sites",
                          "vijax.numpyro_subsample", "vijax.numpyro_adapter")),
    ("guides", ("vijax.guides", "vijax.guides.*")),
    ("objective", ("vijax.objective", "vijax.objective_local", "vijax.objective_wake_sleep")),
    ("loop", ("vijax.loop",)),
    ("preconditioning", ("vijax.precondition",)),
    # what FitResult's methods call (res.plot, res.to_arviz, res.save): duck-typed on the
    # result, so that result can import them
    ("result presentation", ("vijax.plots", "vijax.arviz_export", "vijax.checkpoint",
                             "vijax.checkpoint.archive", "vijax.checkpoint.config",
                             "vijax.checkpoint.write")),
    ("result", ("vijax.result",)),
    ("checks", ("vijax.checks",)),
    ("start", ("vijax.start", "vijax.feeding")),
    ("program", ("vijax.program", "vijax.memory")),
    ("trust", ("vijax.trust", "vijax.local_weights")),
    ("driver", ("vijax.driver", "vijax.driver_local")),
    ("stages", ("vijax.stages",)),
    ("fit", ("vijax.fit", "vijax.many", "vijax.lanes")),
    ("analysis", ("vijax.predictive", "vijax.checkpoint.read", "vijax.io",
                  "vijax.local_result", "vijax.nn.results", "vijax.nn", "vijax.metrics")),
    ("caches", ("vijax.caches",)),
    ("package", ("vijax",)),
)

EXCEPTIONS = {
    # Model.__post_init__ builds the model's Target from its latent declarations (a lazy
    # import inside the method): the model spec comes first in the data flow, but its
    # unconstrained parameterisation is built by target.py, which knows nothing of Model
    ("vijax.model", "vijax.target"),
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """The vijax modules a module imports, at any depth (functions, methods, branches), except
    under ``if TYPE_CHECKING:`` (annotations only, never run)."""

    def __init__(self, name: str, is_package: bool, modules: dict):
        self.package = name if is_package else name.rpartition(".")[0]
        self.modules = modules
        self.found: list[tuple[str, int]] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] == "vijax":
                self.found.append((alias.name, node.lineno))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: from the importing module's package
            anchor = self.package.split(".")[:len(self.package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        if base.split(".")[0] != "vijax":
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self.found.append((sub if sub in self.modules else base, node.lineno))


def _graph() -> dict[str, dict[str, int]]:
    """``{importer: {imported: line}}`` over every module of the package."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        visitor = _Imports(name, path.name == "__init__.py", modules)
        visitor.visit(ast.parse(path.read_text(), str(path)))
        edges: dict[str, int] = {}
        for target, line in visitor.found:
            if target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def _layer(name: str) -> int | None:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return i
    return None


def _where(graph, a: str, b: str) -> str:
    path = _modules()[a].relative_to(PACKAGE.parent)
    return f"{path}:{graph[a][b]} imports {b}"


GRAPH = _graph()


def test_the_graph_sees_the_package():
    # a guard for the parser: the known spine of the package is found
    assert "vijax.driver" in GRAPH["vijax.fit"] and "vijax.guides.base" in GRAPH["vijax.result"]
    assert "vijax.target" in GRAPH["vijax.model"]  # a lazy import inside a method


def test_every_module_has_a_layer():
    missing = sorted(name for name in GRAPH if _layer(name) is None)
    assert not missing, (f"modules without a layer: {missing}; add each to LAYERS in "
                         "tests/test_architecture.py, above everything it imports")


def test_no_import_cycles():
    # Tarjan's strongly connected components; any component of more than one module is a cycle
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, {}):
            if w not in GRAPH:
                continue
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
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    found = {tuple(_shortest_cycle(v, set(c))) for c in cycles for v in c}
    details = [" -> ".join(cycle + (cycle[0],)) + "\n    " + "\n    ".join(
        _where(GRAPH, a, b) for a, b in zip(cycle, cycle[1:] + (cycle[0],), strict=True))
        for cycle in sorted(found)]
    assert not cycles, "import cycles:\n" + "\n".join(details)


def _shortest_cycle(start: str, component: set) -> list[str]:
    """The shortest import cycle through ``start`` inside its strongly connected component,
    rotated to begin at its smallest module name (so that each cycle is reported once)."""
    parent, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in GRAPH[v]:
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    path.reverse()
                    i = path.index(min(path))
                    return path[i:] + path[:i]
                if w in component and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def test_imports_follow_the_layers():
    wrong = []
    for a, edges in GRAPH.items():
        for b in edges:
            la, lb = _layer(a), _layer(b)
            if la is None or lb is None or lb <= la or (a, b) in EXCEPTIONS:
                continue
            wrong.append(f"{_where(GRAPH, a, b)}: layer '{LAYERS[lb][0]}' is above "
                         f"'{LAYERS[la][0]}'")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


@pytest.mark.parametrize("edge", sorted(EXCEPTIONS), ids="->".join)
def test_exceptions_are_still_needed(edge):
    a, b = edge
    assert b in GRAPH.get(a, {}), f"{a} no longer imports {b}: remove the exception"
    assert _layer(b) > _layer(a), f"{a} -> {b} follows the layers now: remove the exception"
