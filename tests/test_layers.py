"""Imports point one way: each layer of app/ imports only layers below it, no module imports itself back
through another, and the service never imports the research tools (research/)."""

import ast
import itertools
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Top to bottom. A module may import its own package and any layer below its own, never one above.
LAYERS = [
    {"app.serve"},
    {"app.main"},
    {"app.loading"},  # builds a served model's engine: in the API's process, or in the engine process
    {"app.api"},
    {"app.engine", "app.metrics"},
    {"app.sampling"},
    {"app.guidance", "app.models"},
    {"app.rng", "app.pixels", "app.images", "app.config"},
]
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: str) -> dict[str, set[str]]:
    """module -> the app.* / research.* modules it imports (at any depth of its code: lazy imports count)."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / root).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[module_name(path)] = {n for n in names if n.split(".")[0] in ("app", "research")}
    return found


def package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_every_app_package_has_a_layer():
    assert {package(m) for m in imports("app")} - {"app"} <= set(RANK)


def test_no_layer_imports_a_layer_above_it():
    upward = [
        f"{module} -> {target}"
        for module, targets in imports("app").items()
        for target in targets
        if package(module) in RANK
        and package(target) != package(module)
        and RANK.get(package(target), -1) <= RANK[package(module)]
    ]
    assert not upward


def test_no_two_modules_import_each_other():
    graph = imports("app")
    circles = [(a, b) for a, b in itertools.combinations(graph, 2) if b in graph[a] and a in graph[b]]
    assert not circles


def test_the_service_never_imports_the_research_tools():
    assert not [(m, t) for m, targets in imports("app").items() for t in targets if t.startswith("research")]


def names_used(path: Path) -> set[str]:
    """Every name a module uses: imported names, bare names and attribute names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom | ast.Import):
            found.update(alias.name.split(".")[-1] for alias in node.names)
        elif isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
    return found


def engine_imports(path: Path) -> set[str]:
    """What a module imports from app.engine: 'module:name' for each name it takes from it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("app.engine"):
            found.update(f"{node.module}:{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(f"{a.name}:" for a in node.names if a.name.startswith("app.engine"))
    return found


def test_only_the_engine_touches_a_sample_run():
    """A request's live sampler state stays in the engine's thread: no module outside app/engine/ (and
    app/sampling/, which defines it) names SampleRun; the research tools are outside the service."""
    inside = ("app/engine/", "app/sampling/")
    touching = [
        str(path.relative_to(REPO))
        for path in sorted((REPO / "app").rglob("*.py"))
        if not str(path.relative_to(REPO)).startswith(inside) and "SampleRun" in names_used(path)
    ]
    assert not touching


def test_the_api_talks_to_the_engine_only_through_its_client_and_outputs():
    """app/api/ imports from app.engine only the package's interface: the client protocol (and ANONYMOUS, the client
    of a request that names none), the plain outputs and the errors; never the Engine, its scheduler or its compute
    thread (app.main builds those)."""
    allowed = {
        "ANONYMOUS",
        "EngineClient",
        "EngineClosedError",
        "Progress",
        "Finished",
        "Failed",
        "TraceRow",
        "CurvePoint",
    }
    reaching = [
        f"{path.relative_to(REPO)} -> {imported}"
        for path in sorted((REPO / "app" / "api").rglob("*.py"))
        for imported in engine_imports(path)
        if imported.split(":")[0] != "app.engine" or imported.split(":")[1] not in allowed
    ]
    assert not reaching
