"""Uploads held once and within a per-session budget; caches bounded in bytes."""

from __future__ import annotations

import pytest
import torch
from test_apptest import start, upload
from uploads_helpers import random_model, safetensors_bytes

from ccamerge.errors import CcamergeError
from dashboard import caches, data, registry, state


def _model_bytes(model) -> int:
    return sum(t.nelement() * t.element_size() for t in model.state_dict().values())


def test_a_model_weighs_its_tensors_and_shared_storage_counts_once():
    model = random_model("mlp", hidden=[32, 32])
    assert caches.nbytes(model) == _model_bytes(model)
    assert caches.nbytes({"a": model, "b": [model, "text"]}) == _model_bytes(model) + 1 + 1 + 4
    x = torch.zeros(1000)
    assert caches.nbytes([x, x[:10], x.view(10, 100)]) == 4000


def test_the_memo_evicts_by_bytes_and_keeps_what_fits():
    models = [random_model("mlp", seed=s, hidden=[32, 32]) for s in range(3)]
    size = _model_bytes(models[0])
    memo = caches.Memo(2 * size + 10)
    assert memo.put("a", models[0]) and memo.put("b", models[1])
    assert memo.get("a") is models[0]  # "b" is now the oldest
    assert memo.put("c", models[2])
    assert memo.get("b") is None and memo.get("a") is models[0] and memo.get("c") is models[2]
    assert memo.bytes == 2 * size
    big = random_model("mlp", hidden=[256, 256])
    assert not memo.put("big", big)  # over the whole budget: not kept, nothing evicted for it
    assert memo.get("big") is None and memo.get("a") is models[0] and memo.get("c") is models[2]


def test_cached_keys_by_plain_arguments_and_hands_out_copies():
    memo, calls = caches.Memo(2**20), []

    @caches.cached(lambda: memo)
    def scores(digest: str, power: int, _payload: list) -> dict:
        calls.append(digest)
        if power < 0:
            raise CcamergeError("negative")
        return {"values": [len(_payload) ** power]}

    first = scores("x", 2, [1, 2, 3])
    first["values"].append("mutated by a page")
    assert scores("x", 2, ["ignored: starts with _"]) == {"values": [9]} and calls == ["x"]
    assert scores("y", 2, [1]) == {"values": [1]} and calls == ["x", "y"]
    for _ in range(2):
        with pytest.raises(CcamergeError):
            scores("z", -1, [])
    assert calls.count("z") == 2  # exceptions are not cached


def test_uploads_are_held_once_and_within_the_session_budget(tmp_path, monkeypatch):
    session = tmp_path / "session"
    session.mkdir()
    files = [safetensors_bytes(random_model("mlp", seed=s), tmp_path, f"m{s}.safetensors")
             for s in range(4)]
    monkeypatch.setattr(data, "SESSION_UPLOAD_BYTES", 2 * len(files[0]) + 100)
    models: dict = {}
    for k in range(2):
        entry, added = registry.add_model_upload(models, f"m{k}.safetensors", files[k], session)
        assert added and not hasattr(entry, "content")  # the bytes live in one file only
        assert entry.read() == files[k]
    before = dict(models)
    with pytest.raises(CcamergeError, match=r"m2.safetensors was not loaded: .* budget per "
                                            r"session; the models loaded so far stay"):
        registry.add_model_upload(models, "m2.safetensors", files[2], session)
    assert models == before and len(list(session.iterdir())) == 2
    again, added = registry.add_model_upload(models, "copy.safetensors", files[0], session)
    assert not added and again.id in before  # a duplicate takes no budget
    monkeypatch.setattr(data, "SESSION_UPLOAD_BYTES", 2**30)
    monkeypatch.setattr(data, "SESSION_UPLOAD_FILES", 2)
    with pytest.raises(CcamergeError, match="already holds 2 uploads"):
        registry.add_model_upload(models, "m3.safetensors", files[3], session)


def test_a_refused_upload_leaves_a_message_and_the_app_running(demo_cache, tmp_path, monkeypatch):
    app = start()
    monkeypatch.setattr(data, "SESSION_UPLOAD_BYTES", 1000)
    loaded = dict(app.session_state[state.MODELS])
    errors = upload(app, "extra.safetensors", safetensors_bytes(random_model("mlp", 7), tmp_path))
    assert "budget per session" in errors and "extra.safetensors" in errors
    assert app.session_state[state.MODELS] == loaded
    app.run()  # the app keeps running with what it had
    assert not app.exception and app.session_state[state.MODELS] == loaded
