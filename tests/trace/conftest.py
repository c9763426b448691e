from __future__ import annotations

import pytest
import torch
from width_nets import duplicated, make


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def archive_files(digits, tmp_path_factory) -> list[str]:
    """A narrow CNN (BatchNorm statistics of the digits) and its duplicated twin of double
    width, as TorchScript archive files."""
    narrow = make(x=digits.x_train)
    folder = tmp_path_factory.mktemp("width_archives")
    paths = []
    for k, model in enumerate([narrow, duplicated(narrow, digits.x_train)]):
        paths.append(str(folder / f"cnn{k}.ts"))
        torch.jit.save(torch.jit.script(model), paths[-1])
    return paths
