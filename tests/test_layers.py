"""The package boundaries of docs/architecture.md, checked on the source.

`router` depends on `actors`, never the reverse. Inside `router` the packages are layers, each
importing only downward (type-only imports under `if TYPE_CHECKING:` count: they are still a
dependency a reader must follow):

    serving                  server, workers, reload, assembly          (and the CLI above it)
    face                     the ASGI app, answers, admin, the Gateway snapshot
    cascade                  the dispatcher and its policy
    keys                     client keys, limits, the budgets' books
    state                    what replicas share (Redis)
    dialects                 OpenAI's and Anthropic's shapes, translation
    config                   the config document and its parts (beside the actors)
    telemetry, web           metrics, logs and the feed; ASGI plumbing and hypercorn
    errors, units            the leaves: the request error, durations and sizes

`tools` (the mock upstream, the load tester, the status client) stands beside the gateway: it
may use what is below the face, and nothing of the gateway imports it but serving and the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RANK = {
    "errors": -1,
    "units": -1,
    "telemetry": 0,
    "web": 0,
    "config": 1,
    "dialects": 2,
    "state": 3,
    "keys": 4,
    "cascade": 5,
    "face": 6,
    "serving": 7,
    "cli": 8,
    "__main__": 9,
}
TOOLS = "tools"
TOOLS_USERS = {"serving", "cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file (functions and TYPE_CHECKING included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def package_of(module: str) -> str | None:
    """`router.face.app` -> `face`; `router.cli` -> `cli`; the `router` package itself -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "router" and len(parts) > 1 else None


def package_edges() -> dict[str, set[str]]:
    """Which router packages each router package imports (itself excluded)."""
    modules = {module_name(p): p for p in (ROOT / "router").rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        source = package_of(name)
        if source is None:
            continue
        targets = {package_of(m) for m in imports(path) if m in modules}
        edges.setdefault(source, set()).update(t for t in targets if t and t != source)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def upward(edges: dict[str, set[str]]) -> list[str]:
    """Every import that does not run down the layers (or into tools from where it may not)."""
    wrong = []
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            if target == TOOLS:
                ok = source in TOOLS_USERS
            elif source == TOOLS:
                ok = RANK.get(target, 99) < RANK["face"]
            else:
                ok = RANK.get(target, 99) < RANK.get(source, -1)
            if not ok:
                wrong.append(f"{source} -> {target}")
    return wrong


def test_actors_never_import_router() -> None:
    offenders = {
        module_name(p): sorted(m for m in imports(p) if m.split(".")[0] == "router")
        for p in (ROOT / "actors").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_every_router_package_has_a_layer() -> None:
    assert set(package_edges()) <= {*RANK, TOOLS}


def test_no_package_imports_up_the_layers() -> None:
    assert upward(package_edges()) == []


def test_no_import_cycle_between_packages() -> None:
    assert find_cycle(package_edges()) is None


def test_no_import_cycle_between_modules_of_actors() -> None:
    modules = {module_name(p): p for p in (ROOT / "actors").rglob("*.py")}
    edges = {n: {m for m in imports(p) if m in modules} - {n} for n, p in modules.items()}
    assert find_cycle(edges) is None


def test_the_checks_catch_a_cycle_and_an_upward_import() -> None:
    edges = package_edges()
    edges["cascade"] = {*edges.get("cascade", ()), "face"}  # as if the dispatcher used the app
    assert "cascade -> face" in upward(edges)
    assert find_cycle(edges) is not None
    assert upward({"tools": {"face"}, "keys": {"tools"}}) == ["keys -> tools", "tools -> face"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
