"""Dashboard timings in a real browser (Debian's Chromium through Playwright), written to JSON;
with ``--fashion``, every page action on two VGG x1 models and Fashion-MNIST (60,000 images).

    .venv/bin/python benchmarks/dashboard_timings.py --out benchmarks/dashboard_timings.json
    .venv/bin/python benchmarks/dashboard_timings.py --fashion --readme README.md

``--fashion`` drives the pages through Streamlit's AppTest (the real page scripts, no browser) at
the sidebar's default sample sizes: two VGG x1 models (trained once for the timings, 2 epochs on
12,000 images, cached in ``$CCAMERGE_CACHE_DIR/bench-fashion``) on the 60,000 Fashion-MNIST
training images. Each action starts from an empty result cache (its statistics pass included),
except the sweep, which is ticked after the diagnosis as a user would. It writes
``benchmarks/results/dashboard_timings.json`` and, with ``--readme``, the table between the
README's ``dashboard-timings`` markers; the target is 20 s per action on 2 cores.

Measures, with a fresh demo cache (cold: the zoo is trained) and then with the cache filled
(warm): the time from launching ``streamlit run dashboard/app.py`` to the first usable page (the
models table drawn); then the time for each page to render once its results are cached (second
visit, charts drawn); and the time of a 2-model and a 4-model merge (every registered method,
with the accuracy-vs-N subsets) from pressing "Run merge" to the download buttons.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run"]
PAGES = [("Spectra", 2), ("Feature matching", 3), ("Interpolation", 1), ("Merge and compare", 0),
         ("Models and data", 0)]


def start_server(cache: str, port: int) -> subprocess.Popen:
    streamlit = Path(sys.executable).parent / "streamlit"
    return subprocess.Popen(
        [str(streamlit), "run", "dashboard/app.py", "--server.headless", "true",
         "--browser.gatherUsageStats", "false", "--server.address", "127.0.0.1",
         "--server.port", str(port)],
        cwd=ROOT, env=dict(os.environ, CCAMERGE_CACHE_DIR=cache), stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT)


def wait_healthy(url: str) -> None:
    while True:
        try:
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
            return
        except OSError:
            time.sleep(0.1)


def wait_idle(page, charts: int = 0) -> None:
    page.wait_for_timeout(200)
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=300_000)
    page.wait_for_function(
        f"() => document.querySelectorAll('.js-plotly-plot .main-svg').length >= {charts}",
        timeout=60_000)


def go_to(page, title: str, charts: int) -> float:
    start = time.perf_counter()
    page.locator('[data-testid="stSidebarNav"]').get_by_text(title, exact=True).click()
    page.locator("h1", has_text=title).wait_for(timeout=300_000)
    wait_idle(page, charts)
    assert page.locator('[data-testid="stException"]').count() == 0, title
    return time.perf_counter() - start


def startup(browser, cache: str, port: int) -> tuple[float, subprocess.Popen, object]:
    """Seconds from launching the server to the models table; returns the open page too."""
    start = time.perf_counter()
    proc = start_server(cache, port)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    page.goto(url)
    page.locator('[data-testid="stDataFrame"]').first.wait_for(timeout=300_000)
    return time.perf_counter() - start, proc, page


def select_models(page, names: list[str]) -> None:
    box = page.locator('[data-testid="stSidebar"] [data-testid="stMultiSelect"]').first
    box.locator('[aria-label="Clear all"]').first.click()
    wait_idle(page)
    for name in names:
        box.locator("input").fill(name)
        page.get_by_role("option", name=name, exact=True).click()
        wait_idle(page)
    page.keyboard.press("Escape")


def merge_seconds(page, n_models: int) -> float:
    go_to(page, "Merge and compare", 0)
    start = time.perf_counter()
    page.get_by_role("button", name="Run merge").click()
    page.get_by_text(f"Results: {n_models} models").wait_for(timeout=300_000)
    page.get_by_text("Download merged model").wait_for(timeout=300_000)
    wait_idle(page, 1)
    return time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure() -> dict:
    cache = tempfile.mkdtemp(prefix="ccamerge-bench-")
    out: dict = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS)
        for kind in ("cold", "warm"):
            seconds, proc, page = startup(browser, cache, free_port())
            try:
                out[f"{kind}_start_to_usable_s"] = round(seconds, 2)
                if kind == "warm":
                    out.update(measure_pages(page))
            finally:
                page.close()
                proc.terminate()
                proc.wait()
        browser.close()
    shutil.rmtree(cache, ignore_errors=True)
    return out


def measure_pages(page) -> dict:
    out = {}
    for title, charts in PAGES:  # first visits compute and cache
        go_to(page, title, charts)
    out["cached_page_render_s"] = {title: round(go_to(page, title, charts), 2)
                                   for title, charts in PAGES}
    select_models(page, ["mlp seed 0", "mlp seed 1"])
    out["merge_2_models_all_methods_s"] = round(merge_seconds(page, 2), 2)
    select_models(page, [f"mlp seed {k}" for k in range(4)])
    out["merge_4_models_all_methods_with_n_curve_s"] = round(merge_seconds(page, 4), 2)
    return out


# ----------------------------------------------------------------------------- --fashion
FASHION_OUT = ROOT / "benchmarks" / "results" / "dashboard_timings.json"
START, END = "<!-- dashboard-timings:start -->", "<!-- dashboard-timings:end -->"
TARGET_S = 20.0
ESTIMATES: dict[str, str] = {}  # action -> the estimate the page showed before it


def fashion_models(folder: Path) -> list[dict]:
    """Two VGG x1 models on Fashion-MNIST (trained once, 2 epochs on 12,000 images: the timings
    do not depend on how well they are trained); demo-style rows for the registry."""
    import numpy as np

    from ccamerge.data import load_dataset
    from ccamerge.io import save_model
    from ccamerge.train import default_config, train_model

    data = load_dataset("fashion-mnist")
    rows = []
    for seed in (0, 1):
        path = folder / f"vgg_w1_fashion_s{seed}.safetensors"
        if not path.is_file():
            model = train_model("vgg", default_config("vgg", data), data, seed=seed,
                                indices=np.arange(12_000), epochs=2)
            save_model(model, path, info={"dataset": "fashion-mnist", "seed": seed})
        rows.append({"path": str(path), "label": "vgg fashion", "split_kind": "same",
                     "seed": seed})
    return rows


def fashion_app(rows: list[dict]):
    """An AppTest session with the two models selected on fashion-mnist."""
    sys.path.insert(0, str(ROOT))
    from streamlit.testing.v1 import AppTest

    from dashboard import registry, state

    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=900)
    at.run()
    ids = registry.add_demo(at.session_state[state.MODELS], rows)
    at.multiselect(key=state.W_MODELS).set_value(ids).run()
    at.selectbox(key=state.W_DATASET).set_value("fashion-mnist").run()
    return at


def timed(at, action) -> float:
    """Seconds of one page action (``action(at)`` runs the script); fails on an exception."""
    start = time.perf_counter()
    action(at)
    seconds = time.perf_counter() - start
    problems = [e.value for e in at.exception]
    if problems:
        raise SystemExit(f"the page failed: {problems}")
    return round(seconds, 2)


def fashion_actions() -> list[tuple[str, object, bool]]:
    """``(name, action, from an empty cache)`` in the order a user would take them."""
    from dashboard import catalog, state

    def page(name):
        return lambda at: at.switch_page(f"../pages/{name}.py").run()

    def merge_all(at):
        at.switch_page("../pages/merge.py").run()
        at.multiselect(key=state.W_MERGE_METHODS).set_value(list(catalog.METHODS)).run()
        shown = [c.value for c in at.caption if c.value.startswith("Estimated time")]
        ESTIMATES["merge (every method)"] = shown[0].split(":")[1].split("(")[0].strip()
        at.button(key=state.W_MERGE_RUN).click().run()

    def sweep(at):
        at.checkbox(key=state.W_DIAG_SWEEP).check().run()

    return [("spectra", page("spectra"), True), ("feature matching", page("features"), True),
            ("interpolation (average, permute, cca)", page("interpolation"), True),
            ("merge (every method)", merge_all, True), ("diagnosis (cca)", page("diagnose"), True),
            ("sweep, ticked after the diagnosis", sweep, False)]


def measure_fashion() -> dict:
    cache = Path(os.environ.get("CCAMERGE_CACHE_DIR") or "~/.cache/ccamerge").expanduser()
    rows = fashion_models(cache / "bench-fashion")
    at = fashion_app(rows)
    from dashboard import data, widgets

    out = {"models": "2 x VGG x1 (no BatchNorm)", "dataset": "fashion-mnist, 60,000 training "
           "and 10,000 test images", "statistics_images": at.session_state[widgets.W_STATS_SAMPLES],
           "test_images": at.session_state[widgets.W_TEST_SAMPLES], "threads": data.THREADS,
           "actions_s": {}}
    for name, action, cold in fashion_actions():
        if cold:
            data.memo().clear()
        out["actions_s"][name] = timed(at, action)
        print(f"{name}: {out['actions_s'][name]} s (load {os.getloadavg()[0]:.1f})", flush=True)
    out["actions_s"]["diagnosis + sweep"] = round(
        out["actions_s"]["diagnosis (cca)"]
        + out["actions_s"]["sweep, ticked after the diagnosis"], 2)
    out["estimates_shown"] = dict(ESTIMATES)
    out["load_average_after"] = list(os.getloadavg())
    return out


def fashion_table(result: dict) -> str:
    machine = result["machine"]
    lines = [f"Two VGG x1 models on Fashion-MNIST (60,000 training images), default sidebar "
             f"settings ({result['statistics_images']:,} statistics images, "
             f"{result['test_images']:,} test images), {machine['cpus']} cores, "
             f"{result['threads']} torch thread(s), "
             f"load average {machine['load_average_1min']:.1f} "
             f"before and {result['load_average_after'][0]:.1f} after (a machine shared with other "
             "jobs). "
             "Each action from an empty result cache, its statistics pass included, except the "
             "sweep (ticked after the diagnosis, which it reuses). "
             "`benchmarks/dashboard_timings.py --fashion` measures it. Before the shared "
             "statistics (issue #12: every method, the diagnosis and the sweep collecting their "
             "own statistics on all 60,000 images and scoring all 10,000 test images): merge "
             "with every method 335 s, diagnosis 189 s, diagnosis with the sweep 351 s, "
             "interpolation 488 s.", "",
             "| action | seconds | within 20 s | estimate shown before |", "|---|---:|:---:|---|"]
    for name, seconds in result["actions_s"].items():
        shown = result.get("estimates_shown", {}).get(name, "")
        lines.append(f"| {name} | {seconds:.1f} | {'yes' if seconds <= TARGET_S else 'no'} | "
                     f"{shown} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the JSON here too")
    parser.add_argument("--fashion", action="store_true",
                        help="time every page action on two VGG x1 models and Fashion-MNIST")
    parser.add_argument("--readme", default=None, help="with --fashion: rewrite its table here")
    args = parser.parse_args()
    if args.fashion:
        result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                              "load_average_1min": os.getloadavg()[0]}, **measure_fashion()}
        text = json.dumps(result, indent=2)
        print(text)
        out = Path(args.out) if args.out else FASHION_OUT
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        if args.readme:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from report import rewrite_section
            rewrite_section(Path(args.readme), START, END, fashion_table(result))
        return
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_average_1min": os.getloadavg()[0]},
              **measure()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
