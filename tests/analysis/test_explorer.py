import numpy as np
import pytest
from sklearn.decomposition import PCA

from ccamerge.analysis import explorer
from ccamerge.errors import CcamergeError
from ccamerge.spec import build_spec
from ccamerge.transform import apply_transforms, random_permutations, with_state


def _same_up_to_sign(a, b):
    for k in range(a.shape[1]):
        assert np.allclose(a[:, k], b[:, k], atol=1e-8) or np.allclose(a[:, k], -b[:, k], atol=1e-8)


def test_pca_matches_sklearn_up_to_sign():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 30)) @ rng.normal(size=(30, 30))
    _same_up_to_sign(explorer.pca_2d(x), PCA(2).fit_transform(x))
    profiles = rng.gamma(1.0, size=(50, 80))
    _same_up_to_sign(explorer.embed_units(profiles),
                     PCA(2).fit_transform(explorer.standardise(profiles)))


def test_unit_profiles_and_input_features_have_the_documented_shapes(mlps, vgg_bn, digits):
    x, y = explorer.sample_inputs(digits, 40)
    assert x.shape == (40, 1, 8, 8) and y.shape == (40,)
    spec = build_spec(mlps[0])
    assert explorer.unit_profiles(mlps[0], spec, x, "fc1").shape == (64, 40)
    spec = build_spec(vgg_bn[0])
    point = spec.points[0]
    assert explorer.unit_profiles(vgg_bn[0], spec, x, point.name).shape == (point.width, 40)
    flat = explorer.point_features(vgg_bn[0], spec, x, point.name, pool="flatten")
    assert flat.shape == (40, point.width * 8 * 8)
    with pytest.raises(CcamergeError, match="pool"):
        explorer.point_features(vgg_bn[0], spec, x, point.name, pool="max")


def test_a_permuted_twins_units_embed_like_the_originals_up_to_the_permutation(mlps, digits):
    model = mlps[0]
    spec = build_spec(model)
    perms = random_permutations(spec, seed=3)
    twin = with_state(model, apply_transforms(model.state_dict(), spec, perms))
    x, _ = explorer.sample_inputs(digits, 120)
    for point in spec.names:
        perm = np.argmax(perms[point].T, axis=0)  # twin unit j is unit perm[j]
        original = explorer.unit_profiles(model, spec, x, point)
        swapped = explorer.unit_profiles(twin, spec, x, point)
        assert np.allclose(swapped, original[perm], atol=1e-5)
        assert np.allclose(explorer.embed_units(swapped), explorer.embed_units(original)[perm],
                           atol=1e-6)
        found, corr = explorer.matched_partners(original, swapped)
        live = np.flatnonzero(original.std(1) > 0)
        assert np.array_equal(perm[found[live]], live) and np.allclose(corr[live], 1.0)


def test_unit_set_groups_and_partners(mlps, digits):
    moved, merged, spec = explorer.aligned_and_merged(mlps[:2], digits, "permute")
    x, _ = explorer.sample_inputs(digits, 100)
    units = explorer.unit_set(mlps[0], mlps[1], moved, merged, spec, x, "fc2")
    assert units.profiles.shape == (4 * 64, 100) and units.inputs == 100
    assert [units.group[r] for r in (0, 64, 128, 192)] == list(explorer.GROUPS)
    ref, model, aligned = (units.rows(g) for g in ("reference", "model", "aligned"))
    # a permutation only renames units: the aligned model has the model's units, reordered
    order = np.lexsort(units.profiles[model].T)
    assert np.allclose(units.profiles[model][order],
                       units.profiles[aligned][np.lexsort(units.profiles[aligned].T)], atol=1e-5)
    # partners are mutual between the reference and model i
    assert np.array_equal(units.partner[model][units.partner[ref]], np.arange(64))
    assert np.all(np.abs(units.partner_corr) <= 1.0)


def test_the_base_model_separates_the_digit_classes(mlps, digits):
    x, y = explorer.sample_inputs(digits, 300)
    spec = build_spec(mlps[0])
    features = explorer.point_features(mlps[0], spec, x, "fc2", pool="flatten")
    result = explorer.embed_inputs(features, y)
    assert result.coords.shape == (300, 2)
    assert result.separability > 85.0 > result.separability_2d > 10.0
    noise = np.random.default_rng(0).normal(size=features.shape)
    assert explorer.embed_inputs(noise, y).separability < 30.0


def test_umap_embeds_when_installed():
    pytest.importorskip("umap")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (30, 10)), rng.normal(8, 1, (30, 10))])
    coords = explorer.embed_units(x, "umap", seed=0)
    assert coords.shape == (60, 2) and np.isfinite(coords).all()
    with pytest.raises(CcamergeError, match="unknown embedding"):
        explorer.embed_units(x, "tsne")


def test_explorer_rejects_a_bad_model_index(mlps, digits):
    with pytest.raises(CcamergeError, match="other"):
        explorer.aligned_and_merged(mlps[:2], digits, "cca", other=0)
