import numpy as np
import pytest
import torch

from ccamerge.errors import CcamergeError
from ccamerge.layout import CANDIDATES, pinned
from ccamerge.models import build_model
from ccamerge.spec import build_spec
from ccamerge.stats import CrossMoments, MapBuffers, capture_features, collect_statistics


def _uneven_batches(n, sizes=(1, 7, 3, 50, 2)):
    start = 0
    while start < n:
        for size in sizes:
            yield slice(start, min(n, start + size))
            start += size
            if start >= n:
                return


def test_streaming_moments_match_numpy_cov_on_uneven_batches():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)) * [1, 2, 3, 4, 5] + 10.0
    y = x[:, ::-1] @ rng.normal(size=(5, 4)) + rng.normal(size=(300, 4))
    auto, cross = CrossMoments(5, 5), CrossMoments(5, 4)
    for s in _uneven_batches(len(x)):
        xb, yb = torch.tensor(x[s], dtype=torch.float64), torch.tensor(y[s], dtype=torch.float64)
        auto.update(xb)
        cross.update(xb, yb)
    joint = np.cov(np.hstack([x, y]).T)
    np.testing.assert_allclose(auto.covariance, joint[:5, :5], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(cross.covariance, joint[:5, 5:], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(cross.mean_y, y.mean(0), rtol=1e-12)


def test_shards_merge_exactly():
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.normal(size=(200, 3)))
    whole, a, b = CrossMoments(3, 3), CrossMoments(3, 3), CrossMoments(3, 3)
    whole.update(x)
    a.update(x[:37])
    b.update(x[37:])
    a.merge(b)
    assert a.count == 200
    np.testing.assert_allclose(a.covariance, whole.covariance, rtol=1e-12)
    np.testing.assert_allclose(a.mean_x, whole.mean_x, rtol=1e-12)


def test_collected_statistics_match_direct_computation(digits):
    torch.manual_seed(0)
    models = [build_model("vgg", width=0.5), build_model("vgg", width=0.5)]
    spec = build_spec(models[0])
    x = digits.x_train[:100]
    stats = collect_statistics(models, spec, x, batch_size=33)
    point = spec.points[0]
    feats = []
    for m in models:
        with capture_features(m, spec) as captured, torch.no_grad():
            m(x)
        feats.append(captured[point.name][0].double().numpy())  # [100*8*8, C]
    joint = np.cov(np.hstack(feats).T)
    n = point.width
    p = stats[point.name]
    assert p.count == 100 * 8 * 8
    np.testing.assert_allclose(p.cov(0, 0), joint[:n, :n], atol=1e-5)
    np.testing.assert_allclose(p.cov(0, 1), joint[:n, n:], atol=1e-5)
    np.testing.assert_allclose(p.cov(1, 0), joint[n:, :n], atol=1e-5)


def test_resnet_stream_pools_every_block_output(digits):
    model = build_model("resnet20", width=0.5)
    spec = build_spec(model)
    stats = collect_statistics([model, model], spec, digits.x_train[:10])
    stream1 = spec.point("stream1")
    assert len(stream1.features) == 4  # stem + three blocks write the first stream
    assert stats["stream1"].count == 4 * 10 * 8 * 8


def test_non_finite_activations_are_rejected(digits):
    model = build_model("mlp")
    with torch.no_grad():
        model.layers[1].weight[0, 0] = float("nan")
    with pytest.raises(CcamergeError, match="NaN"):
        collect_statistics([model, model], build_spec(model), digits.x_train[:20])


def test_missing_pair_is_a_clear_error(digits):
    models = [build_model("mlp") for _ in range(3)]
    stats = collect_statistics(models, build_spec(models[0]), digits.x_train[:20])
    with pytest.raises(CcamergeError, match="pairs='all'"):
        stats["fc1"].cov(1, 2)
    full = collect_statistics(models, build_spec(models[0]), digits.x_train[:20], pairs="all")
    assert full["fc1"].cov(1, 2).shape == (128, 128)


def _joint_feature_covs(models, spec, x) -> dict[str, np.ndarray]:
    """The oracle: ``{point: numpy.cov of every model's features side by side}``, read in the
    models' own layout."""
    feats = []
    for m in models:
        with capture_features(m, spec) as captured, torch.no_grad():
            m(x)
        feats.append({name: torch.cat(chunks).double().numpy()
                      for name, chunks in captured.items()})
    return {p.name: np.cov(np.hstack([f[p.name] for f in feats]).T) for p in spec.points}


@pytest.mark.parametrize("layout", ["standard", "channels_last"])
def test_every_point_and_pair_matches_numpy_and_models_are_untouched(digits, layout):
    """BatchNorm ResNet with stream points (several feature modules per point), uneven batches,
    either memory layout (standard: maps copied into reused buffers): all blocks of all pairs
    against numpy.cov of the features read in the models' own (standard) layout; the callers'
    models keep their layout."""
    torch.manual_seed(0)
    models = [build_model("resnet20", width=0.5).eval() for _ in range(3)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    spec = build_spec(models[0])
    x = digits.x_train[:40]
    with pinned(layout):
        stats = collect_statistics(models, spec, x, pairs="all", batch_size=17)
    assert stats.layout == layout
    covs = _joint_feature_covs(models, spec, x)
    for point in spec.points:
        n, joint = point.width, covs[point.name]
        for i in range(3):
            for j in range(3):
                np.testing.assert_allclose(stats[point.name].cov(i, j),
                                           joint[i * n:(i + 1) * n, j * n:(j + 1) * n], atol=1e-5)
    for m, state in zip(models, before, strict=True):
        for key, value in m.state_dict().items():
            assert value.is_contiguous(), key
            torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_large_offsets_keep_covariance_precision(digits):
    """Features with mean 100 and unit spread: float32 products stay accurate (one side centred)."""
    torch.manual_seed(0)
    model = build_model("mlp", hidden=[16, 16])
    with torch.no_grad():
        model.layers[1].bias += 100.0
    spec = build_spec(model)
    x = digits.x_train[:500]
    stats = collect_statistics([model, model], spec, x, batch_size=128)
    with capture_features(model, spec) as captured, torch.no_grad():
        model(x)
    point = spec.points[0]
    feats = captured[point.name][0].double().numpy()
    assert feats.mean() > 50
    np.testing.assert_allclose(stats[point.name].cov(0, 1), np.cov(feats.T), rtol=1e-4, atol=1e-4)


def test_accumulators_are_float64_on_the_samples_device_and_match_numpy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 6)) * 3.0 + 5.0
    moments = CrossMoments(6, 6, device="cpu")
    for s in _uneven_batches(len(x)):
        moments.update(torch.tensor(x[s], dtype=torch.float32))
    assert moments.comoment.dtype == torch.float64 and moments.mean_x.device.type == "cpu"
    assert isinstance(moments.covariance, np.ndarray)
    np.testing.assert_allclose(moments.covariance, np.cov(x.T), rtol=1e-5, atol=1e-5)
    assert CrossMoments(2, 3, device="meta").comoment.device.type == "meta"


