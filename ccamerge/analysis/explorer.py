"""Feature explorer: hidden units embedded by their activation profiles, inputs by their hidden
representation (``method.md`` section 7, "how spread a feature is", seen as a picture).

* A unit's *profile* is its activation on a fixed sample of inputs, averaged over spatial
  positions for a conv map: ``[n_units, n_inputs]``. Units of the reference, of model i, of model i
  after alignment and of the merged model are embedded together in 2-D (PCA of the standardised
  profiles, or UMAP from umap-learn), so a unit sits near the units that fire on the same inputs.
* An input's representation at a merge point is the point's whole feature map, flattened:
  ``[n_inputs, n * H * W]``. Embedding the inputs per model, coloured by class, shows whether the
  merged model still separates the classes; a nearest-centroid accuracy puts a number on it.

Pure numpy / torch; the dashboard caches and draws these arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ccamerge.api import align, aligned_states, score_source, train_source
from ccamerge.data import as_source
from ccamerge.errors import CcamergeError
from ccamerge.methods.base import hungarian
from ccamerge.spec import AlignmentSpec
from ccamerge.stats import capture_features
from ccamerge.transform import apply_transforms, average_states, reset_batchnorm, with_state

SAMPLES = 500
GROUPS = ("reference", "model", "aligned", "merged")
EMBEDDINGS = ("pca", "umap")


# ----------------------------------------------------------------------------- features
@torch.no_grad()
def point_features(model: nn.Module, spec: AlignmentSpec, x, point: str, *,
                   pool: str = "mean", batch_size: int = 256) -> np.ndarray:
    """Features of merge point ``point`` per input of ``x`` (``[B, ...]``, or a data source,
    streamed): ``pool="mean"`` gives
    ``[B, n]`` (each unit averaged over spatial positions), ``"flatten"`` the whole map
    ``[B, n * H * W]`` (position-major). A residual stream's writers are averaged."""
    if pool not in ("mean", "flatten"):
        raise CcamergeError(f"pool must be 'mean' or 'flatten', not {pool!r}")
    sub = AlignmentSpec((spec.point(point),))
    model.eval()
    out = []
    for xb, _ in as_source(x).batches(batch_size):
        with capture_features(model, sub) as captured:
            model(xb)
        # each chunk is [B * H * W, n] (channel last); [B, H * W, n] per writer, then averaged
        maps = torch.stack([c.reshape(len(xb), -1, c.shape[1]) for c in captured[point]]).mean(0)
        out.append(maps.mean(1) if pool == "mean" else maps.reshape(len(xb), -1))
    return torch.cat(out).double().numpy()


def unit_profiles(model: nn.Module, spec: AlignmentSpec, x: torch.Tensor, point: str) -> np.ndarray:
    """``[n_units, B]``: each unit's activation per input (spatially averaged)."""
    return point_features(model, spec, x, point, pool="mean").T


def sample_inputs(data, samples: int = SAMPLES, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """A fixed random sample of at most ``samples`` test inputs ``[S, ...]`` and labels ``[S]``
    (only the sample is read)."""
    test = score_source(data)
    if samples < 2:
        raise CcamergeError(f"need at least 2 inputs, got {samples}")
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:samples]
    sample = test.subset(order.numpy())
    return sample.inputs().float(), sample.labels().numpy()


def aligned_and_merged(models: Sequence[nn.Module], data, method: str = "cca", *,
                       reference: int = 0, other: int = 1, bn_reset: bool = True,
                       stats_samples: int | None = None, seed: int = 0,
                       **options) -> tuple[nn.Module, nn.Module, AlignmentSpec]:
    """Model ``other`` after its transforms into the reference basis, and the merged model
    (average of every aligned model, BatchNorm statistics recomputed when ``bn_reset``)."""
    if not 0 <= other < len(models) or other == reference:
        raise CcamergeError(f"other must be a model index in 0..{len(models) - 1} other than the "
                            f"reference {reference}, got {other}")
    aligned = align(models, data, method, reference=reference, stats_samples=stats_samples,
                    seed=seed, **options)
    states = aligned_states(models, aligned)
    moved = with_state(models[other], apply_transforms(models[other].state_dict(), aligned.spec,
                                                       aligned.alignment.transforms[other]))
    merged = with_state(models[reference], average_states(states))
    if bn_reset:
        x = train_source(data)
        reset_batchnorm(moved, x)
        reset_batchnorm(merged, x)
    return moved.eval(), merged.eval(), aligned.spec


# ----------------------------------------------------------------------------- units
def correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation ``[n_a, n_b]`` between the rows of ``a`` ``[n_a, S]`` and ``b``
    ``[n_b, S]``; constant rows (dead units) give 0."""
    za, zb = standardise(a), standardise(b)
    return np.clip(za @ zb.T / a.shape[1], -1.0, 1.0)


def standardise(rows: np.ndarray) -> np.ndarray:
    """Each row shifted to mean 0 and scaled to std 1 (constant rows become 0)."""
    rows = np.asarray(rows, float)
    centred = rows - rows.mean(1, keepdims=True)
    std = centred.std(1, keepdims=True)
    return np.divide(centred, std, out=np.zeros_like(centred),
                     where=std > 1e-12 * max(float(std.max()), 1e-300))


def matched_partners(reference: np.ndarray, model: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian match of profiles ``[n, S]``: reference unit j <-> model unit ``perm[j]``;
    returns ``perm`` ``[n]`` and the matched correlations ``[n]``."""
    corr = correlation(reference, model)
    perm = hungarian(corr)
    return perm, corr[np.arange(len(perm)), perm]


