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
from ccamerge.io import archive_info, load_archive_model, load_model, read_info, save_merged
from ccamerge.methods import METHODS, Option, describe_methods, get_method
from ccamerge.spec import build_spec, same_points
from ccamerge.trace.derive import derive_and_verify
from ccamerge.trace.explain import explain
from ccamerge.trace.torchscript import is_torchscript_archive
from ccamerge.train import train_zoo

OPTION_DEST = "method_option:"  # argparse dest prefix of the flags made from the registry
SPECTRUM_OPTIONS = ("gamma", "relative")  # the cca options api.spectrum takes


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
    """Only the method flags the user gave; the registry rejects those the method lacks."""
    return {dest[len(OPTION_DEST):]: value for dest, value in vars(args).items()
            if dest.startswith(OPTION_DEST) and value is not None}


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


def cmd_merge(args) -> dict:
    """Merge the models with the flags given; the request has a recipe's fields."""
    return _merge({"method": args.method, "options": _method_options(args),
                   "reference": args.reference, "bn_reset": not args.no_bn_reset,
                   "bn_policy": args.bn_policy, "repair": args.repair,
                   "stats_samples": args.stats_samples, "seed": args.seed,
                   "data": {"name": args.data, "data_dir": args.data_dir},
                   "models": args.models}, args)


def cmd_replay(args) -> dict:
    """Re-run the merge recorded in a recipe (.json) or in a merged model's metadata."""
    return _merge(_read_recipe(args.recipe), args)


def _merge(request: dict, args) -> dict:
    """Merge as ``request`` (a recipe) says, write ``args.out`` with ``result.recipe`` in its
    metadata, and report the scores and the settings the recipe records."""
    data = load_dataset(request["data"]["name"], data_dir=request["data"].get("data_dir"))
    models = _models(request["models"], args, data)
    result = _merge_as(request, models, data, _progress(args.quiet))
    scores = evaluate_model(result.model, data.x_test, data.y_test)
    recipe = result.recipe
    info = {"merge": recipe, "dataset": recipe["data"]["name"],
            "test_accuracy": scores["accuracy"], "test_loss": scores["loss"]}
    save_merged(result.model, models[recipe["reference"]], args.out, info)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return {"method": recipe["method"], **scores, "out": str(args.out),
            **{k: recipe[k] for k in ("options", "reference", "bn_reset", "repair", "bn_policy")},
            "warnings": result.warnings}


def _merge_as(request: dict, models, data, progress) -> api.MergeResult:
    """``api.merge`` with a recipe's settings (missing ones at their defaults)."""
    return api.merge(models, data, request["method"], reference=request.get("reference", 0),
                     bn_reset=request.get("bn_reset", True),
                     bn_policy=request.get("bn_policy", "paper"),
                     repair=request.get("repair", False), weights=request.get("weights"),
                     stats_samples=request.get("stats_samples"), seed=request.get("seed", 0),
                     sources=[str(Path(p).resolve()) for p in request["models"]],
                     data_dir=request["data"].get("data_dir"), progress=progress,
                     **request.get("options", {}))


def _read_recipe(path: str) -> dict:
    """The recipe in a .json file, a merged .safetensors or a merged TorchScript archive."""
    info = _model_info(path)
    if info is not None and "merge" not in info:
        raise CcamergeError(f"{path} is not a merged model (its metadata has no recipe)")
    if info is not None:
        recipe = info["merge"]
    else:
        try:
            recipe = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise CcamergeError(f"cannot read recipe {path}: {exc}") from exc
    _check_recipe(recipe, path)
    return recipe


def _model_info(path: str) -> dict | None:
    """The info a model file's metadata records (an archive's zip is read, its code does not
    run); None when ``path`` is no model file."""
    if str(path).endswith(".safetensors"):
        return read_info(path)["info"]
    return archive_info(path) if is_torchscript_archive(path) else None


