"""Small UI helpers that draw widgets and return plain values; the shared sidebar.

Page widgets keep their values across page switches (``persist_state="session"``); the sidebar is
drawn on every page, so the selection (models, reference, dataset) stays set everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import streamlit as st

from ccamerge import target
from ccamerge.analysis.diagnose import default_grid
from ccamerge.api import is_builtin
from ccamerge.data import available_datasets
from ccamerge.errors import CcamergeError
from ccamerge.methods.registry import mixed_width_methods
from ccamerge.spec import build_spec
from dashboard import catalog, data, jobs, merging, registry, state

KEEP = {"persist_state": "session"}
W_STATS_SAMPLES = "w_stats_samples"  # sidebar: training images behind the statistics (0 = all)
W_TEST_SAMPLES = "w_test_samples"    # sidebar: test images scored (0 = all)
# Interpolation curves picked at first: plain averaging, a permutation and CCA (each curve is
# ``steps`` scored merges; the other pairwise methods are one click away)
INTERPOLATION_DEFAULTS = ("average", "permute", "cca")
GAMMAS = (0.0, 1e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def explain(text: str) -> None:
    """The short "what am I looking at" note drawn right under a chart."""
    st.caption(f"**What am I looking at?** {text}")


def error(problem: Exception | str) -> None:
    """A problem the user can fix (an error or its message), as one line with an error icon."""
    st.error(str(problem), icon=":material/error:")


@contextmanager
def stop_on_error() -> Iterator[None]:
    """Inside the block, a :class:`CcamergeError` is shown as one line (:func:`error`) and stops
    the page (``st.stop()``); any other exception, ``st.stop()``'s own included, propagates.
    Outside a script run, where ``st.stop()`` returns, the error is raised again."""
    try:
        yield
    except CcamergeError as exc:
        error(exc)
        st.stop()
        raise


@contextmanager
def continue_on_error() -> Iterator[None]:
    """Inside the block, a :class:`CcamergeError` is shown as one line (:func:`error`) and the
    rest of the block is skipped; the page goes on after it. Other exceptions propagate."""
    try:
        yield
    except CcamergeError as exc:
        error(exc)


def gamma_controls(gamma_key: str, relative_key: str) -> tuple[float, bool]:
    """The CCA ridge: gamma on a log-spaced slider and its units (relative or absolute); the
    defaults are the registry's."""
    options = catalog.METHODS["cca"].options
    default = float(options["gamma"].default)
    choices = sorted(set(GAMMAS) | {default})
    left, right = st.columns([3, 2])
    with left:
        gamma = st.select_slider("γ (CCA ridge)", choices, value=default, key=gamma_key,
                                 format_func=lambda g: f"{g:g}", help=options["gamma"].help, **KEEP)
    with right:
        relative = st.toggle("γ relative to each layer's mean variance",
                             value=bool(options["relative"].default), key=relative_key,
                             help=options["relative"].help, **KEEP)
    return float(gamma), bool(relative)


def method_options(method: str, prefix: str) -> dict:
    """One widget per option of ``method`` from the registry (defaults, minimum, help);
    returns ``{option: value}``. The defaults are seeded into session state, so a setting put
    there by :func:`apply_setting` shows without a conflicting ``value=``."""
    values = {}
    for name, opt in catalog.METHODS[method].options.items():
        key = state.option_key(prefix, method, name)
        label = f"{method}: {name}"
        st.session_state.setdefault(key, opt.kind(opt.default))
        if opt.kind is bool:
            values[name] = st.checkbox(label, key=key, help=opt.help, **KEEP)
        elif opt.kind is int:
            values[name] = int(st.number_input(label, step=1, key=key,
                                               min_value=(None if opt.minimum is None
                                                          else int(opt.minimum)),
                                               help=opt.help, **KEEP))
        else:
            values[name] = float(st.number_input(label, key=key, min_value=opt.minimum,
                                                 format="%g", help=opt.help, **KEEP))
    return values


def setting_text(options: dict) -> str:
    """``gamma = 1, relative = True``."""
    return ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}"
                     for k, v in options.items())


