"""The researcher's path in a real browser, end to end: open the demo, upload two models of
another size while the demo is selected, start a new selection from them, merge with every
method, download the merged model and its recipe, and replay the recipe with the CLI from
another folder holding copies of the two files: the replayed weights are the downloaded ones."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from test_browser import assert_no_exception, go_to, open_demo, wait_idle

from ccamerge.data import load_dataset
from ccamerge.io import load_model, save_model
from ccamerge.methods import METHODS
from ccamerge.train import default_config, train_model

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FILES = ("narrow_a.safetensors", "narrow_b.safetensors")


def narrow_models(folder) -> dict[str, bytes]:
    """Two MLPs of half the demo's width, trained for a few epochs on digits, saved as files."""
    digits = load_dataset("digits")
    config = default_config("mlp", digits, width=0.5)
    out = {}
    for seed, name in enumerate(FILES):
        model = train_model("mlp", config, digits, seed=seed, epochs=3)
        out[name] = save_model(model, folder / name).read_bytes()
    return out


def test_upload_select_merge_download_and_replay_elsewhere(browser, server, tmp_path):
    files = narrow_models(tmp_path)
    context, page = open_demo(browser, server)
    sidebar = page.locator('[data-testid="stSidebar"]')
    assert sidebar.get_by_text("Computing on").count() == 1
    uploader = page.locator('[data-testid="stFileUploader"]').filter(has_text="Model files")
    uploader.locator('input[type="file"]').set_input_files(
        [{"name": n, "mimeType": "application/octet-stream", "buffer": b}
         for n, b in files.items()])
    wait_idle(page)
    page.get_by_text("narrow_b.safetensors loaded as 'narrow_b' but not selected").wait_for()
    page.get_by_text("(width 0.5 vs 1.0)").first.wait_for()  # only the differing field
    page.get_by_role("button", name="Start a new selection from these uploads").click()
    page.get_by_text("new selection: narrow_a.safetensors, narrow_b.safetensors").wait_for()
    wait_idle(page)
    assert_no_exception(page)

    go_to(page, "Merge and compare", 0)
    page.get_by_role("button", name="Run merge").click()
    page.get_by_text("Download merged model").wait_for(timeout=180_000)
    wait_idle(page, 1)
    assert_no_exception(page)
    assert page.locator('[data-testid="stAlert"]', has_text="does not").count() == 0
    bars = page.locator(".js-plotly-plot").first.text_content()  # one bar per merge
    assert all(method in bars for method in METHODS), bars
    with page.expect_download() as info:
        page.get_by_role("button", name="Download merged model (.safetensors)").click()
    merged_path = tmp_path / info.value.suggested_filename
    info.value.save_as(merged_path)
    with page.expect_download() as info:
        page.get_by_role("button", name="Download recipe (.json)").click()
    recipe_text = info.value.path().read_text()
    recipe = json.loads(recipe_text)
    assert recipe["models"] == list(FILES) and recipe["model_files"] == list(FILES)
    assert page.get_by_text(f"--models {' '.join(FILES)}").count() >= 1  # the shown command
    context.close()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in FILES:
        shutil.copy(tmp_path / name, elsewhere / f"copy_of_{name}")
    (elsewhere / "recipe.json").write_text(recipe_text)
    done = subprocess.run(
        [sys.executable, "-m", "ccamerge", "replay", "recipe.json", "--models",
         *[f"copy_of_{n}" for n in FILES], "--out", "replayed.safetensors", "--quiet"],
        cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    downloaded = load_model(merged_path).state_dict()
    replayed = load_model(elsewhere / "replayed.safetensors").state_dict()
    assert downloaded.keys() == replayed.keys()
    assert all(torch.equal(t, replayed[k]) for k, t in downloaded.items())