def test_statistics_say_where_and_from_how_many_inputs_they_were_collected(digits):
    model = build_model("mlp", hidden=[16])
    stats = collect_statistics([model, model], build_spec(model), digits.x_train[:30])
    collection = stats.collection()
    assert collection.pop("layout") in CANDIDATES  # digits are 1x8x8 images
    assert collection == {"device": "cpu", "world_size": 1, "samples_per_rank": [30],
                          "samples": 30, "products": "float32",
                          "threads": torch.get_num_threads()}


def _fold(samples, blocks, batch=1000):
    """Moments of ``blocks`` of float32 samples ``[S, n]`` per model, through ``_add_chunk``."""
    from ccamerge.moments import _add_chunk, _Workspace

    n = samples[0].shape[1]
    acc = {("p", i, j): CrossMoments(n, n) for i, j in blocks}
    workspace = _Workspace()
    for start in range(0, len(samples[0]), batch):
        _add_chunk(acc, "p", [s[start:start + batch] for s in samples], blocks, workspace)
    return acc, workspace


def test_uncentred_products_match_float64_and_offset_models_are_centred():
    """ReLU features are multiplied as they are (no centring copy), also with units offset by
    ~3 standard deviations (mean^2 / var up to ~23, under the limit), within 3e-5 of std_i std_j;
    a model with units at mean 100 (std ~1) is centred, also in its cross blocks."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(24, 24, generator=g) / 5
    relu = torch.relu(torch.randn(20000, 24, generator=g) @ mix)
    shifted = torch.relu(torch.randn(20000, 24, generator=g) @ mix + 3.0)
    offset = relu @ torch.randn(24, 24, generator=g) * 0.05 + 100.0
    offset[:, :12] = relu[:, 12:] * 0.5  # half of its units ordinary, half offset
    blocks = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2)]
    acc, workspace = _fold([relu, shifted, offset], blocks)
    assert workspace.centre == {("p", 2)}
    joint = np.cov(np.hstack([relu.double().numpy(), shifted.double().numpy(),
                              offset.double().numpy()]).T)
    std = np.sqrt(np.diag(joint))
    ratio = shifted.double().mean(0) ** 2 / shifted.double().var(0)
    assert 10 < float(ratio.max()) < 32
    for i, j in blocks:
        got = acc[("p", i, j)].covariance
        rows, cols = slice(i * 24, (i + 1) * 24), slice(j * 24, (j + 1) * 24)
        error = np.abs(got - joint[rows, cols]) / np.outer(std[rows], std[cols])
        assert error.max() < 3e-5, (i, j, error.max())
    means = acc[("p", 0, 2)].mean_y.numpy()
    np.testing.assert_allclose(means, offset.double().mean(0).numpy(), rtol=1e-6)


def test_only_the_blocks_asked_for_are_collected(digits):
    models = [build_model("mlp", hidden=[8]) for _ in range(4)]
    stats = collect_statistics(models, build_spec(models[0]), digits.x_train[:50], reference=2)
    assert sorted(stats["fc1"].covs) == [(0, 0), (1, 1), (2, 0), (2, 1), (2, 2), (2, 3), (3, 3)]


def test_callers_models_keep_their_mode_hooks_and_tensors(digits):
    """The pass runs copies of the modules that share the callers' tensors: no memory for
    parameters, and the callers' modules keep train mode and carry no hooks afterwards."""
    torch.manual_seed(0)
    models = [build_model("vgg", width=0.5, batch_norm=True) for _ in range(2)]  # train mode
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    stats = collect_statistics(models, build_spec(models[0]), digits.x_train[:40])
    for model, state in zip(models, before, strict=True):
        assert all(m.training for m in model.modules())
        assert not any(m._forward_hooks for m in model.modules())
        for key, value in model.state_dict().items():  # eval mode: running stats untouched
            torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    with torch.no_grad():
        feats = [torch.cat(c).double().numpy() for m in models
                 for c in [_eval_features(m, digits.x_train[:40])]]
    n = stats["conv1"].width
    np.testing.assert_allclose(stats["conv1"].cov(0, 1), np.cov(np.hstack(feats).T)[:n, n:],
                               atol=1e-5)


