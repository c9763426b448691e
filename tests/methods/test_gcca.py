"""gcca: the MAXVAR shared space against scipy's generalized eigensolver and against cca (N = 2),
its invariances (reference, permutations, copies) and the method end to end (API and CLI)."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers import max_output_diff, permuted_twin

from ccamerge.api import merge
from ccamerge.cli import main
from ccamerge.errors import CcamergeError
from ccamerge.io import load_model, save_model
from ccamerge.methods import get_method
from ccamerge.methods.cca import cca
from ccamerge.methods.gcca import solve_shared, transform_to
from ccamerge.stats import PointStatistics

GAMMA = 0.1  # relative ridge, the method's default


def _point(xs: list[np.ndarray]) -> PointStatistics:
    """Statistics of one merge point from samples ``xs[i]`` ``[S, n_i]`` (numpy's covariance)."""
    joint = np.cov(np.hstack(xs).T)
    edges = np.cumsum([0] + [x.shape[1] for x in xs])
    covs = {(i, j): joint[edges[i]:edges[i + 1], edges[j]:edges[j + 1]]
            for i in range(len(xs)) for j in range(i, len(xs))}
    return PointStatistics("p", xs[0].shape[1], len(xs[0]), [x.mean(0) for x in xs], covs)


def _family(n_models: int, width: int = 6, samples: int = 1500, seed: int = 0) -> list[np.ndarray]:
    """Features of ``n_models`` related models: a shared signal seen through different mixings,
    plus noise of its own for each."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(samples, width)) * np.linspace(1.0, 3.0, width)
    return [signal @ rng.normal(size=(width, width)) + 0.7 * rng.normal(size=(samples, width))
            for _ in range(n_models)]


def _transforms(xs, reference=0, **options):
    space = solve_shared(_point(xs), len(xs), gamma=GAMMA, relative=True, **options)
    return [transform_to(space, i, reference) for i in range(len(xs))]


def test_two_models_give_cca_merge_transforms():
    xs = _family(2)
    p = _point(xs)
    fit = cca(p.cov(0, 0), p.cov(1, 1), p.cov(0, 1), gamma=GAMMA, relative=True)
    space = solve_shared(p, 2, gamma=GAMMA, relative=True)
    t = transform_to(space, 1, 0)
    np.testing.assert_allclose(t.T, fit.T, atol=1e-9)
    np.testing.assert_allclose(t.T_inv, fit.T_inv, atol=1e-9)
    np.testing.assert_allclose(space.rho, fit.rho, atol=1e-10)  # lambda = 1 + rho for N = 2


def _oracle_transform(xs, i, reference):
    """T_i from scipy's generalized eigensolver on A w = lambda D w, in the units' basis."""
    p = _point(xs)
    n = [x.shape[1] for x in xs]
    edges = np.cumsum([0] + n)
    ridge = [GAMMA * np.trace(p.cov(j, j)) / n[j] for j in range(len(xs))]
    a = np.block([[p.cov(r, c) + (ridge[r] * np.eye(n[r]) if r == c else 0)
                   for c in range(len(xs))] for r in range(len(xs))])
    d = scipy.linalg.block_diag(*[p.cov(j, j) + ridge[j] * np.eye(n[j]) for j in range(len(xs))])
    values, w = scipy.linalg.eigh(a, d)
    k = min(n)
    values, w = values[::-1][:k], w[:, ::-1][:, :k]
    roots = [scipy.linalg.sqrtm(d[edges[j]:edges[j + 1], edges[j]:edges[j + 1]]).real
             for j in range(len(xs))]
    # whitened blocks S_j^1/2 w_j, scaled by lambda^1/2, to the nearest orthonormal columns
    ortho = [scipy.linalg.polar(roots[j] @ w[edges[j]:edges[j + 1]] * np.sqrt(values))[0]
             for j in range(len(xs))]
    return values, np.linalg.solve(roots[i], ortho[i]) @ ortho[reference].T @ roots[reference]


@pytest.mark.parametrize("n_models", [3, 4])
def test_shared_space_agrees_with_scipys_generalized_eigensolver(n_models):
    xs = _family(n_models, seed=n_models)
    space = solve_shared(_point(xs), n_models, gamma=GAMMA, relative=True)
    for i in range(1, n_models):
        values, oracle = _oracle_transform(xs, i, 0)
        np.testing.assert_allclose(space.eigenvalues, values, rtol=1e-9)
        np.testing.assert_allclose(transform_to(space, i, 0).T, oracle, atol=1e-8)


def test_changing_the_reference_only_changes_the_basis():
    """T_i to reference s = T_i to reference 0, then 0's basis to s's (cca has no such law)."""
    xs = _family(4, seed=7)
    to_0, to_2 = _transforms(xs, 0), _transforms(xs, 2)
    back = np.linalg.inv(to_0[2].T)
    for i in range(4):
        np.testing.assert_allclose(to_2[i].T, to_0[i].T @ back, atol=1e-8)
        np.testing.assert_allclose(to_2[i].T @ to_2[i].T_inv, np.eye(6), atol=1e-8)
    p = _point(xs)
    pairwise = cca(p.cov(2, 2), p.cov(1, 1), p.cov(2, 1), gamma=GAMMA, relative=True).T
    assert np.abs(pairwise - to_0[1].T @ back).max() > 1e-3  # cca's pairs disagree: not vacuous


def test_permuted_family_maps_to_exact_permutations():
    rng = np.random.default_rng(3)
    x = _family(1)[0]
    perms = [np.eye(6)[:, rng.permutation(6)] for _ in range(4)]  # model i sees x @ P_i
    xs = [x @ p for p in perms]
    for i, t in enumerate(_transforms(xs, reference=1)):
        np.testing.assert_allclose(t.T, perms[i].T @ perms[1], atol=1e-9)
    c = np.cov(x.T)  # identical features correlate as far as the ridge lets them: C (C + g)^-1
    shrunk = np.linalg.eigvalsh(c @ np.linalg.inv(c + GAMMA * np.trace(c) / 6 * np.eye(6)))
    space = solve_shared(_point(xs), 4, gamma=GAMMA, relative=True)
    np.testing.assert_allclose(space.rho, np.sort(shrunk)[::-1], atol=1e-10)


def test_copies_with_dead_and_rank_deficient_units_map_to_identity():
    rng = np.random.default_rng(4)
    base = np.maximum(rng.normal(size=(800, 4)), 0.0)
    x = np.hstack([base, base @ rng.uniform(0.5, 1.5, size=(4, 3)), np.zeros((800, 2))])
    for t in _transforms([x, x, x]):  # 9 units: 4 free, 3 dependent, 2 dead
        np.testing.assert_allclose(t.T, np.eye(9), atol=1e-7)
        np.testing.assert_allclose(t.T_inv, np.eye(9), atol=1e-7)


def test_a_narrower_shared_space_gives_rank_k_maps_and_too_wide_fails():
    xs = _family(3)
    ts = _transforms(xs, width=2)
    assert np.allclose(ts[0].T, np.eye(6))  # the reference keeps its units
    for t in ts[1:]:
        assert np.linalg.matrix_rank(t.T, tol=1e-9) == 2
        projector = t.T @ t.T_inv
        np.testing.assert_allclose(projector @ projector, projector, atol=1e-8)
    with pytest.raises(CcamergeError, match="narrowest model's width 6"):
        _transforms(xs, width=7)


def test_one_model_and_missing_blocks_are_one_clear_line():
    with pytest.raises(CcamergeError, match="at least 2 models"):
        solve_shared(_point(_family(1)), 1, gamma=GAMMA, relative=True)
    p = _point(_family(3))
    del p.covs[(1, 2)]
    with pytest.raises(CcamergeError, match="pairs='all'"):
        solve_shared(p, 3, gamma=GAMMA, relative=True)


def test_merge_of_two_models_computes_cca_merges_function(mlps, digits):
    """Transforms agree to ~1e-9 (above); the merged weights are float32, so the logits agree
    to float32 rounding of the averaged weights: 1e-4 is ~100 ulps of logits of size ~10."""
    gcca = merge(mlps[:2], digits, "gcca").model
    reference = merge(mlps[:2], digits, "cca").model
    assert max_output_diff(gcca, reference, digits.x_test) < 1e-4


def test_merge_of_a_permuted_family_returns_the_model(mlps, digits):
    """Exact on the statistics' inputs. Units that never fire there (this model has 6 in fc2)
    carry no statistics and are paired in order, as cca pairs them, so inputs that wake them
    may differ: on the test set the predictions are checked instead."""
    model = mlps[2]
    family = [model, permuted_twin(model, seed=1), permuted_twin(model, seed=2)]
    result = merge(family, digits, "gcca", reference=1)
    assert max_output_diff(result.model, model, digits.x_train) < 1e-4
    with torch.no_grad():
        agree = (result.model(digits.x_test).argmax(1) == model(digits.x_test).argmax(1))
    assert agree.float().mean() > 0.99
    assert result.recipe["options"] == get_method("gcca").defaults()
    assert all(sorted(per_model) == [0, 2] for per_model in result.correlations().values())


def test_merge_needs_two_models_and_two_samples(mlps, digits):
    with pytest.raises(CcamergeError, match="at least 2 models"):
        merge(mlps[:1], digits, "gcca")
    with pytest.raises(CcamergeError, match="1 sample.*at least 2"):
        merge(mlps[:3], digits.x_train[:1], "gcca", bn_reset=False)
    few = merge(mlps[:3], digits.x_train[:40], "gcca")  # rank-deficient blocks: ridge, warning
    assert any("samples per feature" in w for w in few.warnings)
    assert all(torch.isfinite(t).all() for t in few.model.state_dict().values())


def test_cli_merge_with_gcca_writes_what_the_api_computes(mlps, digits, tmp_path, capsys):
    paths = [tmp_path / f"m{i}.safetensors" for i in range(3)]
    for model, path in zip(mlps, paths, strict=True):
        save_model(model, path)
    out = tmp_path / "merged.safetensors"
    code = main(["merge", *map(str, paths), "--method", "gcca", "--shared-width", "40",
                 "--out", str(out), "--json", "--quiet"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["options"] == {"gamma": GAMMA, "relative": True, "shared_width": 40,
                                  "consensus_units": False}
    merged = load_model(out)
    wanted = merge([load_model(p) for p in paths], digits, "gcca", shared_width=40).model
    assert all(torch.equal(t, merged.state_dict()[k]) for k, t in wanted.state_dict().items())
    assert merged.info["test_accuracy"] > 50
