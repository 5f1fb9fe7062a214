"""The import graph: a service package imports ``schemas``, the shared packages
(``services.common``, ``services.models``, ``services.envs``) and itself, never another
service. Tools above the services (the CLI, ``flywheel up``, replay, the seed model, the
cluster's set-up) may run them. ``services.common`` holds only what services import, and no
module imports itself through others (no cycle, imports inside functions included).
"""

from __future__ import annotations

import ast
import importlib.metadata
import itertools
import re
import sys
import tomllib
from pathlib import Path

SERVICES = ("feeder", "generator", "scorer", "filter", "router", "trainer", "gate", "relay")
SHARED = ("common", "models", "envs")
ROOT = Path(__file__).resolve().parents[2] / "services"


def _imported(tree: ast.AST) -> list[str]:
    """Every module an import names: ``from services import envs`` names ``services.envs``."""
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                raise AssertionError("relative imports hide the graph; import by full name")
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def crossings(package: str, source: str) -> list[str]:
    """Modules of other service packages that ``source`` (a module of ``package``) imports."""
    allowed = {*SHARED, package}
    bad = []
    for name in _imported(ast.parse(source)):
        parts = name.split(".")
        if parts[0] == "services" and len(parts) > 1 and parts[1] in SERVICES \
                and parts[1] not in allowed:
            bad.append(name)
    return bad


def test_no_service_imports_another() -> None:
    found = {
        str(path.relative_to(ROOT.parent)): bad
        for package in SERVICES
        for path in sorted((ROOT / package).rglob("*.py"))
        if (bad := crossings(package, path.read_text(encoding="utf-8")))
    }
    assert found == {}
    assert sum(1 for p in SERVICES for _ in (ROOT / p).rglob("*.py")) > 30  # it read them


def _graph() -> dict[str, set[str]]:
    """Every module of ``services``, ``schemas`` and ``bench`` -> the modules of those it
    imports, wherever the import statement is."""
    top = ROOT.parent
    paths = {".".join(p.relative_to(top).with_suffix("").parts).removesuffix(".__init__"): p
             for d in ("services", "schemas", "bench") for p in (top / d).rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        found = set()
        for name in _imported(ast.parse(path.read_text(encoding="utf-8"))):
            while name and name not in paths:  # a name in a module: the module
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
        graph[module] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_through_others() -> None:
    graph = _graph()
    assert len(graph) > 100 and cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_services_common_holds_only_what_services_import() -> None:
    """Operators' tools (the local broker, topics and ACLs as code) live in
    ``services.cluster``; ``services.common`` is the services' shared runtime."""
    graph = _graph()
    users = {*SERVICES, *SHARED}
    common = [m for m in graph if m.startswith("services.common.")]
    unused = [m for m in common
              if not any(m in deps and u.split(".")[1] in users
                         for u, deps in graph.items() if u.startswith("services.")
                         and u.count(".") >= 2)]
    assert len(common) > 15 and unused == []


def test_the_check_sees_every_form_of_a_crossing() -> None:
    assert crossings("gate", "from services.trainer import metrics as m") == [
        "services.trainer.metrics"]
    assert crossings("gate", "import services.generator.stage") == ["services.generator.stage"]
    assert crossings("trainer", "from services import generator") == ["services.generator"]
    assert crossings("gate", "from services.models.manifest import verify\n"
                     "from services import envs\nfrom services.gate import rule\n"
                     "from schemas import Task") == []


def test_the_registry_names_every_service_package_and_its_cli_command() -> None:
    """One list of services: each has a package with its entry and settings class, and a
    ``flywheel run`` command; the replayable stages read the topic the one before writes."""
    from typer.main import get_command

    from services.cli import run_app
    from services.registry import REPLAYABLE
    from services.registry import SERVICES as REGISTERED

    assert set(REGISTERED) == set(SERVICES) - {"relay"}
    commands = set(get_command(run_app).commands)  # type: ignore[attr-defined]
    assert set(REGISTERED) <= commands
    for service in REGISTERED.values():
        assert (ROOT / service.settings.split(":")[0].split(".")[1]).is_dir()
        assert service.settings_class().model_fields["service"].default == service.name
    chain = [REGISTERED[n] for n in REPLAYABLE]
    assert [s.name for s in chain] == ["scorer", "filter", "router"]
    for before, after in itertools.pairwise(chain):
        assert after.stream_input in before.writes


def test_every_topic_has_a_reader_and_a_writer() -> None:
    """The topic list is the registry's: every topic a service reads, a service writes; a
    written topic no service reads is a state changelog or one kept for people (rejected
    trajectories, dead letters)."""
    from services.registry import SERVICES as REGISTERED
    from services.registry import TOOL_TOPICS, TOPICS

    reads = {t for s in REGISTERED.values() for t in s.reads}
    writes = {t for s in REGISTERED.values() for t in s.writes}
    assert reads <= writes
    unread = writes - reads
    assert unread == {"rejected", "dlq", "filter.state", "router.state", "gate.state"}
    assert set(TOPICS) == reads | writes | set(TOOL_TOPICS)
    assert len(TOPICS) == len(set(TOPICS))


LONG = 320
"""About 300 lines: longer, a module says why at its top."""


def test_a_long_module_says_why_it_is_long_at_its_top() -> None:
    top = ROOT.parent
    files = [p for d in ("services", "schemas", "bench") for p in (top / d).rglob("*.py")]
    assert len(files) > 50
    silent = []
    for path in files:
        source = path.read_text(encoding="utf-8")
        if source.count("\n") > LONG:
            doc = ast.get_docstring(ast.parse(source)) or ""
            if "Over 300 lines:" not in doc:
                silent.append(f"{path.relative_to(top)} ({source.count(chr(10))} lines)")
    assert silent == []


# What the stream image (deploy/Dockerfile's `stream`: the core dependencies, no extra) runs:
# the stream stages, with what they share and the CLI that starts them.
STREAM = ("schemas", "services/common", "services/envs", "services/feeder",
          "services/scorer", "services/filter", "services/router", "services/cluster",
          "services/cli.py", "services/registry.py")


def _module_level_imports(source: str) -> set[str]:
    """Top-level names imported by statements run at import (not inside a function)."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_stream_stages_import_only_core_dependencies() -> None:
    """A module a stream stage imports on start is in pyproject's dependencies, else the
    stream image fails on it (seen: tenacity and numpy, in the model extra or none)."""
    top = ROOT.parent
    project = tomllib.loads((top / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    owners = importlib.metadata.packages_distributions()
    missing = {}
    for part in STREAM:
        for path in sorted((top / part).rglob("*.py")) if (top / part).is_dir() else [top / part]:
            for name in _module_level_imports(path.read_text(encoding="utf-8")):
                if name in sys.stdlib_module_names or name in ("schemas", "services", "bench"):
                    continue
                dists = {d.lower().replace("_", "-") for d in owners.get(name, [name])}
                if not dists & core:
                    missing[f"{path.relative_to(top)}: {name}"] = sorted(dists)
    assert missing == {}
