"""The Spectra page's shared-space (gcca) figures, table and sentences, on rows the library
computes from constructed statistics of three models, the last an outlier."""

from __future__ import annotations

import numpy as np
import pytest

from ccamerge.analysis.shared import shared_spectrum_row
from ccamerge.analysis.spectra import spectrum_row
from ccamerge.stats import PointStatistics
from dashboard import charts_spectra as cs


def point_of(xs: list[np.ndarray], name: str) -> PointStatistics:
    c = np.cov(np.hstack(xs), rowvar=False)
    n, m = xs[0].shape[1], len(xs)
    blocks = {(i, j): c[i * n:(i + 1) * n, j * n:(j + 1) * n] for i in range(m)
              for j in range(i, m)}
    return PointStatistics(name, n, len(xs[0]), [x.mean(0) for x in xs], blocks)


def features(rng, maps: np.ndarray, samples: int) -> list[np.ndarray]:
    """Models 0 and 1 see one signal, model 2 (the outlier) its own."""
    z, own = (rng.standard_normal((samples, maps.shape[1])) for _ in range(2))
    return [s @ m + 0.5 * rng.standard_normal(z.shape) for s, m in zip((z, z, own), maps,
                                                                         strict=True)]


@pytest.fixture(scope="module")
def rows() -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(0)
    shared, pairs = [], []
    for name in ("fc1", "fc2"):
        maps = rng.standard_normal((3, 6, 6))
        fit = point_of(features(rng, maps, 1500), name)
        held = point_of(features(rng, maps, 500), name)
        shared.append(shared_spectrum_row(fit, held, 3, gamma=0.1, relative=True))
        pairs += [spectrum_row(fit, held, 0, i, gamma=0.1, relative=True) for i in (1, 2)]
    return shared, pairs


def test_shared_figure_draws_the_shared_spectrum_beside_each_pair(rows):
    shared, pairs = rows
    fig = cs.shared_figure(shared, pairs, model_names={1: "b", 2: "c"})
    names = [t.name for t in fig.data]
    assert names.count("shared directions, held-out") == 2
    assert names.count("from the eigenvalue, (λ − 1)/(N − 1)") == 2
    assert names.count("CCA pairs, held-out: c") == 2
    held = next(t for t in fig.data if t.name == "shared directions, held-out")
    np.testing.assert_allclose(held.y, shared[0]["rho_heldout"])
    assert [a.text for a in fig.layout.annotations] == ["fc1", "fc2"]


def test_without_held_out_statistics_the_fitting_ones_are_shown_once(rows):
    shared = [dict(r, rho_heldout=None) for r in rows[0]]
    names = [t.name for t in cs.shared_figure(shared, [], model_names={}).data]
    assert names == ["shared directions, fitting images",
                     "from the eigenvalue, (λ − 1)/(N − 1)"] * 2


def test_consensus_figure_and_note_name_the_outlier(rows):
    shared, _ = rows
    fig = cs.consensus_figure(shared, model_names={0: "a", 1: "b", 2: "c"})
    assert [t.name for t in fig.data] == ["a", "b", "c"] * 2
    assert np.mean(fig.data[2].y) < np.mean(fig.data[0].y) - 0.2
    note = cs.outlier_note(shared, {0: "a", 1: "b", 2: "c"})
    assert note.startswith("Follows the shared variates least: fc1: c (")
    assert "fc2: c (" in note


def test_headline_and_models_table(rows):
    shared, pairs = rows
    text = cs.shared_headline(shared[0], [p for p in pairs if p["name"] == "fc1"])
    assert text.startswith(f"**{shared[0]['mean_rho_heldout']:.3f}** is how strongly all 3")
    assert f"eigenvalues average {shared[0]['mean_eigenvalues']:.2f}" in text
    frame = cs.shared_models_frame(shared, {0: "a"})
    assert list(frame["model"]) == ["a", "model 1", "model 2"] * 2
    assert frame["with the shared variates, held-out"].iloc[2] < 0.5
