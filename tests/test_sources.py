"""Data sources: batches, subsets and samples of tensors and streams, re-batching, validation."""

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ccamerge.data import Dataset, StreamSource, Subset, TensorSource, as_source
from ccamerge.errors import CcamergeError


def _tensors(n=23, shape=(3, 2, 5), classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.arange(n) % classes


def _stack(source, batch_size, **order):
    batches = list(source.batches(batch_size, **order))
    return (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]),
            [len(x) for x, _ in batches])


def test_tensor_source_batches_in_order_and_shuffled():
    x, y = _tensors()
    source = TensorSource(x, y, num_classes=4)
    xs, ys, sizes = _stack(source, 10)
    assert sizes == [10, 10, 3] and torch.equal(xs, x) and torch.equal(ys, y)
    assert source.sample_shape == (3, 2, 5) and len(source) == 23
    xs, ys, _ = _stack(source, 10, shuffle=True, seed=3)
    order = torch.randperm(23, generator=torch.Generator().manual_seed(3))
    assert torch.equal(xs, x[order]) and torch.equal(ys, y[order])
    generator = torch.Generator().manual_seed(3)
    first, second = (_stack(source, 10, shuffle=True, generator=generator)[1] for _ in range(2))
    assert torch.equal(first, ys) and not torch.equal(first, second)  # a new order per epoch


def test_subset_and_take_hold_indices_and_match_indexing():
    x, y = _tensors()
    source = TensorSource(x, y)
    sub = source.subset([5, 1, 7, 7])
    assert isinstance(sub, Subset) and torch.equal(sub.inputs(), x[[5, 1, 7, 7]])
    assert torch.equal(sub.subset([2, 0]).inputs(), x[[7, 5]])  # indices compose
    sample = source.take(9, seed=4)
    order = torch.randperm(23, generator=torch.Generator().manual_seed(4))[:9]
    assert torch.equal(sample.inputs(), x[order]) and torch.equal(sample.labels(), y[order])
    assert source.take(None) is source and source.take(100) is source
    assert torch.equal(source.head(4), x[:4])
    with pytest.raises(CcamergeError, match="at least 2"):
        source.take(1)
    with pytest.raises(CcamergeError, match="0..22"):
        source.subset([23])


def test_loader_stream_is_rebatched_to_the_requested_size():
    x, y = _tensors(n=50)
    loader = DataLoader(TensorDataset(x, y), batch_size=7)
    source = as_source(loader)
    assert isinstance(source, StreamSource) and not source.random_access
    assert source.size_hint() == 50 and source.sample_shape == (3, 2, 5)
    xs, ys, sizes = _stack(source, 16)
    assert sizes == [16, 16, 16, 2] and torch.equal(xs, x) and torch.equal(ys, y)
    ragged = [(x[:3], y[:3]), (x[3:40], y[3:40]), (x[40:], y[40:])]
    xs, _, sizes = _stack(as_source(ragged), 16)
    assert sizes == [16, 16, 16, 2] and torch.equal(xs, x)
    with pytest.raises(CcamergeError, match="cannot be shuffled"):
        next(source.batches(16, shuffle=True))


def test_stream_subset_filters_positions_in_stream_order():
    x, y = _tensors(n=50)
    source = as_source(lambda: iter([(x[i:i + 9], y[i:i + 9]) for i in range(0, 50, 9)]))
    assert len(source) == 50 and source.size_hint() == 50  # learnt from the counting pass
    sub = source.subset([40, 3, 11, 3])
    assert len(sub) == 3 and torch.equal(sub.inputs(), x[[3, 11, 40]])
    assert torch.equal(sub.subset([2]).inputs(), x[[40]])
    sample = source.take(12, seed=1)
    chosen = np.sort(torch.randperm(50, generator=torch.Generator().manual_seed(1))[:12].numpy())
    assert torch.equal(sample.inputs(), x[chosen]) and torch.equal(sample.labels(), y[chosen])


