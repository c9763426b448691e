"""dashboard.widgets' page helpers in small scripts run by AppTest: a library error that stops
the page or skips a block, the progress bar's cleanup, and the model + merge-point picker."""

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


def picker_script(stored_point: str | None, given_columns: bool) -> None:
    """The shared picker on a selection of three models (reference ``b``) and two points."""
    from types import SimpleNamespace

    import streamlit as st

    from dashboard import state, widgets

    if stored_point is not None and "seeded" not in st.session_state:
        st.session_state["seeded"] = True
        st.session_state["point"] = stored_point
    sel = state.Selection(("a", "b", "c"), 1, "digits")
    points = {"fc1": SimpleNamespace(width=64), "fc2": SimpleNamespace(width=32)}
    columns = st.columns(3)[:2] if given_columns else None
    other, point = widgets.pick_model_and_point("Model i", sel, {}, points, model_key="model",
                                                point_key="point", columns=columns)
    st.write(f"{other} {point}")


def test_the_picker_offers_the_other_models_and_the_points_with_their_widths():
    at = run(picker_script, None, False)
    assert not at.exception
    model, point = at.selectbox(key="model"), at.selectbox(key="point")
    assert (model.label, model.options, model.value) == ("Model i", ["a", "c"], "a")
    assert (point.label, point.options) == ("Merge point", ["fc1 (64 units)", "fc2 (32 units)"])
    assert written(at) == ["0 fc1"]
    model.set_value("c")
    point.set_value("fc2")
    at.run()
    assert written(at) == ["2 fc2"]
    assert len(at.columns) == 2


def test_the_picker_replaces_a_stored_point_that_is_gone_and_keeps_a_valid_one():
    assert written(run(picker_script, "conv9", False)) == ["0 fc1"]
    assert written(run(picker_script, "fc2", False)) == ["0 fc2"]


def test_the_picker_draws_into_columns_it_is_given():
    at = run(picker_script, None, True)
    assert not at.exception
    assert len(at.columns) == 3
    assert at.columns[0].selectbox[0].key == "model"
    assert at.columns[1].selectbox[0].key == "point"
    assert len(at.columns[2].children) == 0


def test_tag_labels_keep_the_distinguishing_ends_and_are_distinct():
    names = {"a": "resnet_cifar_finetune_lr0.01_seed_11",
             "b": "resnet_cifar_finetune_lr0.01_seed_12",
             "c": "mlp seed 0", "d": "alpha_beta_" + "1" * 10 + "_gamma_" + "z" * 10,
             "e": "alpha_beta_" + "2" * 10 + "_gamma_" + "z" * 10}
    tags = widgets.tag_labels(names)
    assert tags["c"] == "mlp seed 0"
    assert tags["a"].endswith("seed_11") and tags["b"].endswith("seed_12")
    assert len(set(tags.values())) == len(tags)  # even d and e, alike at both ends
    assert tags["d"].endswith("#1") and tags["e"].endswith("#2")
    assert all(len(t) <= widgets.TAG_CHARS + 1 for t in tags.values())
