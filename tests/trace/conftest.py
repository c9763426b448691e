from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(0))
