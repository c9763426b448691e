"""bfloat16 products of the statistics pass (ccamerge.moments, products="bfloat16")."""

import numpy as np
import pytest
import torch

from ccamerge import moments
from ccamerge.errors import CcamergeError
from ccamerge.moments import ChannelMaps, _add_chunk, _Workspace, low_gram, low_product
from ccamerge.spec import build_spec
from ccamerge.stats import CrossMoments, collect_statistics


def _fold(samples, blocks, products, batch):
    """Moments of ``blocks`` of samples ``[S, n]`` per model (or ChannelMaps ``[B, n, P]``
    batches given as lists), folded ``batch`` rows (or images) at a time."""
    n = samples[0].shape[1]
    acc = {("p", i, j): CrossMoments(n, n) for i, j in blocks}
    workspace = _Workspace(products)
    for start in range(0, len(samples[0]), batch):
        chunk = [s[start:start + batch] for s in samples]
        if samples[0].dim() == 3:
            chunk = [ChannelMaps(c) for c in chunk]
        _add_chunk(acc, "p", chunk, blocks, workspace)
    return acc


def _relu_models(rows, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n ** 0.5
    plain = torch.relu(torch.randn(rows, n, generator=g) @ mix)
    partner = torch.relu(plain @ mix + 0.3 * torch.randn(rows, n, generator=g))
    offset = partner * 0.05 + 100.0  # units 100 standard deviations from zero
    return [plain, partner, offset]


def test_integer_samples_multiply_exactly_in_every_chunking(monkeypatch):
    """Samples in {-1, 0, 1} are exact in bfloat16, and so is each chunk's product (integers
    up to 256, chunks of at most 256 rows): the chunked product (rows not a multiple of the
    chunk, few chunks held at once) is the exact integer product."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-1, 2, (10_000, 40), generator=g).to(torch.bfloat16)
    b = torch.randint(-1, 2, (10_000, 24), generator=g).to(torch.bfloat16)
    exact = a.double().numpy().T @ b.double().numpy()
    for rows, held in [(256, 1 << 24), (100, 40 * 24 * 3), (33, 1)]:
        monkeypatch.setattr(moments, "PRODUCT_ROWS", rows)
        monkeypatch.setattr(moments, "PRODUCT_CHUNK_ELEMENTS", held)
        got = low_product(a, b)
        assert got.dtype == torch.float32
        np.testing.assert_array_equal(got.double().numpy(), exact)
    maps = torch.randint(-1, 2, (7, 40, 33), generator=g).to(torch.bfloat16)  # [B, n, P]
    samples = maps.transpose(1, 2).reshape(-1, 40)
    np.testing.assert_array_equal(low_product(ChannelMaps(maps), ChannelMaps(maps)).numpy(),
                                  (samples.double().T @ samples.double()).numpy())


@pytest.mark.parametrize("columns", [300, 2048])
def test_bfloat16_self_products_are_exactly_symmetric(columns, monkeypatch):
    monkeypatch.setattr(moments, "LOW_GRAM_MIN_COLUMNS", 2048)
    a = torch.relu(torch.randn(5000, columns)).to(torch.bfloat16)
    own = low_gram(a)
    assert torch.equal(own, own.T)
    reference = (a.double().T @ a.double())
    # each chunk's product is rounded once to bfloat16 (relative 2^-8 at most)
    assert float((own.double() - reference).abs().max() / reference.abs().max()) < 2 ** -8


@pytest.mark.parametrize("layout", ["rows", "maps"])
def test_bfloat16_moments_match_float64_within_the_sampling_spread(layout):
    """Three models (one 100 standard deviations from zero), rows or standard-layout maps: the
    bfloat16 covariances are within 2e-3 of std_i std_j of numpy's float64 ones, 20x below
    the difference between the two halves of the data; the means within 1e-5 of a std."""
    models = _relu_models(48_000, 64)
    blocks = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2)]
    if layout == "maps":  # [B, n, P] with P = 1200 positions
        maps = [m.reshape(40, 1200, 64).transpose(1, 2).contiguous() for m in models]
        acc = _fold(maps, blocks, "bfloat16", batch=10)
    else:
        acc = _fold(models, blocks, "bfloat16", batch=12_000)
    joint = np.cov(torch.cat(models, 1).double().numpy().T)
    halves = [np.cov(torch.cat(models, 1)[part].double().numpy().T)
              for part in (slice(0, 24_000), slice(24_000, None))]
    std = np.sqrt(np.diag(joint))
    for i, j in blocks:
        rows, cols = slice(i * 64, (i + 1) * 64), slice(j * 64, (j + 1) * 64)
        scale = np.outer(std[rows], std[cols])
        error = np.abs(acc[("p", i, j)].covariance - joint[rows, cols]) / scale
        spread = np.abs(halves[0][rows, cols] - halves[1][rows, cols]) / scale
        assert error.max() < 2 ** -8, (i, j, error.max())  # one rounding of a chunk, at most
        assert error.mean() < spread.mean() / 20, (i, j, error.mean(), spread.mean())
    for i in range(3):
        mean = acc[("p", i, i)].mean_x.numpy()
        exact = models[i].double().mean(0).numpy()
        assert np.abs(mean - exact).max() < 1e-5 * std[i * 64:(i + 1) * 64].min()


def test_a_vgg_pass_in_bfloat16_is_close_to_float32_and_says_so(digits):
    from ccamerge.models import build_model

    models = [build_model("vgg", cfg=[16, "M", 32], image_shape=[1, 8, 8]) for _ in range(2)]
    for seed, model in enumerate(models):
        torch.manual_seed(seed)
        model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    spec = build_spec(models[0])
    exact = collect_statistics(models, spec, digits.x_train[:400], batch_size=100)
    low = collect_statistics(models, spec, digits.x_train[:400], batch_size=100,
                             products="bfloat16")
    assert low.products == "bfloat16" and low.collection()["products"] == "bfloat16"
    assert exact.products == "float32"
    for name, point in exact.points.items():
        for (i, j), cov in point.covs.items():
            scale = np.outer(point.std(i), point.std(j)) + 1e-12
            error = np.abs(low[name].cov(i, j) - cov) / scale
            assert error.max() < 1e-2, (name, i, j, error.max())
        np.testing.assert_allclose(low[name].mean[0], point.mean[0], rtol=1e-4, atol=1e-6)


def test_an_unknown_precision_is_one_clear_error(digits):
    from ccamerge.models import build_model

    model = build_model("mlp", hidden=[8])
    with pytest.raises(CcamergeError, match="products must be one of float32, bfloat16"):
        collect_statistics([model, model], build_spec(model), digits.x_train[:20],
                           products="float16")


needs_onednn = pytest.mark.skipif(moments.onednn_nt() is None,
                                  reason="oneDNN float32 matmul missing, or slower here")


@needs_onednn
@pytest.mark.parametrize("shape", [(64, 300), (300, 5000)])
def test_onednn_products_match_float64(shape):
    n, count = shape
    g = torch.Generator().manual_seed(n)
    x, y = torch.relu(torch.randn(2 * n, count, generator=g)).split(n)
    _assert_float32_of(moments.nt_product(x, y), x.double() @ y.double().T)


def _assert_float32_of(got: torch.Tensor, want: torch.Tensor) -> None:
    """``got`` is a float32 product of ``want``'s shape, within float32 rounding of the float64
    ``want``."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=0,
                               atol=2e-6 * float(want.abs().max()))