def apply_setting(method: str, options: dict, source: str) -> None:
    """Put ``options`` of ``method`` into the option widgets of the pages in
    :data:`state.APPLY_TO` (and select the method there), and remember it in
    :data:`state.APPLIED` for those pages to say where the values came from. A button
    callback: it runs before the next script run, when any widget's state may be set."""
    known = catalog.METHODS[method].options
    for prefix, methods_key in state.APPLY_TO.items():
        if prefix == "interp" and catalog.METHODS[method].joint:
            continue
        for name, value in options.items():
            if name in known:
                st.session_state[state.option_key(prefix, method, name)] = known[name].kind(value)
        chosen = st.session_state.get(methods_key)
        if chosen is not None and method not in chosen:
            st.session_state[methods_key] = [*chosen, method]
    st.session_state[state.APPLIED] = {"method": method, "options": dict(options),
                                       "source": source}


def apply_button(method: str, options: dict, *, source: str, key: str) -> None:
    """A button that applies ``options`` of ``method`` (:func:`apply_setting`) and, once
    pressed, links to the pages it changed."""
    st.button(f"Apply {method} {setting_text(options)} on the Merge and Interpolation pages",
              key=key, on_click=apply_setting, args=(method, options, source),
              icon=":material/tune:")
    applied = st.session_state.get(state.APPLIED)
    if applied and applied["method"] == method and applied["options"] == dict(options):
        st.success(f"Applied: {method} {setting_text(options)}. Open "
                   "**Merge and compare** or **Interpolation** to use it.",
                   icon=":material/check:")


def applied_note(method: str, values: dict) -> None:
    """Where a page's option values for ``method`` came from, while they are still the ones
    :func:`apply_setting` put there."""
    applied = st.session_state.get(state.APPLIED)
    if applied and applied["method"] == method and all(
            values.get(k) == v for k, v in applied["options"].items()):
        st.info(f"{method}: {setting_text(applied['options'])}, applied from "
                f"{applied['source']}.", icon=":material/tune:")


def options_panel(methods: list[str], prefix: str) -> dict[str, dict]:
    """An expander with :func:`method_options` for each of ``methods`` that has options (its
    summary first, then :func:`applied_note`), open while a suggested setting is applied;
    returns ``{method: {option: value}}``."""
    options = {}
    with st.expander("Method options (defaults from the registry)",
                     expanded=state.APPLIED in st.session_state):
        for method in methods:
            if catalog.METHODS[method].options:
                st.markdown(f"**{method}**: {catalog.METHODS[method].summary}")
                options[method] = method_options(method, prefix)
                applied_note(method, options[method])
    return options


class ProgressDisplay:
    """A progress bar for a run of ``total`` steps; :meth:`step` gives the callback of one step.
    As a context manager it removes the bar when the block ends, however it ends; open it inside
    :func:`stop_on_error` (``with stop_on_error(), ProgressDisplay(...)``): after ``st.stop()``
    nothing more is drawn, so a bar still open then would stay on the stopped page."""

    def __init__(self, label: str, total: int):
        self.total = max(1, total)
        self.bar = st.progress(0.0, text=label)

    def step(self, index: int, label: str) -> Callable[[float, str], None]:
        def report(fraction: float, message: str) -> None:
            overall = min(1.0, (index + max(0.0, min(1.0, fraction))) / self.total)
            self.bar.progress(overall, text=f"{label}: {message}")
        report(0.0, "starting")
        return report

    def done(self) -> None:
        self.bar.empty()

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc_info) -> None:
        self.done()


def valid_choice(key: str, options: list, default=None) -> None:
    """Before selectbox ``key`` is drawn, replace a stored value that is no longer among
    ``options`` (the selection changed) by ``default`` or the first option."""
    if options and st.session_state.get(key) not in options:
        st.session_state[key] = default if default in options else options[0]


def model_label(models: dict, model_id: str) -> str:
    """The display name of model ``model_id`` (the id itself when it is not loaded)."""
    entry = models.get(model_id)
    return entry.name if entry else model_id


