"""The dashboard in a real browser: demo, every page, a merge, downloads, uploads, two sessions."""

from __future__ import annotations

import io
import json

import pytest
import torch

from ccamerge.io import load_model, save_model
from ccamerge.methods import METHODS
from ccamerge.models import build_model

pytestmark = pytest.mark.e2e

DEMO_TIMEOUT_MS = 240_000  # a cold start trains the demo zoo (about 20 s on 2 busy cores)
PAGES = [("Spectra", 2), ("Feature matching", 5), ("Interpolation", 1), ("Why did it fail?", 4),
         ("Feature explorer", 2), ("Teaching mode", 5), ("Merge and compare", 0)]


def wait_idle(page, charts: int = 0, timeout_ms: int = 120_000) -> None:
    """Until the script run is over and ``charts`` plotly charts are drawn."""
    page.wait_for_timeout(300)
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout_ms)
    page.wait_for_function(
        f"() => document.querySelectorAll('.js-plotly-plot .main-svg').length >= {charts}",
        timeout=60_000)


def assert_no_exception(page) -> None:
    shown = page.locator('[data-testid="stException"]')
    assert shown.count() == 0, shown.all_inner_texts()


def open_demo(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1600}, accept_downloads=True)
    page = context.new_page()
    page.goto(server)
    page.get_by_text("Loaded models").wait_for(timeout=DEMO_TIMEOUT_MS)
    page.locator('[data-testid="stDataFrame"]').first.wait_for(timeout=60_000)
    wait_idle(page, timeout_ms=DEMO_TIMEOUT_MS)  # a cold start's first run goes on training
    assert_no_exception(page)
    return context, page


def go_to(page, title: str, charts: int) -> None:
    page.locator('[data-testid="stSidebarNav"]').get_by_text(title, exact=True).click()
    page.locator("h1", has_text=title).wait_for(timeout=60_000)
    wait_idle(page, charts)
    assert_no_exception(page)


def upload_model(page, name: str, content: bytes) -> None:
    uploader = page.locator('[data-testid="stFileUploader"]').filter(has_text="Model files")
    uploader.locator('input[type="file"]').set_input_files(
        {"name": name, "mimeType": "application/octet-stream", "buffer": content})
    wait_idle(page)


def model_bytes(tmp_path, seed: int, name: str) -> bytes:
    torch.manual_seed(seed)
    model = build_model("mlp", in_channels=1, image_size=8, num_classes=10)
    return save_model(model, tmp_path / name).read_bytes()


def test_every_page_a_merge_and_its_downloads(browser, server, tmp_path):
    context, page = open_demo(browser, server)
    for title, charts in PAGES:
        go_to(page, title, charts)
    page.get_by_role("button", name="Run merge").click()
    page.get_by_text("Download merged model").wait_for(timeout=180_000)
    wait_idle(page, 2)
    assert_no_exception(page)
    with page.expect_download() as info:
        page.get_by_role("button", name="Download merged model (.safetensors)").click()
    path = tmp_path / info.value.suggested_filename
    info.value.save_as(path)
    merged = load_model(path)
    assert merged.arch == "mlp" and merged.info["merge"]["method"] in METHODS
    with page.expect_download() as info:
        page.get_by_role("button", name="Download recipe (.json)").click()
    recipe = json.loads(info.value.path().read_text())
    assert recipe["models"] == merged.info["merge"]["models"]
    assert recipe["method"] == merged.info["merge"]["method"]
    go_to(page, "Models and data", 0)  # results and selection survive the page switches
    go_to(page, "Merge and compare", 2)
    page.get_by_text("Download merged model").first.wait_for()  # drawn after the charts
    assert page.get_by_text("Download merged model").count() == 1
    context.close()


def test_bad_uploads_show_inline_errors_and_hostile_pickles_never_run(browser, server, tmp_path):
    context, page = open_demo(browser, server)
    upload_model(page, "corrupt.safetensors", b"\x00not a model" * 50)
    page.get_by_text("corrupt.safetensors is not a valid safetensors file").wait_for()

    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save({"w": _Hostile(str(marker))}, payload)
    upload_model(page, "hostile.pt", payload.getvalue())
    page.get_by_text("refused to unpickle hostile.pt").wait_for()
    assert not marker.exists()

    upload_model(page, "fresh.safetensors", model_bytes(tmp_path, 3, "fresh.safetensors"))
    page.get_by_text("fresh.safetensors loaded as 'fresh' and selected").wait_for()
    assert page.locator('[data-testid="stSidebar"]').get_by_text("fresh").count() >= 1
    assert_no_exception(page)
    context.close()


def test_two_browser_sessions_do_not_share_uploads(browser, server, tmp_path):
    first_context, first = open_demo(browser, server)
    upload_model(first, "private_upload.safetensors",
                 model_bytes(tmp_path, 4, "private_upload.safetensors"))
    first.get_by_text("private_upload.safetensors loaded").wait_for()
    second_context, second = open_demo(browser, server)
    assert second.get_by_text("private_upload").count() == 0
    second.locator('[data-testid="stSidebar"] [data-testid="stMultiSelect"]').first.click()
    assert second.get_by_role("option", name="private_upload").count() == 0
    assert first.get_by_text("private_upload").count() >= 1
    first_context.close()
    second_context.close()


def archive_bytes(seed: int) -> bytes:
    """A TorchScript archive of an architecture outside the built-in families."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.LayerNorm(32),
                              torch.nn.GELU(), torch.nn.Linear(32, 10)).eval()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(net), buffer)
    return buffer.getvalue()


def test_a_trusted_torchscript_archive_and_its_merge_points(browser, server):
    context, page = open_demo(browser, server)
    page.locator('[data-testid="stSidebar"] button[aria-label="Clear all"]').first.click()
    wait_idle(page)
    upload_model(page, "archive_a.pt", archive_bytes(0))
    page.get_by_text("archive_a.pt is a TorchScript archive").wait_for()  # refused: box unticked
    page.get_by_test_id("stCheckbox").get_by_text("I trust this archive's code").click()
    page.get_by_text("archive_a.pt loaded as 'archive_a' and selected").wait_for()
    go_to(page, "Merge points", 0)
    page.locator('[data-testid="stGraphVizChart"] svg').wait_for(timeout=60_000)
    assert page.locator('[data-testid="stMetricValue"]', has_text="passed").count() == 1
    assert page.get_by_text("ccamerge spec archive_a.pt").count() == 1  # with --trust-code
    context.close()


class _Hostile:
    """Unpickling this would run code that creates ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))
