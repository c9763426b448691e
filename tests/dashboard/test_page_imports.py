"""Pages are thin scripts: they import only ``dashboard.*`` (and streamlit, pandas, numpy,
the standard library), never the ``ccamerge`` library itself, not even inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PAGES = sorted((Path(__file__).resolve().parents[2] / "pages").glob("*.py"))
IMPORTERS = {"import_module", "__import__"}  # importlib.import_module("x"), __import__("x")


def _is_library(module: str | None) -> bool:
    return module is not None and module.split(".")[0] == "ccamerge"


def _call_target(node: ast.Call) -> str | None:
    """The module named by ``import_module("...")`` or ``__import__("...")``, else None."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name in IMPORTERS and node.args and isinstance(node.args[0], ast.Constant):
        return str(node.args[0].value)
    return None


def library_imports(source: str) -> list[str]:
    """``"line: module"`` for every import of ``ccamerge`` anywhere in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module] if node.level == 0 else []
        elif isinstance(node, ast.Call):
            modules = [_call_target(node)]
        else:
            continue
        found += [f"{node.lineno}: {m}" for m in modules if _is_library(m)]
    return found


def test_there_are_pages_to_check():
    assert len(PAGES) >= 9, PAGES


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_a_page_imports_only_dashboard_modules(page):
    assert library_imports(page.read_text()) == []


@pytest.mark.parametrize("source", [
    "import ccamerge",
    "import ccamerge.errors as errors",
    "import numpy, ccamerge.methods",
    "from ccamerge.methods import METHODS",
    "from ccamerge import api",
    "def f():\n    from ccamerge.errors import CcamergeError\n    return CcamergeError",
    "if True:\n    import ccamerge.models",
    "import importlib\nimportlib.import_module('ccamerge.data')",
    "__import__('ccamerge')",
])
def test_the_check_finds_every_way_to_import_the_library(source):
    assert len(library_imports(source)) == 1


@pytest.mark.parametrize("source", [
    "from dashboard import catalog, widgets",
    "import streamlit as st\nst.caption('`ccamerge spec` prints it')",
    "import ccamerge_extras",
    "from . import ccamerge",
    "from dashboard.ccamerge import x",
])
def test_the_check_leaves_other_imports_alone(source):
    assert library_imports(source) == []