def _check_recipe(recipe, path: str) -> None:
    if not isinstance(recipe, dict):
        raise CcamergeError(f"recipe {path} is not a JSON object")
    missing = {"method", "models", "data"} - set(recipe)
    if missing:
        raise CcamergeError(f"recipe {path} lacks {sorted(missing)}")
    unnamed = [i for i, p in enumerate(recipe["models"]) if not p]
    if unnamed or not isinstance(recipe["data"], dict) or not recipe["data"].get("name"):
        what = f"model(s) {unnamed}" if unnamed else "its dataset"
        raise CcamergeError(f"recipe {path} names no file for {what}; it cannot be replayed")


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
    """Canonical correlations with the cca flags given, the registry's defaults for the rest."""
    data = _data(args)
    resolved = get_method("cca").resolve(_method_options(args))
    used = {name: resolved[name] for name in SPECTRUM_OPTIONS}
    rows = api.spectrum(_models([args.model_a, args.model_b], args, data), data,
                        stats_samples=args.stats_samples, seed=args.seed, **used)
    return {**used, "merge_points": rows}


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


def _options_by_name(methods, only=None) -> dict[str, list[tuple[str, Option]]]:
    """``{option: [(method, Option), ...]}`` over ``methods`` (registry order); ``only``: names
    to keep. One option shared by several methods must have one type and one negative flag."""
    table: dict[str, list[tuple[str, Option]]] = {}
    for method in methods:
        for name, opt in method.options.items():
            if only is None or name in only:
                table.setdefault(name, []).append((method.name, opt))
    for name, owners in table.items():
        if len({(opt.kind, opt.negative_flag) for _, opt in owners}) > 1:
            raise TypeError(f"option {name} differs in type or negative flag between methods "
                            f"{[m for m, _ in owners]}")
    return table


def flag_names(name: str, option: Option) -> tuple[str, str | None]:
    """``(flag, negative flag)`` of a method option: ``("--max-sweeps", None)``,
    ``("--relative", "--absolute")``; only bool options have a negative flag."""
    flag = "--" + name.replace("_", "-")
    if option.kind is not bool:
        return flag, None
    return flag, "--" + (option.negative_flag or f"no-{name}").replace("_", "-")


def option_flags(method: str, options: dict) -> list[str]:
    """The command-line words that give ``method`` these ``options``, e.g. ``["--gamma", "0.3",
    "--absolute"]`` (for front ends that print a command reproducing what they computed)."""
    declared = get_method(method).options
    get_method(method).resolve(options)  # unknown names fail and list the valid ones
    words: list[str] = []
    for name, value in options.items():
        flag, negative = flag_names(name, declared[name])
        words += [flag, str(value)] if negative is None else [flag if value else negative]
    return words


def _add_method_flags(p, methods, only=None) -> None:
    """One flag per option of ``methods`` (``--max-sweeps`` for ``max_sweeps``), typed by the
    Option, its help naming the method(s); a bool option gets a positive and a negative flag."""
    for name, owners in _options_by_name(methods, only).items():
        opt, dest = owners[0][1], OPTION_DEST + name
        text = "; ".join(f"{m}: {o.help} (default {o.default})" for m, o in owners)
        text = text.replace("%", "%%")  # argparse formats help strings
        flag, negative = flag_names(name, opt)
        if negative is None:
            p.add_argument(flag, dest=dest, type=opt.kind, default=None,
                           metavar=name.upper(), help=text)
            continue
        group = p.add_mutually_exclusive_group()
        group.add_argument(flag, dest=dest, action="store_true", default=None, help=text)
        group.add_argument(negative, dest=dest, action="store_false", default=None,
                           help=f"{', '.join(m for m, _ in owners)}: {name} = false")


def _add_merge_options(p) -> None:
    _add_method_flags(p, METHODS.values())
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
    p.add_argument("recipe", help="recipe .json, or a merged .safetensors or TorchScript archive")
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
    _add_method_flags(p, [get_method("cca")], SPECTRUM_OPTIONS)
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
