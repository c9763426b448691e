"""Models of different widths: rectangular transforms on weights, and gcca's rectangular maps
between a model and a wider copy of it built by duplicating every hidden unit."""

import numpy as np
import torch

from ccamerge.methods.gcca import solve_shared, transform_to
from ccamerge.models import build_model
from ccamerge.spec import build_spec
from ccamerge.stats import PointStatistics, batch_features
from ccamerge.transform import Transform, apply_transforms, average_states, with_state

HIDDEN = [12, 10]


def _narrow_and_duplicated(seed: int = 0):
    """An MLP and a twice as wide one computing the same function: every hidden unit twice,
    each copy read with half the weight."""
    torch.manual_seed(seed)
    narrow = build_model("mlp", in_features=7, hidden=HIDDEN, num_classes=3)
    wide = build_model("mlp", in_features=7, hidden=[2 * h for h in HIDDEN], num_classes=3)
    s = narrow.state_dict()
    doubled = {"layers.1.weight": torch.cat([s["layers.1.weight"]] * 2),
               "layers.1.bias": torch.cat([s["layers.1.bias"]] * 2),
               "layers.3.weight": torch.cat([s["layers.3.weight"]] * 2).repeat(1, 2) / 2,
               "layers.3.bias": torch.cat([s["layers.3.bias"]] * 2),
               "layers.5.weight": s["layers.5.weight"].repeat(1, 2) / 2,
               "layers.5.bias": s["layers.5.bias"]}
    wide.load_state_dict(doubled)
    return narrow, wide


def _outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_rectangular_transforms_narrow_a_duplicated_model_exactly():
    narrow, wide = _narrow_and_duplicated()
    x = torch.randn(50, 7)
    assert torch.allclose(_outputs(wide, x), _outputs(narrow, x), atol=1e-5)
    maps = {name: Transform(np.vstack([np.eye(h) / 2] * 2), np.hstack([np.eye(h)] * 2))
            for name, h in zip(("fc1", "fc2"), HIDDEN, strict=True)}
    assert maps["fc1"].width == 24 and maps["fc1"].target_width == 12
    state = apply_transforms(wide.state_dict(), build_spec(wide), maps)
    assert state["layers.3.weight"].shape == (10, 12)
    assert torch.allclose(_outputs(with_state(narrow, state), x), _outputs(narrow, x), atol=1e-5)


def _point(models, name, x) -> PointStatistics:
    """Statistics of merge point ``name`` of models of any widths (numpy's covariance)."""
    feats = [batch_features(m, build_spec(m), x)[name].double().numpy() for m in models]
    joint = np.cov(np.hstack(feats).T)
    edges = np.cumsum([0] + [f.shape[1] for f in feats])
    covs = {(i, j): joint[edges[i]:edges[i + 1], edges[j]:edges[j + 1]]
            for i in range(len(feats)) for j in range(i, len(feats))}
    return PointStatistics(name, feats[0].shape[1], len(x), [f.mean(0) for f in feats], covs)


def test_gcca_merges_a_duplicated_copy_into_the_narrow_model():
    narrow, wide = _narrow_and_duplicated(seed=1)
    x = torch.randn(600, 7)
    maps = {}
    for name in ("fc1", "fc2"):
        space = solve_shared(_point([narrow, wide], name, x), 2, gamma=0.0, relative=False)
        maps[name] = transform_to(space, 1, 0)
        assert maps[name].T.shape == (2 * maps[name].T.shape[1], maps[name].T.shape[1])
        np.testing.assert_allclose(space.rho, 1.0, atol=1e-8)  # the same features, twice
    state = apply_transforms(wide.state_dict(), build_spec(wide), maps)
    merged = with_state(narrow, average_states([narrow.state_dict(), state]))
    x_new = torch.randn(200, 7)
    assert torch.allclose(_outputs(merged, x_new), _outputs(narrow, x_new), atol=1e-4)
