import json

import numpy as np
import pytest
import torch
from helpers import max_output_diff, permuted_twin

from ccamerge.api import merge
from ccamerge.errors import CcamergeError
from ccamerge.evaluate import evaluate_model
from ccamerge.methods import METHODS, describe_methods, get_method
from ccamerge.methods.weight_matching import match_pair
from ccamerge.models import build_model
from ccamerge.spec import build_spec
from ccamerge.transform import apply_transforms, random_permutations

PLANTED = ["permute", "weight_matching", "ot"]


@pytest.mark.parametrize("method", PLANTED)
def test_exact_methods_recover_a_planted_permutation(method, mlps, digits):
    model = mlps[0]
    merged = merge([model, permuted_twin(model)], digits, method).model
    assert max_output_diff(merged, model, digits.x_test) < 1e-4


def test_cca_recovers_a_planted_permutation_within_half_a_point(mlps, digits):
    model = mlps[0]
    result = merge([model, permuted_twin(model)], digits, "cca")
    base = evaluate_model(model, digits.x_test, digits.y_test)["accuracy"]
    got = evaluate_model(result.model, digits.x_test, digits.y_test)["accuracy"]
    assert abs(got - base) <= 0.5
    for t in result.alignment.transforms[1].values():  # CCA found the permutation itself
        np.testing.assert_allclose(np.abs(t.T).max(0), 1.0, atol=1e-3)
        np.testing.assert_allclose(np.abs(t.T).sum(0), 1.0, atol=1e-3)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("copies", [2, 3])
def test_merging_copies_of_a_model_returns_it(method, copies, mlps, digits):
    model = mlps[1]
    merged = merge([model] * copies, digits, method).model
    assert max_output_diff(merged, model, digits.x_test) < 1e-4


@pytest.mark.parametrize("method", ["permute", "cca", "zipit", "weight_matching"])
def test_self_merge_of_batchnorm_resnet_returns_it(method, resnets, digits):
    model = resnets[0]
    x = digits.x_train[:300]  # statistics and BatchNorm reset data
    merged = merge([model, model], x, method).model
    reset = merge([model, model], x, "average").model  # same BN-reset policy, no alignment
    assert max_output_diff(merged, reset, digits.x_test[:200]) < 1e-3


@pytest.mark.parametrize("method", ["permute", "weight_matching", "ot"])
def test_planted_permutation_in_resnet_streams_is_recovered(method, resnets, digits):
    model = resnets[0]
    twin = permuted_twin(model, seed=5)
    merged = merge([model, twin], digits.x_train[:300], method, bn_reset=False).model
    assert max_output_diff(merged, model, digits.x_test[:200]) < 1e-3


def test_weight_matching_recovers_planted_permutations_without_data():
    torch.manual_seed(0)
    model = build_model("mlp", hidden=[32, 32, 32])
    spec = build_spec(model)
    planted = random_permutations(spec, seed=3)
    twin_state = apply_transforms(model.state_dict(), spec, planted)
    found = match_pair(model.state_dict(), twin_state, spec)
    for name, t in planted.items():
        # twin unit j holds original unit perm[j]; matching must bring it back
        np.testing.assert_array_equal(np.argsort(t.T.argmax(0)), found[name])


def test_merging_distinct_models_beats_plain_averaging(mlps, digits):
    scores = {m: evaluate_model(merge(mlps[:2], digits, m).model, digits.x_test, digits.y_test)
              for m in ("average", "permute", "cca")}
    assert scores["cca"]["accuracy"] > scores["average"]["accuracy"]
    assert scores["permute"]["accuracy"] > scores["average"]["accuracy"]


def test_zipit_pairs_identical_features():
    from ccamerge.methods.zipit import zipit_transforms

    rng = np.random.default_rng(0)
    c = np.corrcoef(rng.normal(size=(6, 100)))
    joint = np.block([[c, c], [c, c]])
    transforms, sizes = zipit_transforms(joint, 2, 6, alpha=0.3, beta=0.5)
    assert sizes == [2] * 6
    for t in transforms:
        np.testing.assert_allclose(t.T, np.eye(6))


def test_registry_validates_options_and_names():
    assert get_method("cca").resolve({}) == {"gamma": 0.1, "relative": True}
    assert get_method("cca").resolve({"gamma": "2", "relative": "false"}) == {"gamma": 2.0,
                                                                            "relative": False}
    with pytest.raises(CcamergeError, match="no option"):
        get_method("permute").resolve({"gamma": 1.0})
    with pytest.raises(CcamergeError, match=r"gamma must be in \[0, 1e\+06\], got -1"):
        get_method("cca").resolve({"gamma": -1})
    with pytest.raises(CcamergeError, match="choose one of"):
        get_method("magic")
    described = json.loads(json.dumps(describe_methods()))
    assert set(described) == {"average", "permute", "weight_matching", "zipit", "ot", "cca",
                              "gcca"}
    assert described["zipit"]["options"]["alpha"]["default"] == 0.3
