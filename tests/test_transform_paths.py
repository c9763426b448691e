"""apply_transforms' three paths (identity, permutation, dense) against a numpy oracle."""

import numpy as np
import pytest
import torch

from ccamerge.models import build_model
from ccamerge.spec import Axis, build_spec
from ccamerge.transform import Transform, _apply_along, apply_transforms, random_permutations


def _oracle(tensor: torch.Tensor, axis: Axis, matrix: np.ndarray) -> np.ndarray:
    """numpy float64: ``matrix @ x`` on the span's ``[n, repeat * rest]`` block of the axis."""
    x = np.moveaxis(tensor.double().numpy(), axis.axis, 0).copy()
    n = len(matrix)
    span = slice(axis.offset, axis.offset + n * axis.repeat)
    x[span] = (matrix @ x[span].reshape(n, -1)).reshape(x[span].shape)
    return np.moveaxis(x, 0, axis.axis).astype(np.float32)


FLATTENED = Axis("w", 1, repeat=5, offset=2)  # 4 units of 5 entries after 2 others, then 3


@pytest.mark.parametrize("shape, axis, n", [((6, 5, 3, 3), Axis("w", 0), 6),
                                            ((7, 4, 3, 3), Axis("w", 1), 4),
                                            ((3, 2 + 4 * 5 + 3), FLATTENED, 4),
                                            ((9,), Axis("b", 0, offset=3), 6)])
def test_dense_and_permutation_paths_equal_the_oracle(shape, axis, n):
    rng = np.random.default_rng(0)
    tensor = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
    dense = rng.normal(size=(n, n))
    np.testing.assert_allclose(_apply_along(tensor, axis, dense).numpy(),
                               _oracle(tensor, axis, dense), rtol=1e-6, atol=1e-6)
    perm = np.eye(n)[rng.permutation(n)]
    np.testing.assert_array_equal(_apply_along(tensor, axis, perm).numpy(),
                                  _oracle(tensor, axis, perm))
    np.testing.assert_array_equal(_apply_along(tensor, axis, perm.T).numpy(),
                                  _oracle(tensor, axis, perm.T))
    assert _apply_along(tensor, axis, np.eye(n)) is tensor
    near = np.eye(n)
    near[0, 1] = 1e-12  # not a permutation: the dense path
    assert _apply_along(tensor, axis, near) is not tensor


def test_permuted_model_computes_the_same_function_and_identity_shares_tensors(digits):
    torch.manual_seed(0)
    model = build_model("resnet20", width=0.5, blocks=2).eval()
    spec = build_spec(model)
    state = model.state_dict()
    same = apply_transforms(state, spec, {p.name: Transform.identity(p.width) for p in spec.points})
    assert all(same[k] is state[k] for k in state)
    permuted = apply_transforms(state, spec, random_permutations(spec, seed=1))
    twin = build_model("resnet20", width=0.5, blocks=2).eval()
    twin.load_state_dict(permuted)
    x = digits.x_train[:16]
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=1e-5, atol=1e-5)
    assert any(not torch.equal(permuted[k], state[k]) for k in state)
