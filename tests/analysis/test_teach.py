"""Teaching steps: the swap demonstration and the CCA solve step by step on live models."""

import numpy as np
import pytest

from ccamerge.analysis import teach
from ccamerge.api import train_inputs
from ccamerge.errors import CcamergeError
from ccamerge.methods.cca import cca
from ccamerge.spec import build_spec
from ccamerge.stats import collect_statistics


def test_swapping_units_keeps_the_function_and_naive_averaging_breaks_it(mlps, digits):
    demo = teach.swap_demo(mlps[0], digits, seed=1)
    assert demo["max_abs_diff"] < 1e-4
    acc = demo["accuracy"]
    assert acc["swapped"] == pytest.approx(acc["original"])
    assert acc["average_matched"] == pytest.approx(acc["original"])
    assert acc["average_unaligned"] < acc["original"] - 2.0
    assert demo["recovered"] > 0.9 and len(demo["perm"]) == 12


def test_cca_steps_reproduce_the_library_solve(mlps, digits):
    spec = build_spec(mlps[0])
    stats = collect_statistics(mlps[:2], spec, train_inputs(digits))
    steps = teach.cca_steps(stats["fc1"], 0, 1, gamma=0.1, relative=True)
    fit = cca(stats["fc1"].cov(0, 0), stats["fc1"].cov(1, 1), stats["fc1"].cov(0, 1), gamma=0.1,
              relative=True)
    assert steps.whitening_error < 1e-8 and steps.svd_error < 1e-8 and steps.inverse_error < 1e-6
    assert steps.library_error < 1e-12  # the library solves in the eigenbases: round-off only
    assert np.allclose(steps.rho, fit.rho[:len(steps.rho)])
    assert steps.gamma_x == pytest.approx(0.1 * np.trace(steps.c_xx) / len(steps.c_xx))
    assert np.all(np.diff(steps.rho) <= 1e-12) and steps.eig_x.min() > 0
    with pytest.raises(CcamergeError):
        teach.cca_steps(stats["fc1"], 0, 0)
