"""Dashboard timings in a real browser (Debian's Chromium through Playwright), written to JSON.

    .venv/bin/python benchmarks/dashboard_timings.py --out benchmarks/dashboard_timings.json

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the JSON here too")
    args = parser.parse_args()
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_average_1min": os.getloadavg()[0]},
              **measure()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