def _eval_features(model, x):
    """conv1 features of ``model`` in eval mode (its mode restored)."""
    model.eval()
    try:
        with capture_features(model, build_spec(model)) as captured:
            model(x)
        return captured["conv1"]
    finally:
        model.train()


def test_products_of_shifted_samples_fold_into_the_exact_moments():
    """add_products with any shift (none, a rough mean, a far-off value) in uneven batches
    equals numpy.cov in float64."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 4)) * [1, 2, 3, 4] + 7.0
    y = x @ rng.normal(size=(4, 3)) + rng.normal(size=(300, 3))
    moments = CrossMoments(4, 3)
    shifts = [None, torch.full((4,), 6.5, dtype=torch.float64), torch.full((4,), -20.0,
                                                                        dtype=torch.float64)]
    for k, s in enumerate(_uneven_batches(len(x))):
        sx = shifts[k % 3]
        a = torch.tensor(x[s]) - (0.0 if sx is None else sx)
        b = torch.tensor(y[s])
        moments.add_products(len(a), a.sum(0), b.sum(0), a.T @ b, sx, None)
    np.testing.assert_allclose(moments.covariance, np.cov(np.hstack([x, y]).T)[:4, 4:],
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(moments.mean_x.numpy(), x.mean(0), rtol=1e-12)


@pytest.mark.parametrize("columns", [3, 255, 256, 300, 511, 512, 777])
def test_a_models_product_with_itself_is_its_exact_symmetric_gram(columns):
    """The self block multiplies the upper triangle's row blocks from 256 columns: the same
    numbers as a float64 ``a^T a`` to float32 rounding, and exactly symmetric."""
    from ccamerge.moments import gram

    a = torch.randn(600, columns, generator=torch.Generator().manual_seed(columns)) + 0.5
    got = gram(a)
    want = a.double().T @ a.double()
    assert got.dtype == torch.float32 and torch.equal(got, got.T)
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=2e-5,
                               atol=2e-5 * float(want.abs().max()))


def test_map_buffers_copy_standard_maps_to_channels_last_in_memory_kept_per_key():
    buffers = MapBuffers()
    out = torch.randn(3, 5, 4, 2)
    first = buffers.channels_last(("p", 0, 0), out)
    assert first.is_contiguous(memory_format=torch.channels_last) and torch.equal(first, out)
    again = buffers.channels_last(("p", 0, 0), out[:2] * 2)  # a smaller batch: the same memory
    assert again.data_ptr() == first.data_ptr() and torch.equal(again, out[:2] * 2)
    other = buffers.channels_last(("p", 0, 1), out)  # a second call in one forward: its own
    assert other.data_ptr() != first.data_ptr()
    already = out.contiguous(memory_format=torch.channels_last)
    assert buffers.channels_last(("q", 0, 0), already) is already
    flat = torch.randn(3, 5)
    assert buffers.channels_last(("r", 0, 0), flat) is flat


def test_standard_maps_of_many_positions_fold_in_place_like_their_samples():
    """Standard-layout maps of 32x32 positions fold image by image (ChannelMaps, no copy): the
    moments of every block, with a model offset enough to be centred and 300 units (the
    triangle's row blocks), match numpy.cov of the samples ``[B*H*W, n]`` and the fold of those
    samples as one matrix."""
    from ccamerge.moments import ChannelMaps, _add_chunk, _Workspace

    g = torch.Generator().manual_seed(0)
    maps = [torch.relu(torch.randn(6, 300, 32, 32, generator=g)) for _ in range(3)]
    maps[2][:, :150] += 50.0  # offset units: this model is centred
    blocks = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2)]
    samples = [m.permute(0, 2, 3, 1).reshape(-1, 300) for m in maps]  # [B*H*W, n]
    folds = {}
    for kind in ("maps", "samples"):
        acc = {("p", i, j): CrossMoments(300, 300) for i, j in blocks}
        workspace = _Workspace()
        for start in range(0, 6, 3):  # two batches of three images
            chunk = ([ChannelMaps(m[start:start + 3].flatten(2)) for m in maps] if kind == "maps"
                     else [s[start * 1024:(start + 3) * 1024] for s in samples])
            _add_chunk(acc, "p", chunk, blocks, workspace)
        assert workspace.centre == {("p", 2)}, kind
        folds[kind] = acc
    joint = np.cov(torch.cat(samples, 1).double().numpy().T)
    std = np.sqrt(np.diag(joint))
    for i, j in blocks:
        rows, cols = slice(i * 300, (i + 1) * 300), slice(j * 300, (j + 1) * 300)
        got = folds["maps"][("p", i, j)].covariance
        assert (np.abs(got - joint[rows, cols]) / np.outer(std[rows], std[cols])).max() < 3e-5
        np.testing.assert_allclose(got, folds["samples"][("p", i, j)].covariance, rtol=0,
                                   atol=2e-5 * float(np.abs(got).max()))
    from ccamerge.moments import gram

    own = gram(ChannelMaps(maps[1].flatten(2)))  # the self block: exactly symmetric
    assert torch.equal(own, own.T)


def test_map_buffers_read_wide_standard_maps_in_place_and_copy_the_rest():
    from ccamerge.moments import MAP_MIN_POSITIONS, ChannelMaps

    buffers = MapBuffers()
    wide = torch.randn(2, 3, 32, 32)
    assert 32 * 32 >= MAP_MIN_POSITIONS
    read = buffers.samples(("p", 0, 0), wide)
    assert isinstance(read, ChannelMaps) and read.maps.data_ptr() == wide.data_ptr()
    assert read.shape == (2 * 32 * 32, 3)
    small = torch.randn(2, 3, 8, 8)
    copied = buffers.samples(("q", 0, 0), small)
    assert torch.equal(copied, small.permute(0, 2, 3, 1).reshape(-1, 3))
    already = wide.contiguous(memory_format=torch.channels_last)
    assert torch.equal(buffers.samples(("r", 0, 0), already), already.permute(0, 2, 3, 1)
                       .reshape(-1, 3))


def _spied_products(monkeypatch, onednn: bool) -> list[str]:
    """The type names of the first samples of every cross product the pass multiplies from
    now on, and "oneDNN [S, n]" for each product of samples ``[S, n]`` oneDNN multiplies;
    without ``onednn``, the pass runs as where oneDNN is missing."""
    from ccamerge import moments

    read = []
    if onednn:  # every product of samples [S, n] too, however small
        monkeypatch.setattr(moments, "TN_MIN_MACS", 0)
        monkeypatch.setattr(moments, "TN_MIN_ROWS_PER_UNIT", 0)
    checked = {"nt": moments.onednn_nt(), "tn": moments.onednn_tn()} if onednn else {}
    if checked.get("tn"):
        tn = checked["tn"]
        checked["tn"] = lambda a, b: read.append("oneDNN [S, n]") or tn(a, b)
    monkeypatch.setattr(moments, "_ONEDNN", {"nt": None, "tn": None} | checked)
    product = moments.product
    monkeypatch.setattr(moments, "product",
                        lambda a, b: read.append(type(a).__name__) or product(a, b))
    return read


def _two_vggs(cfg: list, size: int) -> tuple:
    """Two random eval VGGs of ``cfg`` on 3 x size x size images, their spec and 10 images."""
    torch.manual_seed(0)
    models = [build_model("vgg", cfg=cfg, image_shape=[3, size, size]).eval() for _ in range(2)]
    x = torch.randn(10, 3, size, size, generator=torch.Generator().manual_seed(1))
    return models, build_spec(models[0]), x


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("positions", [None, 0.25])
def test_a_32px_vgg_pass_matches_numpy_in_both_layouts(positions, onednn, monkeypatch):
    """VGG on 3x32x32 images: its first maps (32x32; in the standard layout unit rows with
    oneDNN, else read in place) and the rest give the same moments in either layout, and, with
    every position, numpy.cov's."""
    from ccamerge import moments

    read = _spied_products(monkeypatch, onednn)
    whole = "UnitRows" if moments.onednn_nt() is not None else "ChannelMaps"
    models, spec, x = _two_vggs([8, "M", 16], 32)
    got = {}
    for layout in ("standard", "channels_last"):
        with pinned(layout):
            got[layout] = collect_statistics(models, spec, x, batch_size=4, positions=positions)
        assert (whole in read) == (layout == "standard" and positions is None)
        read.clear()
    covs = _joint_feature_covs(models, spec, x)
    for point in spec.points:
        n, joint = point.width, covs[point.name]
        for i, j in [(0, 0), (1, 1), (0, 1)]:
            standard = got["standard"][point.name].cov(i, j)
            np.testing.assert_allclose(standard, got["channels_last"][point.name].cov(i, j),
                                       atol=1e-5)
            if positions is None:
                np.testing.assert_allclose(standard, joint[i * n:(i + 1) * n,
                                                           j * n:(j + 1) * n], atol=1e-5)


@pytest.mark.parametrize("size", [8, 32])
@pytest.mark.parametrize("layout", ["standard", "channels_last"])
def test_a_capture_that_a_later_in_place_op_changes_is_copied_before_it(size, layout):
    """A BatchNorm read by a point and followed by ReLU(inplace=True): its outputs, read without
    a copy (channels-last views, 32x32 standard maps in place), would be the ReLU's by the fold;
    the pass sees the overwrite, runs the batch again copying them, and matches numpy.cov of the
    BatchNorm's outputs (negative values and all)."""
    from ccamerge.stats import output_spec

    torch.manual_seed(0)
    models = []
    for _ in range(2):
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6),
                                    torch.nn.ReLU(inplace=True)).eval()
        with torch.no_grad():
            model[1].running_mean.normal_()
        models.append(model)
    spec = output_spec({"1": [6, 6]})
    x = torch.randn(12, 3, size, size, generator=torch.Generator().manual_seed(1))
    with pinned(layout):
        stats = collect_statistics(models, spec, x, batch_size=5)
    with torch.no_grad():
        feats = [m[:2](x).permute(0, 2, 3, 1).reshape(-1, 6).double().numpy() for m in models]
    assert min(f.min() for f in feats) < 0
    joint = np.cov(np.hstack(feats).T)
    for i, j in [(0, 0), (1, 1), (0, 1)]:
        block = joint[i * 6:(i + 1) * 6, j * 6:(j + 1) * 6]
        np.testing.assert_allclose(stats["1"].cov(i, j), block, atol=1e-5)


