"""The ``ccamerge`` command. A contract: with ``--json`` every command prints exactly one JSON
object on stdout; progress goes to stderr; user errors exit 2 with one line on stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ccamerge import api
from ccamerge.analysis.diagnose import diagnose
from ccamerge.data import DATASETS, load_dataset
from ccamerge.errors import CcamergeError
from ccamerge.evaluate import evaluate_ensemble, evaluate_model, with_bn_reset
from ccamerge.io import load_archive_model, load_model, save_merged
from ccamerge.methods import METHODS, describe_methods, get_method
from ccamerge.spec import build_spec, same_points
from ccamerge.trace.derive import derive_and_verify
from ccamerge.trace.explain import explain
from ccamerge.trace.torchscript import is_torchscript_archive
from ccamerge.train import train_zoo

METHOD_FLAGS = {"gamma": float, "alpha": float, "beta": float, "max_sweeps": int}


def _progress(quiet: bool):
    def report(fraction: float, message: str) -> None:
        if not quiet:
            print(f"[{fraction * 100:5.1f}%] {message}", file=sys.stderr, flush=True)
    return report


def _data(args):
    return load_dataset(args.data, data_dir=args.data_dir)


def _load(path: str, args, data=None):
    """A model file: safetensors / weights-only .pt, or (with --trust-code) a TorchScript
    archive replayed as a hookable module (see :func:`ccamerge.io.load_archive_model`)."""
    if not is_torchscript_archive(path):
        return load_model(path)
    if not getattr(args, "trust_code", False):
        raise CcamergeError(f"{path} is a TorchScript archive: its code runs when the model runs; "
                            "pass --trust-code only if you trust where it came from")
    return load_archive_model(path, (data or _data(args)).x_train[:8])


def _models(paths, args, data=None):
    return [_load(p, args, data) for p in paths]


def _method_options(args) -> dict:
    """Only the flags the user gave; the registry rejects those the method does not have."""
    options = {k: getattr(args, k) for k in METHOD_FLAGS if getattr(args, k, None) is not None}
    if getattr(args, "relative", None) is not None:
        options["relative"] = args.relative
    return options


def cmd_train(args) -> dict:
    data = _data(args)
    rows = train_zoo(args.arch, data, args.seeds, args.out, split=args.split, width=args.width,
                     epochs=args.epochs, progress=_progress(args.quiet))
    return {"models": rows}


def cmd_evaluate(args) -> dict:
    data = _data(args)
    models = _models(args.models, args, data)
    if not args.no_bn_reset:
        models = [with_bn_reset(m, data.x_train) for m in models]
    out = {"models": [{"path": str(p), **evaluate_model(m, data.x_test, data.y_test)}
                      for p, m in zip(args.models, models, strict=True)]}
    if args.ensemble:
        out["ensemble"] = evaluate_ensemble(models, data.x_test, data.y_test)
    return out


def _merge_from(models, data, args, method, options, reference) -> dict:
    result = api.merge(models, data, method, reference=reference, bn_reset=not args.no_bn_reset,
                       repair=getattr(args, "repair", False), bn_policy=args.bn_policy,
                       stats_samples=args.stats_samples, seed=args.seed,
                       progress=_progress(args.quiet), **options)
    scores = evaluate_model(result.model, data.x_test, data.y_test)
    result.recipe["models"] = [str(Path(p).resolve()) for p in args.models]
    result.recipe["data"] = {"name": args.data, "data_dir": args.data_dir}
    info = {"merge": result.recipe, "dataset": args.data, "test_accuracy": scores["accuracy"],
            "test_loss": scores["loss"]}
    save_merged(result.model, models[reference], args.out, info)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return {"method": method, **scores, "out": str(args.out), "options": result.recipe["options"],
            "reference": reference, "bn_reset": not args.no_bn_reset,
            "repair": result.recipe["repair"], "bn_policy": result.recipe["bn_policy"],
            "warnings": result.warnings}


def cmd_merge(args) -> dict:
    data = _data(args)
    return _merge_from(_models(args.models, args, data), data, args, args.method,
                       _method_options(args), args.reference)


def cmd_replay(args) -> dict:
    """Re-run the merge recorded in a recipe (.json) or in a merged model's metadata."""
    recipe = _read_recipe(args.recipe)
    args.models = recipe["models"]
    args.data, args.data_dir = recipe["data"]["name"], recipe["data"].get("data_dir")
    args.no_bn_reset = not recipe.get("bn_reset", True)
    args.repair = recipe.get("repair", False)
    args.bn_policy = recipe.get("bn_policy", "paper")
    args.stats_samples, args.seed = recipe.get("stats_samples"), recipe.get("seed", 0)
    data = _data(args)
    return _merge_from(_models(args.models, args, data), data, args, recipe["method"],
                       recipe.get("options", {}), recipe.get("reference", 0))