def pick_other(label: str, sel: state.Selection, models: dict, key: str) -> int:
    """A non-reference model of the selection; returns its index in the selection."""
    others = sel.others
    valid_choice(key, others)
    chosen = st.selectbox(label, others, key=key,
                          format_func=lambda i: model_label(models, i), **KEEP)
    return sel.ids.index(chosen if chosen in others else others[0])


def pick_point(points: dict, key: str) -> str:
    """A merge point of ``points`` (name -> its statistics, with ``width``), labelled with its
    number of units; returns its name."""
    names = list(points)
    valid_choice(key, names)
    return st.selectbox("Merge point", names, key=key,
                        format_func=lambda p: f"{p} ({points[p].width} units)", **KEEP)


def pick_model_and_point(label: str, sel: state.Selection, models: dict, points: dict, *,
                         model_key: str, point_key: str, columns=None) -> tuple[int, str]:
    """A non-reference model (:func:`pick_other`, titled ``label``) and a merge point
    (:func:`pick_point`) side by side, in ``columns`` (two containers) or two new columns;
    returns ``(model index in the selection, point name)``."""
    left, right = st.columns(2) if columns is None else columns
    with left:
        other = pick_other(label, sel, models, model_key)
    with right:
        point = pick_point(points, point_key)
    return other, point


TAG_CHARS = 17  # a sidebar tag shows about 19 characters before "…"
REFERENCE_CHARS = 30  # the sidebar's closed selectbox shows about 32


def tag_label(name: str, width: int = TAG_CHARS) -> str:
    """``name`` shortened to ``width`` characters by cutting its middle, so the ends, where
    names of one experiment differ (``..._seed_11``), stay visible."""
    if len(name) <= width:
        return name
    tail = (width - 1) // 2
    return f"{name[:width - 1 - tail]}…{name[-tail:]}"


def tag_labels(names: dict[str, str], width: int = TAG_CHARS) -> dict[str, str]:
    """Distinct short labels (id -> label) for the models' tags: :func:`tag_label`, and
    ``#1``, ``#2``, ... in load order where two of them still read the same."""
    short = {i: tag_label(n, width) for i, n in names.items()}
    clashes = {label for label in short.values() if list(short.values()).count(label) > 1}
    seen: dict[str, int] = {}
    for i, label in short.items():
        if label in clashes:
            seen[label] = seen.get(label, 0) + 1
            short[i] = f"{tag_label(names[i], width - 3)} #{seen[label]}"
    return short


def sidebar() -> state.Selection:
    """Models, reference and dataset; stored as the session's :class:`state.Selection`."""
    models = st.session_state[state.MODELS]
    datasets = st.session_state[state.DATASETS]
    with st.sidebar:
        st.markdown("### Experiment")
        tags = tag_labels({i: e.name for i, e in models.items()})
        ids = st.multiselect("Models", list(models), key=state.W_MODELS,
                             format_func=lambda i: tags.get(i, i),
                             help="2 or more models of one architecture; the Models page adds "
                                  "uploads and shows the full names")
        valid_choice(state.W_REFERENCE, ids)
        wide = tag_labels({i: e.name for i, e in models.items()}, width=REFERENCE_CHARS)
        reference = st.selectbox("Reference", ids, key=state.W_REFERENCE,
                                 format_func=lambda i: wide.get(i, i),
                                 help="the model whose basis the others are aligned to")
        names = available_datasets() + list(datasets)
        valid_choice(state.W_DATASET, names)
        dataset = st.selectbox("Dataset", names, key=state.W_DATASET,
                               format_func=lambda k: registry.dataset_label(k, datasets),
                               help="statistics use its training images, scores its test images")
        _selection_notes(models, ids)
    sel = state.Selection(tuple(ids), ids.index(reference) if reference in ids else 0,
                          dataset or "digits")
    st.session_state[state.SELECTION] = sel
    return sel


