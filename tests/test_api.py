import numpy as np
import pytest
import torch

from ccamerge.api import interpolate, merge, spectrum
from ccamerge.errors import CcamergeError
from ccamerge.evaluate import barrier, evaluate_model
from ccamerge.models import build_model
from ccamerge.spec import build_spec
from ccamerge.stats import collect_statistics


def test_mismatched_models_are_refused(mlps, digits):
    with pytest.raises(CcamergeError, match="architecture"):
        merge([mlps[0], build_model("vgg")], digits, "cca")
    with pytest.raises(CcamergeError, match="hidden"):
        merge([mlps[0], build_model("mlp", hidden=[32, 32])], digits, "permute")
    with pytest.raises(CcamergeError, match="num_classes"):
        merge([mlps[0], build_model("mlp", hidden=[64, 64], num_classes=3)], digits, "permute")


def test_bad_calls_fail_with_clear_messages(mlps, digits):
    with pytest.raises(CcamergeError, match="at least 2"):
        merge(mlps[:1], digits, "cca")
    with pytest.raises(CcamergeError, match="reference"):
        merge(mlps[:2], digits, "cca", reference=5)
    with pytest.raises(CcamergeError, match="shape"):
        merge(mlps[:2], digits.x_train[:, :, :4, :4], "cca")
    with pytest.raises(CcamergeError, match="no option"):
        merge(mlps[:2], digits, "average", gamma=1.0)


def test_merge_result_carries_its_recipe_and_details(mlps, digits):
    result = merge(mlps[:3], digits, "cca", gamma=0.5, relative=False, reference=1)
    assert result.recipe["method"] == "cca"
    assert result.recipe["options"] == {"gamma": 0.5, "relative": False}
    assert result.recipe["reference"] == 1
    assert result.recipe["data"]["name"] == "digits"
    assert result.model.info == {"merge": result.recipe}
    assert set(result.alignment.details["fc1"]) == {0, 2}  # every model but the reference
    rho = result.correlations()["fc1"][0]
    assert rho.shape == (64,) and np.all(np.diff(rho[rho > 0]) <= 1e-12)
    assert result.statistics.summary()["fc1"]["samples"] == len(digits.x_train)


def test_the_recipe_is_complete_and_names_the_sources(mlps, digits):
    result = merge(mlps[:2], digits, "zipit", alpha=0.5, bn_reset=False, bn_policy="mapped",
                   weights=[0.25, 0.75], stats_samples=500, seed=4,
                   sources=["a.safetensors", None], data_dir="/data")
    assert result.recipe == {
        "method": "zipit", "options": {"alpha": 0.5, "beta": 0.125}, "reference": 0,
        "target_model": 0, "target_width": None, "target_widths": {"fc1": 64, "fc2": 64},
        "bn_reset": False, "bn_policy": "mapped", "reset_base_bn": False,
        "stream_points": "pooled", "repair": False, "products": "float32",
        "weights": [0.25, 0.75],
        "stats_samples": 500, "seed": 4, "models": ["a.safetensors", None],
        "model_sha256": [None, None], "model_files": [None, None],  # trained here, not loaded
        "data": {"name": "digits", "data_dir": "/data", "train_size": len(digits.y_train),
                 "test_size": len(digits.y_test), "num_classes": 10, "image_shape": [1, 8, 8]}}
    for model, source in zip(mlps[:2], ["m0.safetensors", "m1.safetensors"], strict=True):
        model.source = source
    try:
        by_default = merge(mlps[:2], digits.x_train, "average").recipe
    finally:
        for model in mlps[:2]:
            del model.source
    assert by_default["models"] == ["m0.safetensors", "m1.safetensors"]
    assert by_default["model_files"] == ["m0.safetensors", "m1.safetensors"]
    assert by_default["data"] is None  # a bare tensor names no dataset
    with pytest.raises(CcamergeError, match="2 models"):
        merge(mlps[:2], digits, "average", sources=["a.safetensors"])


def test_too_few_samples_produce_a_warning(mlps, digits):
    result = merge(mlps[:2], digits, "cca", stats_samples=100)
    assert any("samples per feature" in w for w in result.warnings)


