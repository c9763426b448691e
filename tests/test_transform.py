import numpy as np
import torch

from ccamerge.models import build_model
from ccamerge.spec import build_spec
from ccamerge.transform import (
    Transform,
    apply_transforms,
    average_states,
    reset_batchnorm,
    with_state,
)


def test_dense_transform_then_its_inverse_restores_the_weights():
    model = build_model("vgg", batch_norm=True, width=0.5)
    spec = build_spec(model)
    rng = np.random.default_rng(0)
    forward, backward = {}, {}
    for p in spec.points:
        t = rng.normal(size=(p.width, p.width)) + 3 * np.eye(p.width)
        forward[p.name] = Transform(t, np.linalg.inv(t))
        backward[p.name] = Transform(np.linalg.inv(t), t)
    state = model.state_dict()
    there = apply_transforms(state, spec, forward)
    back = apply_transforms(there, spec, backward)
    assert not torch.allclose(there["features.0.weight"], state["features.0.weight"])
    for key in state:
        torch.testing.assert_close(back[key], state[key], atol=1e-4, rtol=1e-4)


def test_permutation_transform_layout():
    t = Transform.from_permutation([2, 0, 1])
    y = np.array([[10.0, 20.0, 30.0]])
    np.testing.assert_array_equal(y @ t.T, [[30.0, 10.0, 20.0]])  # unit perm[j] lands at j
    np.testing.assert_array_equal(t.T @ t.T_inv, np.eye(3))


def test_average_of_identical_states_is_the_state_and_weights_apply():
    a = build_model("mlp").state_dict()
    b = {k: v * 3 for k, v in a.items()}
    avg = average_states([a, a, a])
    for key in a:
        torch.testing.assert_close(avg[key], a[key])
    mix = average_states([a, b], [0.25, 0.75])
    torch.testing.assert_close(mix["layers.1.weight"], a["layers.1.weight"] * 2.5)


def test_batchnorm_reset_matches_batch_statistics(digits):
    torch.manual_seed(0)
    model = build_model("vgg", batch_norm=True, width=0.5)
    x = digits.x_train[:300]
    reset_batchnorm(model, x, batch_size=64)
    with torch.no_grad():
        conv_out = model.features[0](x)  # [300, C, 8, 8]
    bn = model.features[1]
    torch.testing.assert_close(bn.running_mean, conv_out.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)
    assert bn.momentum == 0.1  # restored after the cumulative pass
    assert not model.training
    # the pass runs channels-last; the model comes back in the standard layout, no autograd state
    assert all(v.is_contiguous() for v in model.state_dict().values())
    assert all(p.grad is None for p in model.parameters())


def test_with_state_leaves_the_original_untouched():
    model = build_model("mlp")
    zeros = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    clone = with_state(model, zeros)
    assert clone.layers[1].weight.abs().sum() == 0
    assert model.layers[1].weight.abs().sum() > 0