def _read_recipe(path: str) -> dict:
    if str(path).endswith(".safetensors"):
        info = getattr(load_model(path), "info", None) or {}
        if "merge" not in info:
            raise CcamergeError(f"{path} is not a merged model (its metadata has no recipe)")
        return info["merge"]
    try:
        recipe = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CcamergeError(f"cannot read recipe {path}: {exc}") from exc
    missing = {"method", "models", "data"} - set(recipe)
    if missing:
        raise CcamergeError(f"recipe {path} lacks {sorted(missing)}")
    return recipe


def _paper_policy_only(args, command: str) -> None:
    if args.bn_policy != "paper":
        raise CcamergeError(f"--bn-policy {args.bn_policy} is available for merge, not {command}")


def cmd_interpolate(args) -> dict:
    _paper_policy_only(args, "interpolate")
    data = _data(args)
    a, b = _models([args.model_a, args.model_b], args, data)
    return api.interpolate(a, b, data, args.method, steps=args.steps, bn_reset=not args.no_bn_reset,
                           stats_samples=args.stats_samples, seed=args.seed,
                           progress=_progress(args.quiet), **_method_options(args))


def cmd_spectrum(args) -> dict:
    data = _data(args)
    rows = api.spectrum(_models([args.model_a, args.model_b], args, data), data, gamma=args.gamma,
                        relative=args.relative, stats_samples=args.stats_samples, seed=args.seed)
    return {"gamma": args.gamma, "relative": args.relative, "merge_points": rows}


def cmd_diagnose(args) -> dict:
    _paper_policy_only(args, "diagnose")
    data = _data(args)
    return diagnose(_models(args.models, args, data), data, args.method, reference=args.reference,
                    bn_reset=not args.no_bn_reset, stats_samples=args.stats_samples, seed=args.seed,
                    with_sweep=args.sweep, progress=_progress(args.quiet), **_method_options(args))


def cmd_spec(args) -> dict:
    """Every merge point of a model (traced and verified), unsupported operations, diagrams."""
    data = _data(args)
    model = _load(args.model, args, data)
    derived = derive_and_verify(model, data.x_train[:64])
    report = explain(derived, diagrams=args.diagrams)
    if api.is_builtin(model):
        report["matches_hand_written"] = same_points(derived.spec, build_spec(model))
    return report


def cmd_methods(_args) -> dict:
    return {"methods": describe_methods()}


def _add_data(p) -> None:
    p.add_argument("--data", default="digits",
                   help=f"dataset: {', '.join(DATASETS)} or a .npz file (default: digits)")
    p.add_argument("--data-dir", default=None, help="folder holding Fashion-MNIST's idx .gz files")


