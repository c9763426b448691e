"""What the AppTest files share: the app's path, the app opened on the demo, a page visit that
fails on any exception, and the text of a group of elements."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")


def assert_ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def opened(timeout: int = 180) -> AppTest:
    """The app after its first run (the demo selected), with ``timeout`` seconds per run."""
    at = AppTest.from_file(APP, default_timeout=timeout)
    at.run()
    assert_ok(at)
    return at


def visit(at: AppTest, page: str) -> AppTest:
    """Switch to ``pages/<page>.py`` (addressed from the entry point) and run it."""
    at.switch_page(f"../pages/{page}.py").run()
    assert_ok(at)
    return at


def texts(elements) -> str:
    return " | ".join(str(e.value) for e in elements)