def _selection_notes(models: dict, ids: list[str]) -> None:
    if len(ids) < 2:
        st.warning("Select at least 2 models to compare and merge.")
        return
    entries = [models[i] for i in ids]
    try:
        registry.check_entries(entries)
    except CcamergeError as exc:
        st.error(str(exc))
        return
    first = models[ids[0]].model()
    problem = registry.mixed_widths_problem([e.model() for e in entries])
    if problem:
        st.info(problem)
        return
    if not hasattr(first, "config"):  # a TorchScript archive
        st.caption(f"{len(ids)} × {registry.describe(first)}, "
                   f"{sum(p.numel() for p in first.parameters()):,} parameters")
        return
    st.caption(f"{len(ids)} × {first.arch}, width {first.config.get('width')}, "
               f"{first.config.get('num_classes')} classes")


def selected_inputs(mixed_widths: bool = False) -> tuple[state.Selection, dict, registry.Inputs]:
    """The sidebar's selection, resolved for computing: ``(selection, models, inputs)``. When it
    cannot be computed on (too few models, mismatched models, models of different widths on a
    page without ``mixed_widths``, data that does not fit), the page shows why and stops;
    nothing else is lost."""
    sel = state.selection()
    models = st.session_state[state.MODELS]
    with stop_on_error():
        inputs = registry.inputs(sel.ids, sel.reference, sel.dataset, models,
                                 st.session_state[state.DATASETS], mixed_widths=mixed_widths)
    return sel, models, inputs


def target_width_note(inputs: registry.Inputs) -> None:
    """With models of different widths: the merged model takes the reference's widths (the
    target, chosen as the sidebar's reference) and which methods merge them."""
    if registry.mixed_widths_problem(inputs.models) is None:
        return
    target = inputs.entries[inputs.reference].label
    st.info(f"The models differ in width: every merge takes the widths of the reference, "
            f"{target} (choose the target model as the reference in the sidebar; a narrower "
            f"target compresses the others). Only {', '.join(mixed_width_methods())} merge "
            "different widths; the other methods say why they cannot.")


def target_width_control(inputs: registry.Inputs, methods: list[str]) -> float | None:
    """The merged model's width (``target_width``), offered when a chosen method merges into a
    chosen width: the width multiplier of built-in models, a fraction of the reference's widths
    for traced ones (:func:`dashboard.merging.target_width_range`); default the reference's
    width. Returns None at the reference's width (the merge into the reference)."""
    chosen = [m for m in methods if m in target.target_width_methods()]
    if not chosen:
        return None
    try:
        span = merging.target_width_range(inputs)
    except CcamergeError:  # the merges say why, each in one line
        return None
    stored = st.session_state.get(state.W_MERGE_TARGET_WIDTH)
    if stored is None or not 0 < stored <= span.largest:
        st.session_state[state.W_MERGE_TARGET_WIDTH] = min(span.own, span.largest)
    value = st.number_input(
        span.label, min_value=0.01, max_value=float(span.largest), step=0.05, format="%.3g",
        key=state.W_MERGE_TARGET_WIDTH,
        help=f"the merged model's width, {span.unit}; at most {span.largest:g}, the narrowest "
             f"model's. Narrower compresses: the merged units are the reference units that "
             f"best carry the shared directions. Applies to {', '.join(chosen)}; the other "
             "methods merge at the reference's width.")
    return None if value == span.own else float(value)


def sample_controls() -> None:
    """Sidebar: how many training images the statistics use and how many test images every
    score is measured on (defaults :data:`data.STATS_SAMPLES`, :data:`data.TEST_SAMPLES`;
    0 = all). One statistics pass per selection and sample size serves every page."""
    with st.sidebar:
        st.number_input("Statistics images (0 = all)", min_value=0, value=data.STATS_SAMPLES,
                        step=500, key=W_STATS_SAMPLES,
                        help="training images behind the activation statistics, collected once "
                             "per selection and shared by every page and method; more images "
                             "cost proportionally more time, very few make the covariances "
                             "noise")
        st.number_input("Test images scored (0 = all)", min_value=0, value=data.TEST_SAMPLES,
                        step=500, key=W_TEST_SAMPLES,
                        help="test images behind every accuracy and loss (drawn at random, the "
                             "same for every model and method); 0 scores the whole test set")