@needs_onednn
@pytest.mark.parametrize("form", ["nt", "tn"])
def test_a_onednn_product_is_kept_only_where_it_is_not_slower_than_torch_mm(form, monkeypatch):
    """Both checks (unit rows ``x @ y^T``, samples ``a^T b``) keep oneDNN only where their
    timing finds it at least as fast as ``torch.mm``."""
    if form == "tn" and moments.onednn_tn() is None:
        pytest.skip("oneDNN weight-gradient product missing, or slower here")
    timed = []
    monkeypatch.setattr(moments, "_best_time", lambda call, tries=3: timed.pop(0))
    timed[:] = [1.5, 1.0]  # oneDNN's time, then torch.mm's
    assert moments._CHECKS[form]() is None
    timed[:] = [1.0, 1.0]
    fast = moments._CHECKS[form]()
    x = torch.rand(300, 40)
    assert fast is not None and torch.allclose(fast(x, x), x.T @ x if form == "tn" else x @ x.T)


def test_without_onednn_products_are_torch_mm(monkeypatch):
    """Where the oneDNN matmul is missing (or for other dtypes, strides, devices) the product
    is ``torch.mm`` itself."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 70, generator=g), torch.randn(6, 70, generator=g)
    assert torch.equal(moments.nt_product(x.double(), y.double()), x.double() @ y.double().T)
    strided = torch.randn(70, 10, generator=g).T
    assert torch.equal(moments.nt_product(strided, y), torch.mm(strided, y.T))
    monkeypatch.setattr(moments, "_ONEDNN", {"nt": None, "tn": None})
    assert torch.equal(moments.nt_product(x, y), torch.mm(x, y.T))


needs_onednn_tn = pytest.mark.skipif(
    moments.onednn_tn() is None, reason="oneDNN weight-gradient product missing, or slower here")


@needs_onednn_tn
@pytest.mark.parametrize("rows", [100, 512, 1000, 5000])
def test_onednn_sample_products_match_float64(rows):
    """``a^T b`` of samples ``[S, n]`` through oneDNN's weight gradient: fewer rows than one
    view (torch.mm alone), a whole number of views, and views plus the rows left over."""
    g = torch.Generator().manual_seed(rows)
    a, b = torch.relu(torch.randn(rows, 300, generator=g)).split((120, 180), dim=1)
    a, b = a.contiguous(), b.contiguous()
    _assert_float32_of(moments._weight_gradient_product(a, b), a.double().T @ b.double())


def test_onednn_sample_products_of_row_slices_read_their_own_rows():
    """Contiguous samples that start inside a larger buffer (a storage offset, as the pass's
    reused buffers hand out): the maps' view starts at the slice, not at the buffer."""
    g = torch.Generator().manual_seed(3)
    buffer = torch.relu(torch.randn(1337, 64, generator=g))
    a, b = buffer[37:37 + 700], buffer[600:1300]
    assert a.is_contiguous() and a.storage_offset() == 37 * 64
    _assert_float32_of(moments._weight_gradient_product(a, b), a.double().T @ b.double())


