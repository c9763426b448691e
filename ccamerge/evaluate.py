"""Accuracy, loss, the logit-averaging ensemble, interpolation curves and their barrier.

Evaluation streams: ``evaluate_model(model, source)`` reads any data source batch by batch (a
Dataset part such as ``data.test``, a DataLoader, an iterable of ``(x, y)`` batches), and
``evaluate_model(model, x, y)`` takes tensors as before.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ccamerge.data import TensorSource, as_source
from ccamerge.data.sources import DataSource
from ccamerge.devices import module_device
from ccamerge.errors import CcamergeError
from ccamerge.models import check_input_fit, logits
from ccamerge.transform import has_batchnorm, reset_batchnorm

EVAL_BATCH = 1024


def metrics_from_logits(out: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """``{"accuracy": percent, "loss": mean cross-entropy}`` for logits ``[B, K]``, labels
    ``[B]``."""
    return {"accuracy": float((out.argmax(1) == y).double().mean() * 100.0),
            "loss": float(F.cross_entropy(out.double(), y))}


def labelled_source(x, y=None) -> DataSource:
    """Tensors ``x`` ``[B, ...]`` with labels ``y`` ``[B]``, or a data source when ``y`` is None."""
    if y is None:
        return as_source(x)
    return TensorSource(torch.as_tensor(x), torch.as_tensor(y))


@torch.no_grad()
def stream_metrics(forward: Callable[[torch.Tensor], torch.Tensor], source: DataSource,
                   batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """Accuracy (percent) and mean cross-entropy of ``forward(x) -> logits [B, K]`` over every
    batch of ``source`` (sums in float64, so the batch size does not matter)."""
    correct, total_loss, count = 0, 0.0, 0
    for xb, yb in source.batches(batch_size):
        if yb is None:
            raise CcamergeError("evaluation needs labels, but the data has inputs only")
        out = forward(xb)  # [B, K]
        if len(yb) and int(yb.max()) >= out.shape[1]:
            raise CcamergeError(f"label {int(yb.max())} is out of range for a model with "
                                f"{out.shape[1]} outputs; pick the dataset it was trained on")
        correct += int((out.argmax(1) == yb).sum())
        total_loss += float(F.cross_entropy(out.double(), yb, reduction="sum"))
        count += len(yb)
    if count == 0:
        raise CcamergeError("no samples to evaluate on")
    return {"accuracy": correct / count * 100.0, "loss": total_loss / count}


def evaluate_model(model: nn.Module, x, y: torch.Tensor | None = None) -> dict[str, float]:
    """Accuracy (percent) and loss of ``model`` (eval mode) on ``x`` ``[B, ...]`` with labels
    ``y`` ``[B]``, or on a labelled data source ``x`` (``y`` None), streamed."""
    source = labelled_source(x, y)
    check_input_fit(model, source.sample_shape, source.num_classes)
    model.eval()
    return stream_metrics(on_host(model), source)


def on_host(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> logits``: the batch moved to the model's device, the logits ``[B, K]`` back to
    the host as float32 (labels and metrics stay on the CPU)."""
    place = module_device(model)
    return lambda xb: model(xb.to(place)).float().cpu()


def ensemble_logits(models: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Mean of the models' logits ``[B, K]`` (the ensemble an ideal merge would match)."""
    return torch.stack([logits(m, x) for m in models]).mean(0)


def evaluate_ensemble(models: Sequence[nn.Module], x,
                      y: torch.Tensor | None = None) -> dict[str, float]:
    """Accuracy and loss of the mean of the models' logits, on tensors or a source (streamed)."""
    source = labelled_source(x, y)
    for m in models:
        check_input_fit(m, source.sample_shape, source.num_classes)
        m.eval()
    forwards = [on_host(m) for m in models]
    return stream_metrics(lambda xb: torch.stack([f(xb) for f in forwards]).mean(0), source)


def with_bn_reset(model: nn.Module, x_train) -> nn.Module:
    """A copy of ``model`` with BatchNorm statistics recomputed on ``x_train`` (a tensor or a
    data source; the same policy merged models get, so accuracies compare); the model itself
    when it has no BatchNorm."""
    if not has_batchnorm(model):
        return model
    return reset_batchnorm(copy.deepcopy(model), x_train)


def barrier(lambdas: Sequence[float], losses: Sequence[float]) -> float:
    """``max_l loss(l) - ((1 - l) loss(0) + l loss(1))`` over the grid (0 for a convex path)."""
    lam, loss = np.asarray(lambdas, float), np.asarray(losses, float)
    return float(np.max(loss - ((1 - lam) * loss[0] + lam * loss[-1])))
