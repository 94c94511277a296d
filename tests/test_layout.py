"""The package's layout is its architecture: wire formats import no I/O, and nothing below
`collector.app` imports it back (each server and the hub get the narrow interface they use)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "collector"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (TYPE_CHECKING blocks and functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).glob("*.py"))


@pytest.mark.parametrize("path", _modules("wire"), ids=lambda p: f"wire/{p.name}")
def test_wire_formats_do_no_io(path):
    """Sans-IO: the wire formats import neither the event loop nor sockets nor the layers above."""
    for name in _imports(path):
        top = name.split(".")[0]
        assert top not in {"trio", "trio_websocket", "socket", "asyncio", "selectors"}, name
        assert not name.startswith(("collector.core", "collector.servers", "collector.app")), name


@pytest.mark.parametrize(
    "path",
    _modules("core") + _modules("servers") + _modules("wire") + _modules("device"),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_nothing_below_the_app_imports_it(path):
    assert not {n for n in _imports(path) if n == "collector.app" or n.startswith("collector.app.")}
    assert not {
        n for n in _imports(path) if n == "collector.cli" or n.startswith("collector.tools")
    }


def test_the_core_does_not_import_the_servers():
    for path in _modules("core"):
        servers = {n for n in _imports(path) if n.startswith("collector.servers")}
        assert not servers, (path.name, servers)
