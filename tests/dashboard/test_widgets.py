"""dashboard.widgets' page helpers in small scripts run by AppTest: a library error that stops
the page or skips a block, and the progress bar's cleanup."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from ccamerge.errors import CcamergeError
from dashboard import widgets


def guarded_script(guard: str, problem: str) -> None:
    """Writes around a block under ``widgets.<guard>()`` that raises ``problem``."""
    import streamlit as st

    from ccamerge.errors import CcamergeError
    from dashboard import widgets

    with getattr(widgets, guard)():
        st.write("inside")
        if problem == "library":
            raise CcamergeError("the data does not fit the models")
        if problem == "bug":
            raise ValueError("a bug in the page")
        if problem == "stop":
            st.stop()
        st.write("inside, after")
    st.write("after")


def run(script, *args) -> AppTest:
    at = AppTest.from_function(script, args=args, default_timeout=30)
    return at.run()


def written(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown]


def test_stop_on_error_shows_one_error_and_stops_the_page():
    at = run(guarded_script, "stop_on_error", "library")
    assert not at.exception
    assert [e.value for e in at.error] == ["the data does not fit the models"]
    assert at.error[0].icon == ":material/error:"
    assert written(at) == ["inside"]


def test_continue_on_error_shows_one_error_and_goes_on_after_the_block():
    at = run(guarded_script, "continue_on_error", "library")
    assert not at.exception
    assert [e.value for e in at.error] == ["the data does not fit the models"]
    assert written(at) == ["inside", "after"]


@pytest.mark.parametrize("guard", ["stop_on_error", "continue_on_error"])
def test_other_exceptions_are_raised_not_shown(guard):
    at = run(guarded_script, guard, "bug")
    assert [e.value for e in at.exception] and "a bug in the page" in at.exception[0].value
    assert not at.error
    assert written(at) == ["inside"]


@pytest.mark.parametrize("guard", ["stop_on_error", "continue_on_error"])
def test_st_stop_inside_the_block_still_stops_the_page(guard):
    at = run(guarded_script, guard, "stop")
    assert not at.exception and not at.error
    assert written(at) == ["inside"]


@pytest.mark.parametrize("guard", ["stop_on_error", "continue_on_error"])
def test_without_a_problem_the_block_runs_through(guard):
    at = run(guarded_script, guard, "none")
    assert not at.exception and not at.error
    assert written(at) == ["inside", "inside, after", "after"]


def test_outside_a_script_run_stop_on_error_raises_the_error_again():
    with pytest.raises(CcamergeError, match="no data"), widgets.stop_on_error():
        raise CcamergeError("no data")
    with pytest.raises(KeyError), widgets.stop_on_error():
        raise KeyError("bug")


def progress_script(managed: bool, fail: bool) -> None:
    """A progress bar half way through a step, left or closed by the context manager inside
    ``stop_on_error`` (the order the pages use)."""
    import streamlit as st

    from ccamerge.errors import CcamergeError
    from dashboard import widgets

    if not managed:
        widgets.ProgressDisplay("working", 2).step(0, "first")(0.5, "half")
        st.stop()
    with widgets.stop_on_error(), widgets.ProgressDisplay("working", 2) as progress:
        progress.step(0, "first")(0.5, "half")
        if fail:
            raise CcamergeError("broke half way")
    st.write("done")


def test_a_progress_bar_is_removed_however_its_block_ends():
    left = run(progress_script, False, False)
    assert len(left.get("progress")) == 1  # the bar is there until it is removed
    assert left.get("progress")[0].proto.text == "first: half"
    for fail in (False, True):
        at = run(progress_script, True, fail)
        assert not at.exception
        assert len(at.get("progress")) == 0, fail
        assert [e.value for e in at.error] == (["broke half way"] if fail else [])
        assert written(at) == ([] if fail else ["done"])