@pytest.mark.parametrize("layout", ["standard", "channels_last"])
def test_captured_features_keep_the_values_a_later_in_place_op_overwrites(layout):
    """``batch_features`` at a BatchNorm followed by ReLU(inplace=True) (its samples would be
    views of the output in channels-last and of a [B, C] output) returns the BatchNorm's own
    outputs, negative values and all, for maps and vectors alike."""
    from ccamerge.stats import batch_features, output_spec

    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                               torch.nn.ReLU(inplace=True)).eval()
    dense = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4),
                                torch.nn.ReLU(inplace=True)).eval()
    x = torch.randn(3, 3, 6, 6)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        maps = conv[:2](x).permute(0, 2, 3, 1).reshape(-1, 4)
        vectors = dense[:2](x[:, 0, 0, :5])
    for model, inputs, expected in [(conv, x, maps), (dense, x[:, 0, 0, :5], vectors)]:
        got = batch_features(model, output_spec({"1": [4]}), inputs)["1"]
        assert expected.min() < 0
        torch.testing.assert_close(got, expected)


def test_map_buffers_copy_standard_maps_to_unit_rows_in_memory_kept_per_key():
    """With unit rows (float32 products, oneDNN there), every standard-layout map, of few
    positions or many, becomes a copy ``[C, B*H*W]`` in the same memory from batch to batch;
    channels-last maps stay views ``[S, C]`` and without unit rows wide maps are read in place."""
    from ccamerge.moments import MAP_MIN_POSITIONS, ChannelMaps, UnitRows

    buffers = MapBuffers(unit_rows=True)
    assert 32 * 32 >= MAP_MIN_POSITIONS
    for size in (2, 32):
        out = torch.randn(3, 5, size, size)
        want = out.permute(1, 0, 2, 3).reshape(5, -1)
        read = buffers.samples(("p", size, 0), out)
        assert isinstance(read, UnitRows) and read.shape == (3 * size * size, 5)
        assert torch.equal(read.rows, want)
        again = buffers.samples(("p", size, 0), out[:2] * 2)
        assert again.rows.data_ptr() == read.rows.data_ptr()
        assert torch.equal(again.rows, want[:, :2 * size * size] * 2)
    last = torch.randn(2, 5, 4, 4).contiguous(memory_format=torch.channels_last)
    view = buffers.samples(("q", 0, 0), last)
    assert torch.equal(view, last.permute(0, 2, 3, 1).reshape(-1, 5))
    assert view.data_ptr() == last.data_ptr()
    assert isinstance(MapBuffers().samples(("r", 0, 0), torch.randn(2, 5, 32, 32)), ChannelMaps)


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("layout", ["standard", "channels_last"])
def test_a_pass_over_wide_maps_matches_numpy_with_or_without_onednn(onednn, layout, monkeypatch):
    """A VGG whose maps have 64 and 96 channels, in either layout (standard: unit rows where
    oneDNN is there; else samples ``[S, n]``): numpy.cov of its features, every block."""
    from ccamerge import moments

    read = _spied_products(monkeypatch, onednn)
    models, spec, x = _two_vggs([64, "M", 96], 16)
    with pinned(layout):
        stats = collect_statistics(models, spec, x, batch_size=4)
    used = onednn and layout == "standard" and moments.onednn_nt() is not None
    assert ("UnitRows" in read) == used
    samples = onednn and layout == "channels_last" and moments.onednn_tn() is not None
    assert ("oneDNN [S, n]" in read) == samples
    covs = _joint_feature_covs(models, spec, x)
    for point in spec.points:
        n, joint = point.width, covs[point.name]
        for i, j in [(0, 0), (1, 1), (0, 1)]:
            np.testing.assert_allclose(stats[point.name].cov(i, j),
                                       joint[i * n:(i + 1) * n, j * n:(j + 1) * n], atol=1e-5)