@dataclass(frozen=True)
class UnitSet:
    """Units of one merge point in four groups of ``width`` rows, in :data:`GROUPS` order.

    ``profiles`` ``[4n, S]``; per row: ``group`` (name), ``unit`` (its index in that model),
    ``partner`` (reference units: the matched unit of model i; others: the reference unit they
    are matched or aligned to) and ``partner_corr`` (profile correlation with the partner).
    """

    point: str
    width: int
    profiles: np.ndarray
    group: tuple[str, ...]
    unit: np.ndarray
    partner: np.ndarray
    partner_corr: np.ndarray
    inputs: int

    def rows(self, group: str) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.group) == group)


def unit_set(reference: nn.Module, model: nn.Module, aligned: nn.Module, merged: nn.Module,
             spec: AlignmentSpec, x: torch.Tensor, point: str) -> UnitSet:
    """Profiles of the four models' units at ``point`` over inputs ``x``, with partners."""
    ref, mod, ali, mer = (unit_profiles(m, spec, x, point)
                          for m in (reference, model, aligned, merged))
    n = len(ref)
    perm, matched = matched_partners(ref, mod)
    inverse = np.empty(n, dtype=int)
    inverse[perm] = np.arange(n)
    same_index = np.arange(n)
    partner = np.concatenate([perm, inverse, same_index, same_index])
    corr = np.concatenate([matched, matched[inverse], _diag_corr(ali, ref), _diag_corr(mer, ref)])
    return UnitSet(point, n, np.concatenate([ref, mod, ali, mer]), tuple(np.repeat(GROUPS, n)),
                   np.tile(np.arange(n), 4), partner, corr, len(x))


def _diag_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Correlation of row j of ``a`` with row j of ``b`` ``[n]``."""
    return (standardise(a) * standardise(b)).mean(1)


# ----------------------------------------------------------------------------- embeddings
def pca_2d(x: np.ndarray) -> np.ndarray:
    """First two principal components ``[n, 2]`` of the rows of ``x`` ``[n, d]`` (numpy SVD of
    the column-centred matrix). Sign convention: each component's largest-magnitude loading is
    positive, so the picture does not depend on the order of the rows."""
    x = np.asarray(x, float)
    if x.shape[0] < 2:
        raise CcamergeError(f"need at least 2 points to embed, got {x.shape[0]}")
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(2, len(s))
    vt = vt[:k] * np.sign(vt[np.arange(k), np.abs(vt[:k]).argmax(1)])[:, None]
    coords = centred @ vt.T
    return np.pad(coords, ((0, 0), (0, 2 - k)))


def umap_2d(x: np.ndarray, *, seed: int = 0, neighbours: int = 15) -> np.ndarray:
    """UMAP embedding ``[n, 2]`` of the rows of ``x`` (umap-learn, imported on first use; its
    first call compiles numba code, ~10-30 s)."""
    try:
        import umap
    except ImportError as exc:
        raise CcamergeError("UMAP needs umap-learn: pip install umap-learn "
                            "(PCA works without it)") from exc
    if len(x) < 4:
        raise CcamergeError(f"UMAP needs at least 4 points, got {len(x)}")
    reducer = umap.UMAP(n_components=2, n_neighbors=min(neighbours, len(x) - 1), random_state=seed,
                        n_jobs=1)
    return np.asarray(reducer.fit_transform(np.asarray(x, np.float32)), float)


def embed(x: np.ndarray, method: str = "pca", *, seed: int = 0) -> np.ndarray:
    if method not in EMBEDDINGS:
        raise CcamergeError(f"unknown embedding {method!r}; choose one of {', '.join(EMBEDDINGS)}")
    return pca_2d(x) if method == "pca" else umap_2d(x, seed=seed)


def embed_units(profiles: np.ndarray, method: str = "pca", *, seed: int = 0) -> np.ndarray:
    """``[n, 2]`` coordinates of units from their profiles ``[n, S]``: the rows are standardised
    first, so units that fire on the same inputs land together whatever their scale."""
    return embed(standardise(profiles), method, seed=seed)


# ----------------------------------------------------------------------------- inputs
def nearest_centroid_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Two-fold accuracy (percent) of the nearest class centroid on ``features`` ``[B, d]``:
    centroids from the even-indexed inputs classify the odd ones and vice versa."""
    features, labels = np.asarray(features, float), np.asarray(labels)
    folds = np.arange(len(labels)) % 2
    correct = 0
    for fold in (0, 1):
        fit, test = folds != fold, folds == fold
        classes = np.unique(labels[fit])
        centroids = np.stack([features[fit][labels[fit] == c].mean(0) for c in classes])
        dist = ((features[test][:, None, :] - centroids[None]) ** 2).sum(-1)  # [B_test, K]
        correct += int((classes[dist.argmin(1)] == labels[test]).sum())
    return 100.0 * correct / len(labels)


@dataclass(frozen=True)
class InputEmbedding:
    """``coords`` ``[B, 2]`` of the inputs; ``separability`` (percent): nearest-centroid accuracy
    on the full standardised representation, ``separability_2d`` on the two coordinates."""

    coords: np.ndarray
    labels: np.ndarray
    separability: float
    separability_2d: float


def embed_inputs(features: np.ndarray, labels: np.ndarray, method: str = "pca", *,
                 seed: int = 0) -> InputEmbedding:
    """Embed inputs by their representation ``features`` ``[B, d]`` (columns standardised)."""
    z = standardise(np.asarray(features, float).T).T
    coords = embed(z, method, seed=seed)
    return InputEmbedding(coords, np.asarray(labels), nearest_centroid_accuracy(z, labels),
                          nearest_centroid_accuracy(coords, labels))
