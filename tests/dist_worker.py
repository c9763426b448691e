"""One rank of the torch.distributed tests (tests/test_distributed.py), run as a script::

    RANK=r WORLD_SIZE=w MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/dist_worker.py MODE DIR

or under ``torchrun``. Reads ``DIR/inputs.pt`` (models as ``(arch, config, state)``, inputs,
batch size; written by the test) and writes ``DIR/rank{r}.pt``. MODE ``merge``: statistics of
the MLPs, their CCA merge, the convnet's BatchNorm output moments (the mapped reset's, from a
statistics pass) and its BatchNorm reset, all sharded over the ranks;
``die`` / ``hang``: the last rank exits / stalls during the statistics pass. A CcamergeError is
printed as one line on stderr with exit status 2, as the CLI does, and the process
group is left in every case (:func:`ccamerge.distributed.shutdown`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from ccamerge.api import merge
from ccamerge.batchnorm import carried_moments, moment_batchnorms
from ccamerge.distributed import init_from_env, reset_batchnorm_sharded, shutdown
from ccamerge.errors import CcamergeError
from ccamerge.models import build_model
from ccamerge.spec import build_spec
from ccamerge.stats import collect_statistics


def load_models(entries) -> list[torch.nn.Module]:
    models = []
    for arch, config, state in entries:
        model = build_model(arch, **config)
        model.load_state_dict(state)
        models.append(model.eval())
    return models


def saboteur(mode: str, rank: int, world_size: int):
    """A progress callback that makes the last rank die or hang in the middle of its pass."""
    if rank != world_size - 1 or mode == "merge":
        return None

    def act(_fraction: float) -> None:
        if mode == "die":
            os._exit(3)
        time.sleep(600)
    return act


def run(mode: str, folder: Path) -> None:
    ctx = init_from_env(device="cpu", timeout_s=float(os.environ.get("TEST_TIMEOUT_S", "60")))
    torch.set_num_threads(1)  # the same float32 products as the reference computed by the test
    inputs = torch.load(folder / "inputs.pt", weights_only=False)
    models, bs = load_models(inputs["mlps"]), inputs["batch_size"]
    spec = build_spec(models[0])
    stats = collect_statistics(models, spec, inputs["x"], batch_size=bs, group=ctx.group,
                               progress=saboteur(mode, ctx.rank, ctx.world_size))
    merged = merge(models, inputs["x"], "cca", statistics=stats, batch_size=bs)
    [bn_model] = load_models([inputs["bn"]])
    bns = moment_batchnorms(bn_model)
    bn_stats = collect_statistics([bn_model], build_spec(bn_model), inputs["x_bn"], batch_size=bs,
                                  group=ctx.group, self_only=bns)
    reset_batchnorm_sharded(bn_model, inputs["x_bn"], batch_size=bs, group=ctx.group)
    torch.save({"covs": {n: stats[n].covs for n in spec.names},
                "means": {n: stats[n].mean for n in spec.names},
                "counts": {n: stats[n].count for n in spec.names},
                "collection": stats.collection(), "merged": merged.model.state_dict(),
                "bn": bn_model.state_dict(), "bn_moments": carried_moments(bn_stats, bns)[0]},
               folder / f"rank{ctx.rank}.pt")


if __name__ == "__main__":
    try:
        run(sys.argv[1], Path(sys.argv[2]))
    except CcamergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        shutdown(synchronise=sys.exc_info()[0] is None)  # after a failure: leave, do not wait