def sampling(inputs: registry.Inputs) -> tuple[int | None, int | None]:
    """``(stats_samples, test_samples)`` the sidebar chose, for the selection's dataset (None =
    all of its images)."""
    stats = st.session_state.get(W_STATS_SAMPLES, data.STATS_SAMPLES)
    test = st.session_state.get(W_TEST_SAMPLES, data.TEST_SAMPLES)
    return (data.effective_samples(stats, len(inputs.data.train)),
            data.effective_samples(test, len(inputs.data.test)))


def sampling_note(inputs: registry.Inputs) -> None:
    """One line saying which images the page's numbers come from (changed in the sidebar)."""
    stats, test = sampling(inputs)
    n_train, n_test = len(inputs.data.train), len(inputs.data.test)
    st.caption(f"Statistics on {stats or n_train:,} of {n_train:,} training images, scores on "
               f"{test or n_test:,} of {n_test:,} test images (change them in the sidebar).")


def selected_statistics(inputs: registry.Inputs, stats_samples: int | None = None, *,
                        pairs: str = "reference"):
    """The selection's shared activation statistics (cached; one pass per selection and sample
    size, shown with a progress bar and a Cancel button), or stop the page. ``pairs="all"``:
    with every cross-covariance (what gcca needs; N <= 3 collect them anyway)."""
    key = ("statistics", inputs.digests, inputs.data_key, stats_samples)
    seconds = estimate(inputs, stats_samples=stats_samples, pairs=pairs)
    with stop_on_error(), long_work("statistics", str(key), "collecting statistics", 1,
                                    seconds) as progress:
        return data.shared_statistics(inputs.models, inputs.digests, inputs.data, inputs.data_key,
                                      reference=inputs.reference, stats_samples=stats_samples,
                                      pairs=pairs, progress=progress.step(0, "statistics"))


def points_count(inputs: registry.Inputs) -> int:
    """The number of merge points of the selection's models (the built-in spec; 8 for other
    models, which would need tracing), for estimates."""
    model = inputs.models[inputs.reference]
    return len(build_spec(model).points) if is_builtin(model) else 8


def seconds_per_image(inputs: registry.Inputs) -> float:
    """Seconds of one forward pass of the reference per image (timed once, cached)."""
    return data.seconds_per_image(inputs.digests[inputs.reference], inputs.data_key,
                                  inputs.models[inputs.reference], inputs.data)


def estimate(inputs: registry.Inputs, *, stats_samples: int | None, forwards: int = 0,
             pairs: str = "reference") -> float:
    """Seconds the work will take: the statistics pass (unless cached) and ``forwards`` more
    image-model forward passes, at the speed of a timed forward pass of the reference."""
    per_image = seconds_per_image(inputs)
    cached = data.has_statistics(inputs.digests, inputs.data, inputs.data_key,
                                 reference=inputs.reference, stats_samples=stats_samples,
                                 pairs=pairs)
    images = stats_samples or len(inputs.data.train)
    return jobs.estimate_seconds(per_image, forwards=forwards,
                                 stats_forwards=0 if cached else images * len(inputs.models))


def estimate_text(seconds: float) -> str:
    """``about 12 s`` (:func:`dashboard.jobs.estimate_text`)."""
    return jobs.estimate_text(seconds)


def resume(task: str) -> None:
    """Forget a cancelled run of ``task`` (its Run button was pressed)."""
    jobs.resume(st.session_state, task)


def was_cancelled(task: str, signature: str) -> bool:
    """True when the last cancelled run of ``task`` had ``signature``."""
    return jobs.is_cancelled(st.session_state, task, signature)


def diagnosis_estimate(inputs: registry.Inputs, method: str, stats_samples: int | None,
                       test_samples: int | None) -> float:
    """Seconds of a diagnosis: the statistics (unless cached), each model's and each partial
    merge's score, the collapse pass over the statistics images."""
    n_test = test_samples or len(inputs.data.test)
    forwards = ((len(inputs.models) + points_count(inputs)) * n_test
                + (stats_samples or len(inputs.data.train)))
    return estimate(inputs, stats_samples=stats_samples, forwards=forwards,
                    pairs=data.pairs_needed([method]))


