"""Cancel in a real browser: a merge stopped while it runs keeps nothing and the app goes on."""

from __future__ import annotations

import pytest
import torch
from test_browser import assert_no_exception, go_to, open_demo, upload_model, wait_idle

from ccamerge.io import save_model
from ccamerge.models import build_model

pytestmark = pytest.mark.e2e


def wide_vgg_bytes(tmp_path, seed: int) -> bytes:
    """A VGG x8 on digits: its merges take seconds, long enough to press Cancel."""
    torch.manual_seed(seed)
    model = build_model("vgg", in_channels=1, image_size=8, num_classes=10, width=8.0)
    return save_model(model, tmp_path / f"wide{seed}.safetensors").read_bytes()


def clear_selection(page) -> None:
    box = page.locator('[data-testid="stSidebar"] [data-testid="stMultiSelect"]').first
    box.locator('[aria-label="Clear all"]').first.click()
    wait_idle(page)


def test_cancel_stops_a_running_merge_and_keeps_nothing_of_it(browser, server, tmp_path):
    context, page = open_demo(browser, server)
    clear_selection(page)  # uploads join the selection: start a new one
    for seed in (0, 1):
        upload_model(page, f"wide{seed}.safetensors", wide_vgg_bytes(tmp_path, seed))
        page.get_by_text(f"wide{seed}.safetensors loaded as 'wide{seed}' and selected").wait_for()
    go_to(page, "Merge and compare", 0)
    page.get_by_role("button", name="Run merge").click()
    page.get_by_role("button", name="Cancel").wait_for(timeout=60_000)
    page.wait_for_timeout(500)
    page.get_by_role("button", name="Cancel").click()
    page.get_by_text("Merge cancelled").wait_for(timeout=60_000)
    wait_idle(page)
    assert page.get_by_text("Results: 2 models").count() == 0
    assert page.get_by_role("button", name="Cancel").count() == 0
    assert page.get_by_role("button", name="Run merge").is_enabled()
    assert_no_exception(page)
    context.close()
