"""Keeping freed memory for reuse: what glibc does with a large freed tensor, with and without."""

import json
import os
import subprocess
import sys

import pytest

from ccamerge import cli
from ccamerge.allocator import USER_SETTINGS, keep_freed_memory

# The resident memory of a fresh process before a 400 MB tensor, while it lives and after its
# free, within a pass; after the pass; and for a tensor freed outside any pass.
CHILD = """
import json, sys
import torch
from ccamerge.allocator import for_a_pass, keep_freed_memory

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

kept = keep_freed_memory() if sys.argv[1] == "keep" else False
before = rss_mb()
with for_a_pass(), for_a_pass():  # nested: the outer one decides
    t = torch.ones(100_000_000)
    alive = rss_mb()
    del t
    freed = rss_mb()
after_pass = rss_mb()
t = torch.ones(100_000_000)
del t
print(json.dumps({"kept": kept, "before": before, "alive": alive, "freed": freed,
                  "after_pass": after_pass, "outside": rss_mb()}))
"""


def _child(mode: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                         check=True, env=env)
    return json.loads(out.stdout)


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_freed_large_tensor_stays_with_the_process_during_a_pass_only_when_kept():
    default, kept = _child("default", _clean_env()), _child("keep", _clean_env())
    assert kept["kept"] and not default["kept"]
    for run in (default, kept):
        assert run["alive"] - run["before"] > 350  # the tensor was written
        assert run["outside"] - run["before"] < 50  # outside a pass: given back
    assert default["alive"] - default["freed"] > 350  # glibc gave it back
    assert kept["alive"] - kept["freed"] < 50  # kept for the next batch
    assert kept["after_pass"] - kept["before"] < 50  # and handed back when the pass ended


def test_the_users_own_allocator_settings_stand(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert keep_freed_memory() is False
    assert _child("keep", _clean_env() | {"LD_PRELOAD": ""})["kept"] is (
        sys.platform.startswith("linux"))  # an empty setting is no setting


def test_only_a_command_line_run_keeps_freed_memory(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(sys, "argv", ["ccamerge", "methods"])
    assert cli.main() == 0
    assert cli.main(["methods"]) == 0  # called from Python: the process is the caller's
    assert calls == [1]
    capsys.readouterr()


def test_the_statistics_pass_and_the_batchnorm_reset_each_run_as_one_pass(monkeypatch, digits):
    import contextlib

    from ccamerge import stats, transform
    from ccamerge.models import build_model
    from ccamerge.spec import build_spec

    entered = []

    @contextlib.contextmanager
    def spy():
        entered.append("in")
        yield
        entered.append("out")

    monkeypatch.setattr(stats, "for_a_pass", spy)
    monkeypatch.setattr(transform, "for_a_pass", spy)
    model = build_model("resnet20", image_shape=[1, 8, 8], width=0.25)
    stats.collect_statistics([model, model], build_spec(model), digits.x_train[:64],
                             batch_size=16)
    assert entered == ["in", "out"]  # one scope around every batch, not one per batch
    transform.reset_batchnorm(model, digits.x_train[:64], batch_size=16)
    assert entered == ["in", "out"] * 2