def sweep_estimate(inputs: registry.Inputs, method: str, stats_samples: int | None) -> float:
    """Seconds of the sweep: each setting (and the current one) scored on the held-out images,
    or, when there are none, a statistics pass of its own too."""
    held = data.held_out_indices(inputs.data, stats_samples)
    settings = len(default_grid(method)) + 1
    if held is None:  # statistics of its own on 80% of the training images, scores on 20%
        n_train = len(inputs.data.train)
        return jobs.estimate_seconds(seconds_per_image(inputs), forwards=settings * n_train // 5,
                                     stats_forwards=len(inputs.models) * n_train * 4 // 5)
    return estimate(inputs, stats_samples=stats_samples, forwards=settings * len(held))


@contextmanager
def long_work(task: str, signature: str, label: str, total: int, seconds: float | None, *,
              auto: bool = True) -> Iterator[ProgressDisplay]:
    """Around long work: its estimate, a Cancel button and a progress bar (removed when the
    block ends). Cancel stops the run at its next progress update and nothing of it is kept
    (:mod:`dashboard.jobs`). For work a page starts on its own (``auto``), a cancelled run
    then waits: the page shows a Run button and stops until it is pressed."""
    if auto and jobs.is_cancelled(st.session_state, task, signature):
        st.info(f"Cancelled ({label}). Earlier results are kept; nothing of the cancelled run "
                "was stored.", icon=":material/cancel:")
        st.button(f"Run again ({label})", key=f"w_resume_{task}", on_click=jobs.resume,
                  args=(st.session_state, task), icon=":material/play_arrow:")
        st.stop()
    note, button = st.empty(), st.empty()
    if seconds is not None and seconds >= 1:
        note.caption(f"{label.capitalize()}: {jobs.estimate_text(seconds)} (estimated from a "
                     "timed forward pass on this machine)")
    button.button("Cancel", key=f"w_cancel_{task}", on_click=jobs.cancel,
                  args=(st.session_state, task, signature), icon=":material/cancel:")
    try:
        with ProgressDisplay(label, total) as progress:
            yield progress
    finally:
        note.empty()
        button.empty()


def interpolation_curves(pair, digests, inputs: registry.Inputs, methods, *, steps: int,
                         bn_reset: bool, options: dict | None = None,
                         indices: tuple[int, int] | None = None) -> list[dict]:
    """One cached interpolation curve per method between the two models of ``pair`` (models
    ``indices`` of the selection; with ``options[method]``, else the defaults), all on the
    selection's shared statistics, with an estimate, a progress display and a Cancel button; on
    a problem the page shows why and stops."""
    options = options or {}
    stats_samples, test_samples = sampling(inputs)
    indices = indices or tuple(inputs.digests.index(d) for d in digests)
    pairs = "reference" if inputs.reference in indices else "all"
    signature = str((digests, inputs.data_key, list(methods), steps, bn_reset, options,
                     stats_samples, test_samples))
    forwards = len(methods) * steps * (test_samples or len(inputs.data.test))
    seconds = estimate(inputs, stats_samples=stats_samples, forwards=forwards, pairs=pairs)
    with stop_on_error(), long_work("interpolation", signature, "interpolating",
                                    len(methods) + 1, seconds) as progress:
        stats = data.shared_statistics(inputs.models, inputs.digests, inputs.data,
                                       inputs.data_key, reference=inputs.reference,
                                       stats_samples=stats_samples, pairs=pairs,
                                       progress=progress.step(0, "statistics"))
        picked = data.pick_statistics(stats, list(indices), 0)
        return [data.interpolation(pair, digests, inputs.data, inputs.data_key, method,
                                   steps=steps, bn_reset=bn_reset, stats_samples=stats_samples,
                                   test_samples=test_samples, options=options.get(method),
                                   statistics=picked, progress=progress.step(k, method))
                for k, method in enumerate(methods, start=1)]
