"""The product's shape, as docs/ARCHITECTURE.md states it: no import cycles (nor in the dev kit),
no file over 400 lines, nothing of the dev kit (local stack, sink, pytest plugin) in a product
package, and no layer reaching what is above or beside it."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ["common", "frontend", "policy", "rewriter", "relay", "ctl"]
MAX_LINES = 400


def product_modules() -> dict[str, Path]:
    """Module name → file, for every product package (the generated contracts aside)."""
    return modules_of(PRODUCT)


def modules_of(services: list[str]) -> dict[str, Path]:
    """Module name → file, for the packages under services/<service>/src of each of ``services``."""
    modules = {}
    for service in services:
        src = ROOT / "services" / service / "src"
        for path in src.glob("submitd_*/**/*.py"):
            parts = path.relative_to(src).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, at the top or inside a function, absolute or relative."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """Which of ``modules`` (the product's, unless given) each of them imports."""
    modules = product_modules() if modules is None else modules
    return {name: {m for m in imports_of(name, path) if m in modules and m != name} for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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


def test_the_product_has_no_import_cycles():
    edges = graph()
    assert len(edges) > 50, "the product's modules were not found"
    assert cycles(edges) == []


def test_the_dev_kit_has_no_import_cycles():
    """Its modules are imported in any order by the pytest plugin, the tests and the scripts:
    in a cycle, which one fails half-initialised depends on which comes first."""
    edges = graph(modules_of(["devkit"]))
    assert len(edges) > 10, "the dev kit's modules were not found"
    assert cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_product_file_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in product_modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_product_packages_hold_no_dev_kit():
    """The local stack, the sink and the pytest plugin live in submitd_devkit, which no product
    module imports and no image installs; submitd_common depends on no service."""
    edges = graph()
    for name, path in product_modules().items():
        imported = imports_of(name, path)
        assert not any(m.startswith("submitd_devkit") for m in imported), name
        if name.startswith("submitd_common"):
            assert not any(m.split(".")[0] in {f"submitd_{s}" for s in PRODUCT[1:]} for m in imported), name
    assert edges  # (the graph covers every module)
    for service in PRODUCT:
        project = tomllib.loads((ROOT / "services" / service / "pyproject.toml").read_text())["project"]
        assert "pytest11" not in project.get("entry-points", {}), service
        assert not any("devkit" in d for d in project.get("dependencies", [])), service
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "services/devkit" not in dockerfile and "services/devkit" in (ROOT / ".dockerignore").read_text()


def reaches(module: str) -> set[str]:
    """Everything ``module`` imports, directly or through the product modules it imports."""
    modules = product_modules()
    seen, todo, found = set(), [module], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in modules:
            continue
        seen.add(name)
        imported = imports_of(name, modules[name])
        found |= imported
        todo.extend(imported)
    return found


# (module, what it must never reach): the layers of docs/ARCHITECTURE.md, kept by the imports.
LAYERS = [
    # The frontend's wire layer, replies and session state: pure, no I/O of any kind.
    *[(f"submitd_frontend.{m}", ["asyncio", "aiosmtpd", "grpc", "nats", "ssl", "socket"])
      for m in ("wire", "replies", "state")],
    # The session layer talks to a Connection and Backends, never to aiosmtpd or the I/O layer.
    *[(f"submitd_frontend.{m}", ["aiosmtpd", "submitd_frontend.smtp", "submitd_frontend.aiosmtpd_adapter"])
      for m in ("session", "transaction")],
    # Policy's rules check an Ask; they never reach the stream, AUTH or the lockouts.
    ("submitd_policy.rules", ["grpc", "submitd_policy.service", "submitd_policy.auth",
                              "submitd_policy.lockouts", "submitd_policy.decisions"]),
    # The relay's settling plan is a pure function; the admin API never imports the consumer.
    ("submitd_relay.settle", ["asyncio", "nats", "grpc", "aiosmtplib", "submitd_relay.consumer"]),
    ("submitd_relay.admin", ["submitd_relay.consumer"]),
]


@pytest.mark.parametrize("module,forbidden", LAYERS, ids=[m for m, _ in LAYERS])
def test_a_layer_never_reaches_what_is_above_or_beside_it(module, forbidden):
    assert module in product_modules()
    found = reaches(module)
    bad = sorted(m for m in found if any(m == f or m.startswith(f + ".") for f in forbidden))
    assert not bad, f"{module} reaches {bad}"


def test_the_layer_check_sees_what_a_module_reaches():
    assert "grpc" in reaches("submitd_frontend.session")  # through backends
    assert "aiosmtpd.smtp" in reaches("submitd_frontend.smtp")
