"""Imports under `app/` go one way: down the layers below, and never round a cycle.

Every module is parsed with `ast` (not imported), and every import counts: at the top, inside a
function (the CLI's lazy imports), and under `if TYPE_CHECKING:` (a cycle the type checker needs
is still a cycle in the design). Importing `app.a.b` runs `app/a/__init__.py` first, so it counts
as importing the package `app.a` too, except from inside that package.

The layers, bottom first; a module may import its own layer or a lower one:

1. foundation: errors, config, models, ids, metrics, protocol, the pure parts of auth
   (principal, guard), `live` (what the node sees of a socket), HTTP/SSE/WebSocket plumbing;
2. the one owner of each dependency: keystore (Redis), ledger (SQL), upstream and its pool
   (OpenAI), conversation memory, the raw forwarding path; a turn, and its usage and cost (on
   its ledger row);
3. auth over the store: the node's view of the store, the digest filter, the authenticator and
   the expulsion sweep;
4. the node and routing (what a node holds, and check 5 against it);
5. the session;
6. HTTP handlers: the handshake, the POST relay, the customer's model list, the admin API;
7. the programs: the app factory, the console script, its runner and supervisor, the dev
   setup, the simulator and the bench.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app"

LAYERS: list[list[str]] = [
    [
        "app",
        "app.errors",
        "app.config",
        "app.dsn",
        "app.redisconn",
        "app.models",
        "app.ids",
        "app.metrics",
        "app.protocol",
        "app.redact",
        "app.sse",
        "app.http",
        "app.logs",
        "app.shed",
        "app.places",
        "app.eventloop",
        "app.auth",
        "app.auth.principal",
        "app.auth.guard",
        "app.live",
        "app.turnpolicy",
        "app.clientlink",
    ],
    [
        "app.keystore",
        "app.ledger",
        "app.upstream",
        "app.pool",
        "app.memory",
        "app.rawpath",
        "app.turn",
        "app.usage",
    ],
    ["app.view", "app.auth.digests", "app.auth.authenticator", "app.spend"],
    ["app.node", "app.routing"],
    ["app.upstreamlink", "app.session"],
    ["app.handlers", "app.relay", "app.catalog", "app.admin"],
    [
        "app.server",
        "app.cli",
        "app.listener",
        "app.supervisor",
        "app.devsetup",
        "app.simulator",
        "app.bench",
        "app.__main__",
    ],
]


def module_names() -> dict[str, Path]:
    """Every module under app/, by dotted name (a package by its `__init__.py`)."""
    names: dict[str, Path] = {}
    for path in sorted(APP.rglob("*.py")):
        parts = list(path.relative_to(APP.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The module `name` loads: itself, or the longest enclosing module (`app.x.Name`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node: ast.AST, package: str, modules: dict[str, Path]) -> Iterator[str | None]:
    """The modules one import statement loads. `from p import n` loads the submodule `p.n` when
    there is one, else it reads `n` from `p` itself."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield _known(alias.name, modules)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            yield submodule if submodule in modules else _known(base, modules)


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = _package_of(name, path)
        own = {".".join(package.split(".")[:i]) for i in range(1, package.count(".") + 2)}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _targets(node, package, modules):
                if target is None or target == name:
                    continue
                graph[name].add(target)
                # Loading app.a.b runs app/a/__init__.py first: an edge to each enclosing
                # package, but not to one the importer is inside (it is already being loaded).
                parts = target.split(".")
                for i in range(1, len(parts)):
                    parent = ".".join(parts[:i])
                    if parent in modules and parent not in own:
                        graph[name].add(parent)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path that ends where it starts, or None (a depth-first walk)."""
    done: set[str] = set()
    path: list[str] = []

    def walk(name: str) -> list[str] | None:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return None
        path.append(name)
        for target in sorted(graph[name]):
            cycle = walk(target)
            if cycle is not None:
                return cycle
        path.pop()
        done.add(name)
        return None

    for start in sorted(graph):
        cycle = walk(start)
        if cycle is not None:
            return cycle
    return None


def layer_of(name: str) -> int | None:
    """The layer of the longest listed name that is `name` or a package holding it (the root
    package `app` holds no module here: each is placed on its own)."""
    best: tuple[int, int] | None = None
    for index, layer in enumerate(LAYERS):
        for listed in layer:
            holds = listed != "app" and name.startswith(listed + ".")
            if (name == listed or holds) and (best is None or len(listed) > best[1]):
                best = (index, len(listed))
    return None if best is None else best[0]


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "app.ledger" in graph["app.node"]  # under TYPE_CHECKING
    assert "app.server" in graph["app.cli"]  # inside a function
    assert "app.metrics" in graph["app.cli"]  # `from app import metrics`, inside a function


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    if cycle is not None:
        print("import cycle:", " -> ".join(cycle))
    assert cycle is None, " -> ".join(cycle or [])


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(name for name in module_names() if layer_of(name) is None)
    assert not unplaced, f"place these in LAYERS: {unplaced}"


def test_imports_go_down_the_layers() -> None:
    upward = []
    for name, targets in sorted(import_graph().items()):
        here = layer_of(name)
        for target in sorted(targets):
            there = layer_of(target)
            if here is not None and there is not None and there > here:
                upward.append(f"{name} (layer {here + 1}) imports {target} (layer {there + 1})")
    print("\n".join(upward))
    assert not upward, "\n".join(upward)