def test_bare_input_batches_and_pairs():
    x, y = _tensors(n=12)
    xs, ys = next(as_source([x[:5], x[5:]]).batches(12))
    assert torch.equal(xs, x) and ys is None
    pair = as_source((x.numpy(), y.numpy()))
    assert isinstance(pair, TensorSource) and torch.equal(pair.labels(), y)
    assert torch.equal(as_source([x[:2].to(torch.uint8)]).head(2), x[:2].to(torch.uint8).float())


@pytest.mark.parametrize("batches, message", [
    ([(torch.zeros(4, 3), torch.zeros(4)), (torch.zeros(4, 5), torch.zeros(4))],
     "batch 1 holds samples of shape \\[5\\] but earlier ones \\[3\\]"),
    ([(torch.zeros(4, 3), torch.tensor([0, 1, 2, 9]))], "label 9 is out of range for 4 classes"),
    ([(torch.zeros(4, 3), torch.tensor([0, 1, -1, 2]))], "label -1 is negative"),
    ([(torch.zeros(4, 3), torch.tensor([0.5, 1, 1, 2]))], "labels must be integers"),
    ([(torch.zeros(4, 3), torch.zeros(3))], "\\[3\\] labels for 4 inputs"),
    ([(torch.full((4, 3), float("nan")), torch.zeros(4))], "NaN or infinite"),
    ([("text", torch.zeros(4))], "inputs are a str"),
    ([(torch.zeros(4), torch.zeros(4))], "inputs have shape \\[4\\]"),
    ([(torch.zeros(4, 3), torch.zeros(4), torch.zeros(4))], "has 3 parts"),
    ([(torch.zeros(4, 3), torch.zeros(4)), torch.zeros(4, 3)], "batch 1 lacks labels"),
])
def test_stream_validation(batches, message):
    source = as_source(batches, num_classes=4)
    with pytest.raises(CcamergeError, match=message):
        list(source.batches(2))


def test_what_cannot_be_a_source():
    with pytest.raises(CcamergeError, match="one-shot iterator"):
        as_source(iter([torch.zeros(2, 3)]))
    with pytest.raises(CcamergeError, match="cannot read data from a int"):
        as_source(5)
    with pytest.raises(CcamergeError, match="pass data.train or data.test"):
        as_source(Dataset("d", x_train=torch.zeros(4, 2), y_train=torch.tensor([0, 1, 0, 1]),
                          x_test=torch.zeros(2, 2), y_test=torch.tensor([0, 1])))
    with pytest.raises(CcamergeError, match="yielded no batches"):
        as_source([]).sample_shape  # noqa: B018


def test_dataset_from_loaders_and_old_tensor_fields():
    x, y = _tensors(n=40)
    data = Dataset("loaders", train=DataLoader(TensorDataset(x, y), batch_size=8),
                   test=DataLoader(TensorDataset(x[:10], y[:10]), batch_size=8))
    assert data.num_classes == 4 and data.train.num_classes == 4
    assert data.input_shape == (3, 2, 5) and data.in_channels == 3 and data.image_size is None
    assert torch.equal(data.x_train, x) and torch.equal(data.y_test, y[:10])
    assert data.describe()["image_shape"] == [3, 2, 5] and data.describe()["train_size"] == 40
    memory = Dataset("m", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10], num_classes=4)
    assert memory.x_train is x  # in-memory data is never copied
    swapped = dataclasses.replace(memory, x_test=x[10:20] * 0, y_test=y[10:20])
    assert torch.equal(swapped.x_test, x[10:20] * 0) and swapped.train is memory.train
    with pytest.raises(CcamergeError, match="training samples are \\[3, 2, 5\\] but test"):
        Dataset("bad", x_train=x, y_train=y, x_test=x[:4, 0], y_test=y[:4])
    labels_out_of_range = [(x[:4], torch.tensor([0, 1, 2, 7]))]
    with pytest.raises(CcamergeError, match="label 7 is out of range for 4 classes"):
        list(Dataset("k", train=labels_out_of_range, test=[(x[:2], y[:2])],
                     num_classes=4).train.batches(4))