def test_interpolation_endpoints_are_the_true_models(mlps, digits):
    a, b = mlps[:2]
    for method in ("average", "permute", "cca"):
        curve = interpolate(a, b, digits, method, steps=5)
        assert curve["lambdas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert curve["accuracy"][0] == pytest.approx(
            evaluate_model(a, digits.x_test, digits.y_test)["accuracy"])
        assert curve["loss"][-1] == pytest.approx(
            evaluate_model(b, digits.x_test, digits.y_test)["loss"], rel=1e-4)
        assert curve["barrier"] == pytest.approx(barrier(curve["lambdas"], curve["loss"]))
    with pytest.raises(CcamergeError, match="jointly"):
        interpolate(a, b, digits, "zipit")
    curve = interpolate(a, b, digits, "gcca", steps=3)  # gcca's maps: the endpoints stay
    assert curve["accuracy"][0] == pytest.approx(
        evaluate_model(a, digits.x_test, digits.y_test)["accuracy"])
    with pytest.raises(CcamergeError, match="consensus_units moves every model"):
        interpolate(a, b, digits, "gcca", consensus_units=True)


def test_alignment_lowers_the_barrier(mlps, digits):
    a, b = mlps[:2]
    plain = interpolate(a, b, digits, "average", steps=5)["barrier"]
    aligned = interpolate(a, b, digits, "cca", steps=5)["barrier"]
    assert aligned < plain


def test_barrier_of_a_straight_line_is_zero_and_of_a_bump_is_its_height():
    assert barrier([0, 0.5, 1], [1.0, 1.5, 2.0]) == pytest.approx(0.0)
    assert barrier([0, 0.5, 1], [1.0, 3.0, 1.0]) == pytest.approx(2.0)


def test_spectrum_reports_every_point_with_health(mlps, digits):
    rows = spectrum(mlps[:2], digits)
    assert [r["name"] for r in rows] == ["fc1", "fc2"]
    fitting = len(digits.x_train) - round(0.2 * len(digits.x_train))
    for row in rows:
        assert len(row["shrunk"]) == len(row["matched_heldout"]) == row["width"] == 64
        # on the images it was fitted on, a linear map reaches at least the matched units
        assert row["exact_fit"][0] >= row["matched_fit"][0] - 1e-6
        # the ridge shrinks: the pairs reach at least the shrunk values where they were fitted
        assert (np.asarray(row["reached_fit"]) >= np.asarray(row["shrunk"]) - 1e-9).all()
        assert row["samples"] == fitting
        assert row["heldout_samples"] == len(digits.x_train) - fitting
        assert row["samples_per_feature"] == pytest.approx(fitting / 64)
        assert row["cond_xx"] >= 1.0


def test_spectrum_on_given_statistics_holds_nothing_out_and_equals_the_rows(mlps, digits):
    from ccamerge.analysis.spectra import spectrum_rows

    stats = collect_statistics(mlps[:2], build_spec(mlps[0]), digits.x_train[:400])
    rows = spectrum(mlps[:2], digits, statistics=stats)
    assert rows == spectrum_rows(stats, None)
    assert all(r["reached_heldout"] is None and r["heldout_samples"] is None for r in rows)


def test_repair_restores_unit_statistics_of_a_net_without_batchnorm(mlps, digits):
    from ccamerge.repair import unit_moments

    plain = merge(mlps[:2], digits, "average").model
    repaired = merge(mlps[:2], digits, "average", repair=True)
    assert repaired.recipe["repair"] is True and not repaired.warnings
    x = digits.x_train
    before = unit_moments(plain, ["layers.3"], x)["layers.3"][1]
    after = unit_moments(repaired.model, ["layers.3"], x)["layers.3"][1]
    target = sum(0.5 * unit_moments(m, ["layers.3"], x)["layers.3"][1] for m in mlps[:2])
    # averaging unaligned units collapses their spread; REPAIR puts it back on target
    assert (after - target).abs().max() < 0.05 * target.mean()
    assert (before - target).abs().mean() > (after - target).abs().mean()


def test_repair_on_batchnorm_nets_says_it_did_nothing(vgg_bn, digits):
    result = merge(vgg_bn, digits.x_train[:200], "permute", repair=True)
    assert any("REPAIR found no merge point" in w for w in result.warnings)
    with pytest.raises(CcamergeError, match="REPAIR"):
        merge(vgg_bn, digits.x_train[:200], "zipit", repair=True)