@needs_onednn_tn
def test_only_large_sample_products_go_through_onednn(monkeypatch):
    """oneDNN multiplies samples ``[S, n]`` from :data:`TN_MIN_MACS` multiply-adds and
    :data:`TN_MIN_ROWS_PER_UNIT` rows per unit; smaller products stay ``torch.mm``, bit for bit."""
    used = []
    fast = moments.onednn_tn()
    monkeypatch.setitem(moments._ONEDNN, "tn", lambda a, b: used.append(a.shape) or fast(a, b))
    g = torch.Generator().manual_seed(0)
    large = torch.randn(8192, 64, generator=g)  # 33.5M multiply-adds, 128 rows per unit
    assert large.shape[0] * 64 * 64 >= moments.TN_MIN_MACS
    moments.tn_product(large, large)
    assert used == [large.shape]
    for small in (torch.randn(4000, 64, generator=g), torch.randn(1000, 1024, generator=g)):
        assert torch.equal(moments.tn_product(small, small), small.T @ small)
    assert used == [large.shape]


def test_sample_products_fall_back_to_torch_mm(monkeypatch):
    """Other dtypes and strided samples, or no oneDNN: ``torch.mm`` itself, bit for bit."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(600, 10, generator=g), torch.randn(600, 7, generator=g)
    assert torch.equal(moments.tn_product(a.double(), b.double()), a.double().T @ b.double())
    strided = torch.randn(10, 600, generator=g).T
    assert torch.equal(moments.tn_product(strided, b), strided.T @ b)
    monkeypatch.setattr(moments, "_ONEDNN", {"nt": None, "tn": None})
    assert torch.equal(moments.tn_product(a, b), a.T @ b)


@pytest.mark.parametrize("onednn", [True, False])
def test_a_wide_self_product_of_samples_is_whole_only_with_onednn(onednn, monkeypatch):
    """A self product of 300 columns: oneDNN multiplies contiguous samples whole (its column
    slices would be copied); ``torch.mm`` multiplies the triangle's row blocks. Both equal
    the float64 product."""
    if not onednn:
        monkeypatch.setattr(moments, "_ONEDNN", {"nt": None, "tn": None})
    calls = []
    multiply = lambda a, b: calls.append(b.shape[1]) or moments.product(a, b)  # noqa: E731
    a = torch.relu(torch.randn(700, 300, generator=torch.Generator().manual_seed(3)))
    assert 700 * 300 * 300 >= moments.TN_MIN_MACS and 700 >= 2 * 300  # large enough
    got = moments.gram(a, multiply)
    whole = onednn and moments.onednn_tn() is not None
    assert calls == ([300] if whole else [300, 150])
    _assert_float32_of(got, a.double().T @ a.double())


@pytest.mark.parametrize("onednn", [True, False])
def test_unit_rows_fold_like_their_samples_in_every_mix(onednn, monkeypatch):
    """Samples held as unit rows ``[n, S]`` (300 units: the triangle's row blocks; a model
    offset enough to be centred) fold into the moments numpy.cov gives their samples, also
    beside a model whose samples are a matrix ``[S, n]`` or maps read in place; self blocks
    exactly symmetric."""
    from ccamerge.moments import UnitRows, gram

    if onednn:  # every product of samples [S, n] too, however small
        monkeypatch.setattr(moments, "TN_MIN_MACS", 0)
        monkeypatch.setattr(moments, "TN_MIN_ROWS_PER_UNIT", 0)
    else:
        monkeypatch.setattr(moments, "_ONEDNN", {"nt": None, "tn": None})
    g = torch.Generator().manual_seed(0)
    maps = [torch.relu(torch.randn(6, 300, 4, 4, generator=g)) for _ in range(4)]
    maps[2][:, :150] += 50.0
    samples = [m.permute(0, 2, 3, 1).reshape(-1, 300) for m in maps]  # [B*H*W, n]
    blocks = [(0, 0), (1, 1), (2, 2), (3, 3), (0, 1), (0, 2), (0, 3), (1, 3)]
    acc = {("p", i, j): CrossMoments(300, 300) for i, j in blocks}
    workspace = _Workspace()
    for start in range(0, 6, 3):
        images = slice(start, start + 3)
        rows = [UnitRows(m[images].transpose(0, 1).reshape(300, -1)) for m in maps[:3]]
        chunk = [rows[0], rows[1], rows[2] if start else samples[2][start * 16:(start + 3) * 16],
                 ChannelMaps(maps[3][images].flatten(2))]
        _add_chunk(acc, "p", chunk, blocks, workspace)
    assert workspace.centre == {("p", 2)}
    joint = np.cov(torch.cat(samples, 1).double().numpy().T)
    std = np.sqrt(np.diag(joint))
    for i, j in blocks:
        got = acc[("p", i, j)].covariance
        part = (slice(i * 300, (i + 1) * 300), slice(j * 300, (j + 1) * 300))
        assert (np.abs(got - joint[part]) / np.outer(std[part[0]], std[part[1]])).max() < 3e-5
    own = gram(UnitRows(maps[1].transpose(0, 1).reshape(300, -1)))
    assert torch.equal(own, own.T)