def _add_merge_options(p, *, gamma_default=None) -> None:
    p.add_argument("--gamma", type=float, default=gamma_default, help="CCA ridge (method cca)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--relative", dest="relative", action="store_true", default=None,
                       help="gamma in units of each layer's mean variance (cca default)")
    group.add_argument("--absolute", dest="relative", action="store_false",
                       help="absolute gamma added to the raw covariances, as in the paper's code")
    p.add_argument("--alpha", type=float, help="ZipIt similarity decay")
    p.add_argument("--beta", type=float, help="ZipIt same-model merge budget")
    p.add_argument("--max-sweeps", dest="max_sweeps", type=int, help="weight matching sweeps")
    p.add_argument("--no-bn-reset", action="store_true", help="keep the averaged BatchNorm statistics")
    p.add_argument("--bn-policy", choices=["paper", "fold"], default="paper",
                   help="paper: transform BatchNorm vectors with the conv rows (default); fold: "
                   "fold BatchNorm into the conv first and restore the endpoints' scale")
    p.add_argument("--stats-samples", type=int, default=None,
                   help="training images used for statistics (default: all)")
    p.add_argument("--seed", type=int, default=0)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, like every other error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ccamerge", description=__doc__.split(".")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    common.add_argument("--quiet", action="store_true", help="no progress on stderr")
    common.add_argument("--trust-code", action="store_true",
                        help="accept TorchScript archives (their code runs when the model runs)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", parents=[common], help="train several seeds, one file each")
    p.add_argument("--arch", required=True, choices=["mlp", "vgg", "resnet20"])
    _add_data(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", required=True)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--split", default="same", choices=["same", "skewed", "dirichlet"])
    p.add_argument("--epochs", type=int, default=20)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", parents=[common], help="accuracy and loss of models")
    p.add_argument("models", nargs="+")
    _add_data(p)
    p.add_argument("--ensemble", action="store_true", help="also the logit-averaging ensemble")
    p.add_argument("--no-bn-reset", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("merge", parents=[common], help="align and average N models")
    p.add_argument("models", nargs="+")
    p.add_argument("--method", default="cca", help=f"one of {', '.join(METHODS)}")
    _add_data(p)
    p.add_argument("--out", required=True)
    p.add_argument("--reference", type=int, default=0)
    p.add_argument("--repair", action="store_true",
                   help="REPAIR: rescale merged units to the endpoints' statistics (nets without BN)")
    _add_merge_options(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("replay", parents=[common], help="redo a merge from its recipe")
    p.add_argument("recipe", help="recipe .json, or a merged .safetensors")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("interpolate", parents=[common], help="loss along the path between two models")
    p.add_argument("model_a")
    p.add_argument("model_b")
    p.add_argument("--method", default="average", help=f"one of {', '.join(METHODS)}")
    _add_data(p)
    p.add_argument("--steps", type=int, default=11)
    _add_merge_options(p)
    p.set_defaults(func=cmd_interpolate)

    p = sub.add_parser("spectrum", parents=[common], help="canonical correlations per merge point")
    p.add_argument("model_a")
    p.add_argument("model_b")
    _add_data(p)
    p.add_argument("--gamma", type=float, default=get_method("cca").options["gamma"].default)
    p.add_argument("--absolute", dest="relative", action="store_false", default=True)
    p.add_argument("--stats-samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_spectrum)

    p = sub.add_parser("diagnose", parents=[common], help="why a merge works or fails: per-layer "
                       "health, partial merges, a checklist")
    p.add_argument("models", nargs="+")
    p.add_argument("--method", default="cca", help=f"one of {', '.join(METHODS)}")
    _add_data(p)
    p.add_argument("--reference", type=int, default=0)
    p.add_argument("--sweep", action="store_true",
                   help="also sweep gamma (cca) or alpha/beta (zipit) on held-out training data")
    _add_merge_options(p)
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("spec", parents=[common], help="merge points of a model, derived by tracing "
                       "and verified, with unsupported operations and a diagram")
    p.add_argument("model")
    _add_data(p)
    p.add_argument("--no-diagrams", dest="diagrams", action="store_false",
                   help="leave out the DOT and Mermaid diagrams")
    p.set_defaults(func=cmd_spec)

    p = sub.add_parser("methods", parents=[common], help="the registry of merge methods")
    p.set_defaults(func=cmd_methods)
    return parser


def _print_human(result: dict) -> None:
    for key, value in result.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            print(f"{key}:")
            for row in value:
                print("  " + ", ".join(f"{k}={_short(v)}" for k, v in row.items()))
        else:
            print(f"{key}: {_short(value)}")


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) > 8:
        return "[" + ", ".join(_short(v) for v in value[:8]) + f", ... ({len(value)} values)]"
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    return str(value)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors and --help: argparse already printed
        return int(exc.code or 0)
    try:
        result = args.func(args)
    except CcamergeError as exc:
        print(f"ccamerge: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # never a traceback for users; CCAMERGE_DEBUG=1 shows it
        if os.environ.get("CCAMERGE_DEBUG"):
            raise
        print(f"ccamerge: unexpected error ({type(exc).__name__}): {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, default=_jsonable))
    else:
        _print_human(result)
    return 0


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