def test_merge_and_evaluation_read_data_loaders(mlps, digits):
    from torch.utils.data import DataLoader, TensorDataset

    from ccamerge.data import Dataset

    loaders = Dataset("loaders", train=DataLoader(TensorDataset(digits.x_train, digits.y_train),
                                                  batch_size=64),
                      test=DataLoader(TensorDataset(digits.x_test, digits.y_test), batch_size=50))
    merged = merge(mlps[:2], loaders, "cca").model
    assert evaluate_model(merged, loaders.test) == pytest.approx(
        evaluate_model(merge(mlps[:2], digits, "cca").model, digits.x_test, digits.y_test))
    curve = interpolate(*mlps[:2], loaders, "permute", steps=3)
    expected = interpolate(*mlps[:2], digits, "permute", steps=3)
    assert curve["loss"] == pytest.approx(expected["loss"], rel=1e-9)
    assert curve["accuracy"] == expected["accuracy"]


def test_bad_loaders_fail_with_one_clear_line(mlps, digits):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from ccamerge.data import Dataset

    cropped = DataLoader(TensorDataset(digits.x_train[:, :, :6], digits.y_train), batch_size=64)
    with pytest.raises(CcamergeError, match="shape \\[1, 8, 8\\] but the data has \\[1, 6, 8\\]"):
        merge(mlps[:2], cropped, "cca")
    mixed = [(digits.x_train[:64], digits.y_train[:64]), (digits.x_train[64:128, :, :6], None)]
    with pytest.raises(CcamergeError, match="batch 1 holds samples of shape \\[1, 6, 8\\]"):
        merge(mlps[:2], mixed, "cca")
    wrong = digits.y_train.clone()
    wrong[100] = 12
    labels = Dataset("bad", train=DataLoader(TensorDataset(digits.x_train, wrong), batch_size=64),
                     test=[(digits.x_test, digits.y_test)], num_classes=10)
    with pytest.raises(CcamergeError, match="batch 1: label 12 is out of range for 10 classes"):
        merge(mlps[:2], labels, "cca")
    with pytest.raises(CcamergeError, match="label 12 is out of range for a model with 10"):
        evaluate_model(mlps[0], [(digits.x_test[:4], torch.tensor([0, 1, 12, 3]))])
    with pytest.raises(CcamergeError, match="one-shot iterator"):
        merge(mlps[:2], (b for b in [digits.x_train]), "cca")


def test_merge_on_an_explicit_cpu_device_is_the_default_merge(mlps, digits):
    default = merge(mlps[:2], digits, "cca")
    on_cpu = merge(mlps[:2], digits, "cca", device="cpu")
    for key, value in default.model.state_dict().items():
        assert torch.equal(value, on_cpu.model.state_dict()[key]), key
    assert on_cpu.collection == {"device": "cpu", "world_size": 1,
                                 "samples_per_rank": [len(digits.y_train)],
                                 "samples": len(digits.y_train),
                                 "layout": on_cpu.collection["layout"], "products": "float32",
                                 "threads": torch.get_num_threads()}
    assert merge(mlps[:2], digits, "weight_matching").collection["samples"] == 0


def test_a_missing_device_fails_before_any_work(mlps, digits, monkeypatch):
    import ccamerge.api as api_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = []
    monkeypatch.setattr(api_module, "collect_statistics", lambda *a, **k: calls.append(1))
    with pytest.raises(CcamergeError, match="CUDA is not available"):
        merge(mlps[:2], digits, "cca", device="cuda")
    assert calls == []


def test_one_statistics_pass_serves_every_method_interpolation_and_spectrum(
        mlps, digits, monkeypatch):
    import ccamerge.api as api_module
    from ccamerge.api import align

    real, calls = api_module.collect_statistics, []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("pairs", "reference"))
        return real(*args, **kwargs)

    monkeypatch.setattr(api_module, "collect_statistics", counted)
    stats = align(mlps[:2], digits, "zipit").statistics  # every pair: serves every method
    assert calls == ["all"]
    for method in ("cca", "permute", "ot", "zipit"):
        reused = merge(mlps[:2], digits, method, statistics=stats).model.state_dict()
        fresh = merge(mlps[:2], digits, method).model.state_dict()
        assert all(torch.allclose(v, fresh[k], atol=1e-6) for k, v in reused.items()), method
    assert len(calls) == 5  # the four fresh merges collected, the four reuses did not
    interpolate(*mlps[:2], digits, "cca", steps=3, statistics=stats)
    spectrum(mlps[:2], digits, statistics=stats)
    assert len(calls) == 5
