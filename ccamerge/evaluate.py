"""Accuracy, loss, the logit-averaging ensemble, interpolation curves and their barrier."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ccamerge.models import logits
from ccamerge.transform import has_batchnorm, reset_batchnorm


def metrics_from_logits(out: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """``{"accuracy": percent, "loss": mean cross-entropy}`` for logits ``[B, K]``, labels ``[B]``."""
    return {"accuracy": float((out.argmax(1) == y).double().mean() * 100.0),
            "loss": float(F.cross_entropy(out.double(), y))}


def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracy (percent) and loss of ``model`` on ``x`` ``[B, ...]``, ``y`` ``[B]``."""
    return metrics_from_logits(logits(model, x), y)


def ensemble_logits(models: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Mean of the models' logits ``[B, K]`` (the ensemble an ideal merge would match)."""
    return torch.stack([logits(m, x) for m in models]).mean(0)


def evaluate_ensemble(models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return metrics_from_logits(ensemble_logits(models, x), y)


def with_bn_reset(model: nn.Module, x_train: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with BatchNorm statistics recomputed on ``x_train`` (the same policy
    merged models get, so accuracies compare); the model itself when it has no BatchNorm."""
    if not has_batchnorm(model):
        return model
    return reset_batchnorm(copy.deepcopy(model), x_train)


def barrier(lambdas: Sequence[float], losses: Sequence[float]) -> float:
    """``max_l loss(l) - ((1 - l) loss(0) + l loss(1))`` over the grid (0 for a convex path)."""
    lam, loss = np.asarray(lambdas, float), np.asarray(losses, float)
    return float(np.max(loss - ((1 - lam) * loss[0] + lam * loss[-1])))
