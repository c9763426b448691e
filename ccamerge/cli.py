"""The ``ccamerge`` command. A contract: with ``--json`` every command prints exactly one JSON
object on stdout; progress goes to stderr; user errors exit 2 with one line on stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ccamerge import api, recipes, validate
from ccamerge.allocator import keep_freed_memory
from ccamerge.analysis.diagnose import diagnose
from ccamerge.batchnorm import DEFAULT_POLICY, LEGACY_POLICY
from ccamerge.cli_args import (
    MAX_EPOCHS,
    MAX_SEEDS,
    MAX_WIDTH,
    OPTION_DEST,
    SEED,
    Parser,
    add_data,
    add_merge_options,
    add_method_flags,
    flag_names,
    integer,
    option_flags,
    positive,
)
from ccamerge.data import DATASETS, load_dataset
from ccamerge.distributed import init_from_env, shutdown
from ccamerge.errors import CcamergeError
from ccamerge.evaluate import evaluate_ensemble, evaluate_model, with_bn_reset
from ccamerge.files import check_not_input, check_output_path, regular_file
from ccamerge.io import MAX_BYTES, load_archive_model, load_model, save_merged
from ccamerge.methods import METHODS, describe_methods, get_method
from ccamerge.models import check_input_fit
from ccamerge.spec import build_spec, same_points
from ccamerge.trace.derive import derive_and_verify
from ccamerge.trace.explain import explain
from ccamerge.trace.torchscript import is_torchscript_archive
from ccamerge.train import train_zoo

__all__ = ["build_parser", "flag_names", "main", "option_flags"]
SPECTRUM_OPTIONS = ("gamma", "relative")  # the cca options api.spectrum takes
EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_PIPE = 0, 1, 2, 130, 141


def _progress(quiet: bool):
    def report(fraction: float, message: str) -> None:
        if not quiet:
            print(f"[{fraction * 100:5.1f}%] {message}", file=sys.stderr, flush=True)
    return report


def _data(args):
    return _dataset(args.data, args.data_dir)


def _dataset(name: str, data_dir: str | None):
    """``load_dataset`` after checking that a named file or folder is one (never a FIFO or a
    device) and that ``data_dir`` is a folder."""
    if name not in DATASETS and os.path.lexists(name) and not os.path.isdir(name):
        regular_file(name, what="dataset file")
    if data_dir is not None and not os.path.isdir(data_dir):
        raise CcamergeError(f"--data-dir {data_dir} is not a folder; pass the folder that holds "
                            "the dataset's files")
    return load_dataset(name, data_dir=data_dir)


def _data_file(name: str | None) -> str | None:
    """The file a dataset name points at (an input the output must not replace), else None."""
    return name if name and name not in DATASETS and os.path.exists(name) else None


def _load(path: str, args, data=None, architecture: dict | None = None):
    """A model file: safetensors / weights-only .pt (built as ``architecture``, ``{"arch",
    "config"}``, which a replayed recipe records for a .pt), or (with --trust-code) a
    TorchScript archive replayed as a hookable module (see
    :func:`ccamerge.io.load_archive_model`). Only a regular file is opened."""
    regular_file(path, what="model file", max_bytes=MAX_BYTES)
    if not is_torchscript_archive(path):
        if architecture is None or str(path).lower().endswith(".safetensors"):
            return load_model(path)
        return load_model(path, arch=architecture["arch"], config=architecture["config"])
    if not getattr(args, "trust_code", False):
        raise CcamergeError(f"{path} is a TorchScript archive: its code runs when the model runs; "
                            "pass --trust-code only if you trust where it came from")
    return load_archive_model(path, (data or _data(args)).x_train[:8])


def _models(paths, args, data, *, classes: bool = True, architectures=None):
    """The model files (a .pt built as its entry of ``architectures``), loaded and checked to
    fit ``data`` (its classes too when ``classes``)."""
    architectures = architectures or [None] * len(paths)
    models = [_load(p, args, data, a) for p, a in zip(paths, architectures, strict=True)]
    _check_fit(models, paths, data, classes)
    return models


def _check_fit(models, paths, data, classes: bool = True) -> None:
    """Each model must take the dataset's samples and (``classes``) predict its classes, named
    by its file: the built-in families by their config, others run on two training samples."""
    source = data.train
    for model, path in zip(models, paths, strict=True):
        try:
            check_input_fit(model, source.sample_shape, source.num_classes if classes else None)
            if not api.is_builtin(model):
                _check_runs(model, source, classes)
        except CcamergeError as exc:
            raise CcamergeError(f"{path}: {exc}") from None


@torch.no_grad()
def _check_runs(model, source, classes: bool) -> None:
    out = model.eval()(source.head(2))
    width = out.shape[1] if isinstance(out, torch.Tensor) and out.ndim == 2 else None
    if classes and width != source.num_classes:
        raise CcamergeError(f"the model has {width} outputs but the data has "
                            f"{source.num_classes} classes; pick the dataset it was trained on")


def _method_options(args) -> dict:
    """Only the method flags the user gave; the registry rejects those the method lacks."""
    return {dest[len(OPTION_DEST):]: value for dest, value in vars(args).items()
            if dest.startswith(OPTION_DEST) and value is not None}


def cmd_train(args) -> dict:
    """Train one model per seed into the ``--out`` folder (a file there is reused when its
    recorded recipe matches)."""
    if len(set(args.seeds)) != len(args.seeds) or len(args.seeds) > MAX_SEEDS:
        raise CcamergeError(f"--seeds must be at most {MAX_SEEDS} different seeds, got "
                            f"{args.seeds[:8]}")
    check_output_path(args.out, folder=True)
    data = _data(args)
    if not args.ctx.is_main:  # training is not sharded: under torchrun rank 0 trains alone
        return {"models": []}
    rows = train_zoo(args.arch, data, args.seeds, args.out, split=args.split, width=args.width,
                     epochs=args.epochs, device=args.ctx.device, progress=_progress(args.quiet))
    return {"models": rows}


def cmd_evaluate(args) -> dict:
    """Test accuracy and loss of each model (after a BatchNorm reset), and their ensemble."""
    data = _data(args)
    models, _place = api.place_models(_models(args.models, args, data), args.ctx.device)
    if not args.no_bn_reset:
        models = [with_bn_reset(m, data.train) for m in models]
    out = {"models": [{"path": str(p), **evaluate_model(m, data.test)}
                      for p, m in zip(args.models, models, strict=True)]}
    if args.ensemble:
        out["ensemble"] = evaluate_ensemble(models, data.test)
    return out


def cmd_merge(args) -> dict:
    """Merge the models with the flags given; the request has a recipe's fields."""
    _check_reference(args.reference, len(args.models))
    if args.target_model is not None:
        _check_reference(args.target_model, len(args.models), "--target-model")
    reference = api.target_reference(args.reference, args.target_model, len(args.models))
    request = {"method": args.method, "options": _method_options(args),
               "reference": reference, "target_width": args.target_width,
               "bn_reset": not args.no_bn_reset,
               "bn_policy": args.bn_policy, "reset_base_bn": args.reset_base_bn,
               "stream_points": args.stream_points, "products": args.products,
               "repair": args.repair, "stats_samples": args.stats_samples, "seed": args.seed,
               "data": {"name": args.data, "data_dir": args.data_dir}, "models": args.models}
    get_method(args.method).resolve(request["options"])
    return _merge(request, args, inputs=args.models)


def cmd_replay(args) -> dict:
    """Re-run the merge recorded in a recipe (.json) or in a merged model's metadata, on the
    files it names or on ``--models`` (files in order, or a folder searched by sha256); every
    recorded sha256 is verified first."""
    recipe = recipes.read_recipe(args.recipe)
    paths = recipes.model_paths(recipe, args.models, args.recipe)
    notes = recipes.verify(recipe, paths, args.recipe)
    recipes.verify_data(recipe, args.recipe)
    return _merge({**recipe, "models": paths}, args, inputs=[args.recipe, *paths], notes=notes,
                  architectures=recipes.recorded_architectures(recipe))


def _check_out(out: str, inputs: list, models: list[str], reference: int) -> None:
    """Before any work: ``out`` replaces no input, is writable, and has the suffix of what will
    be written there (a merge of TorchScript archives is an archive)."""
    check_not_input(out, inputs)
    check_output_path(out)
    ref = models[reference]
    archive = os.path.isfile(ref) and is_torchscript_archive(ref)
    if archive and out.endswith(".safetensors"):
        raise CcamergeError(f"--out {out}: a merge of TorchScript archives is written as an "
                            "archive; give a .pt or .ts name")
    if not archive and not out.endswith(".safetensors"):
        raise CcamergeError(f"--out {out}: merged models are written as .safetensors; give a "
                            ".safetensors name")


def _merge(request: dict, args, *, inputs: list, notes: list[str] = (),
           architectures: list | None = None) -> dict:
    """Merge as ``request`` (a checked recipe) says, write ``args.out`` with ``result.recipe``
    in its metadata, and report the scores and the settings the recipe records."""
    data_name = request["data"]["name"]
    _check_out(args.out, [*inputs, _data_file(data_name)], request["models"],
               request.get("reference", 0))
    data = _dataset(data_name, request["data"].get("data_dir"))
    models = _models(request["models"], args, data, architectures=architectures)
    result = _merge_as(request, models, data, _progress(args.quiet or not args.ctx.is_main),
                       args.ctx)
    scores = evaluate_model(result.model, data.test)
    recipe = result.recipe
    info = {"merge": recipe, "dataset": recipe["data"]["name"],
            "test_accuracy": scores["accuracy"], "test_loss": scores["loss"]}
    if args.ctx.is_main:  # every rank holds the same merge; one writes it
        save_merged(result.model, models[recipe["reference"]], args.out, info)
    warnings = [*notes, *result.warnings]
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return {"method": recipe["method"], **scores, "out": str(args.out),
            **{k: recipe[k] for k in ("options", "reference", "target_model", "target_width",
                                      "target_widths",
                                      "bn_reset", "repair", "bn_policy",
                                      "reset_base_bn", "stream_points")},
            "warnings": warnings, **result.collection}


def _check_reference(reference: int, count: int, flag: str = "--reference") -> None:
    """At least two models, and ``--reference`` (or ``flag``) the index of one of them."""
    if count < 2:
        raise CcamergeError(f"merging needs at least 2 model files, got {count}")
    if not 0 <= reference < count:
        raise CcamergeError(f"{flag} must be the index of one of the {count} models "
                            f"(0..{count - 1}), got {reference}")


def _merge_as(request: dict, models, data, progress, ctx) -> api.MergeResult:
    """``api.merge`` with a recipe's settings (missing ones at their defaults)."""
    return api.merge(models, data, request["method"], reference=request.get("reference", 0),
                     bn_reset=request.get("bn_reset", True),
                     bn_policy=request.get("bn_policy", LEGACY_POLICY),
                     reset_base_bn=request.get("reset_base_bn", False),
                     stream_points=request.get("stream_points", "pooled"),
                     products=request.get("products", "float32"),
                     repair=request.get("repair", False), weights=request.get("weights"),
                     target_width=request.get("target_width"),
                     stats_samples=request.get("stats_samples"), seed=request.get("seed", 0),
                     sources=[str(Path(p).resolve()) for p in request["models"]],
                     data_dir=request["data"].get("data_dir"), device=ctx.device,
                     group=ctx.group, progress=progress, **request.get("options", {}))


def _merge_only_settings(args, command: str, *, policy: bool = False) -> None:
    """Refuse the merge-only BatchNorm and stream settings for ``command`` (``--bn-policy``
    too unless ``policy``: the command takes it)."""
    if args.bn_policy != DEFAULT_POLICY and not policy:
        raise CcamergeError(f"--bn-policy {args.bn_policy} is available for merge and diagnose, "
                            f"not {command}")
    for flag, given in (("--reset-base-bn", args.reset_base_bn),
                        ("--stream-points last", args.stream_points != "pooled"),
                        ("--products bfloat16", args.products != "float32")):
        if given:
            raise CcamergeError(f"{flag} is available for merge, not {command}")


def cmd_interpolate(args) -> dict:
    """Loss and accuracy along the path between two models (see :func:`api.interpolate`)."""
    _merge_only_settings(args, "interpolate")
    get_method(args.method).resolve(_method_options(args))
    data = _data(args)
    a, b = _models([args.model_a, args.model_b], args, data)
    return api.interpolate(a, b, data, args.method, steps=args.steps, bn_reset=not args.no_bn_reset,
                           stats_samples=args.stats_samples, seed=args.seed,
                           device=args.ctx.device, group=args.ctx.group,
                           progress=_progress(args.quiet or not args.ctx.is_main),
                           **_method_options(args))


def cmd_spectrum(args) -> dict:
    """Canonical correlations (model 0 against each other model) or, with ``--shared``, the
    gcca shared space of all models, with the method's flags given and its registry defaults
    for the rest."""
    method = "gcca" if args.shared else "cca"
    resolved = get_method(method).resolve(_method_options(args))
    data = _data(args)
    used = {name: resolved[name] for name in SPECTRUM_OPTIONS}
    models = _models([args.model_a, args.model_b, *args.more], args, data)
    run = api.shared_spectrum if args.shared else api.spectrum
    rows = run(models, data, stats_samples=args.stats_samples, seed=args.seed,
               device=args.ctx.device, group=args.ctx.group, **used)
    return {"method": method, **used, "merge_points": rows}


def cmd_diagnose(args) -> dict:
    """Why a merge works or fails (see :func:`ccamerge.analysis.diagnose.diagnose`)."""
    _merge_only_settings(args, "diagnose", policy=True)
    _check_reference(args.reference, len(args.models))
    get_method(args.method).resolve(_method_options(args))
    data = _data(args)
    return diagnose(_models(args.models, args, data), data, args.method, reference=args.reference,
                    bn_reset=not args.no_bn_reset, stats_samples=args.stats_samples, seed=args.seed,
                    with_sweep=args.sweep, device=args.ctx.device, bn_policy=args.bn_policy,
                    progress=_progress(args.quiet), **_method_options(args))


def cmd_spec(args) -> dict:
    """Every merge point of a model (traced and verified), unsupported operations, diagrams."""
    data = _data(args)
    (model,) = _models([args.model], args, data, classes=False)
    derived = derive_and_verify(model, data.x_train[:64])
    report = explain(derived, diagrams=args.diagrams)
    if api.is_builtin(model):
        report["matches_hand_written"] = same_points(derived.spec, build_spec(model))
    return report


def cmd_methods(_args) -> dict:
    return {"methods": describe_methods()}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ccamerge", description=__doc__.split(".")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    common.add_argument("--quiet", action="store_true", help="no progress on stderr")
    common.add_argument("--device", default="auto",
                        help="auto (CUDA when present), cpu, cuda or cuda:N (default: auto); "
                        "under torchrun each rank takes its own GPU")
    common.add_argument("--trust-code", action="store_true",
                        help="accept TorchScript archives (their code runs when the model runs)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", parents=[common], help="train several seeds, one file each")
    p.add_argument("--arch", required=True, choices=["mlp", "vgg", "resnet20"])
    add_data(p)
    p.add_argument("--seeds", type=SEED, nargs="+", default=[0, 1],
                   help=f"one model per seed (0..2**32-1, at most {MAX_SEEDS})")
    p.add_argument("--out", required=True, help="folder for the model files")
    p.add_argument("--width", type=positive(MAX_WIDTH), default=1.0,
                   help=f"width multiplier, in (0, {MAX_WIDTH:g}]")
    p.add_argument("--split", default="same", choices=["same", "skewed", "dirichlet"])
    p.add_argument("--epochs", type=integer(1, MAX_EPOCHS), default=20)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", parents=[common], help="accuracy and loss of models")
    p.add_argument("models", nargs="+")
    add_data(p)
    p.add_argument("--ensemble", action="store_true", help="also the logit-averaging ensemble")
    p.add_argument("--no-bn-reset", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("merge", parents=[common], help="align and average N models")
    p.add_argument("models", nargs="+")
    p.add_argument("--method", default="cca", help=f"one of {', '.join(METHODS)}")
    add_data(p)
    p.add_argument("--out", required=True, help="the merged model file (never one of the inputs)")
    p.add_argument("--reference", type=integer(0, 2**31), default=0)
    p.add_argument("--target-model", type=integer(0, 2**31), default=None, metavar="K",
                   help="the merged model takes model K's widths and units (K becomes the "
                        "reference; models of different widths: cca, gcca); default --reference")
    p.add_argument("--target-width", type=positive(MAX_WIDTH), default=None, metavar="W",
                   help="the merged model's width (cca and gcca): built-in models' width "
                        "multiplier (the reference's layout at W), or for traced models a "
                        "fraction in (0, 1] of the reference's widths (a resized copy of it); at "
                        "most the narrowest model's; narrower compresses (default: the "
                        "reference's)")
    p.add_argument("--repair", action="store_true",
                   help="REPAIR: rescale merged units to the endpoints' statistics "
                        "(nets without BN)")
    add_merge_options(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("replay", parents=[common], help="redo a merge from its recipe")
    p.add_argument("recipe", help="recipe .json, or a merged .safetensors or TorchScript archive")
    p.add_argument("--out", required=True, help="the merged model file (never one of the inputs)")
    p.add_argument("--models", nargs="+", default=None, metavar="FILE",
                   help="your copies of the merged models: the files in the recipe's order, or "
                   "one folder searched by the sha256 the recipe records")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("interpolate", parents=[common],
                       help="loss along the path between two models")
    p.add_argument("model_a")
    p.add_argument("model_b")
    p.add_argument("--method", default="average", help=f"one of {', '.join(METHODS)}")
    add_data(p)
    p.add_argument("--steps", type=integer(2, validate.MAX_STEPS), default=11)
    add_merge_options(p)
    p.set_defaults(func=cmd_interpolate)

    p = sub.add_parser("spectrum", parents=[common],
                       help="CCA per merge point: the correlations its canonical pairs reach on "
                       "fitting and held-out images beside the ridge's shrunk singular values "
                       "and the matched units (--shared: the generalized CCA space of all "
                       "models)")
    p.add_argument("model_a")
    p.add_argument("model_b")
    p.add_argument("more", nargs="*", metavar="model", help="more models (each against model_a; "
                   "with --shared all at once)")
    p.add_argument("--shared", action="store_true",
                   help="gcca's shared space of all models: MAXVAR eigenvalues, the directions' "
                        "mean pairwise correlation fitted and on a held-out 20%%, per model its "
                        "correlation with the consensus (gamma, relative: gcca's)")
    add_data(p)
    add_method_flags(p, [get_method("cca")], SPECTRUM_OPTIONS)
    p.add_argument("--stats-samples", type=integer(2, 2**31), default=None)
    p.add_argument("--seed", type=SEED, default=0)
    p.set_defaults(func=cmd_spectrum)

    p = sub.add_parser("diagnose", parents=[common], help="why a merge works or fails: per-layer "
                       "health, partial merges, a checklist")
    p.add_argument("models", nargs="+")
    p.add_argument("--method", default="cca", help=f"one of {', '.join(METHODS)}")
    add_data(p)
    p.add_argument("--reference", type=integer(0, 2**31), default=0)
    p.add_argument("--sweep", action="store_true",
                   help="also sweep gamma (cca) or alpha/beta (zipit) on held-out training data")
    add_merge_options(p)
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("spec", parents=[common], help="merge points of a model, derived by tracing "
                       "and verified, with unsupported operations and a diagram")
    p.add_argument("model")
    add_data(p)
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
    """Run one command; returns the exit status: 0 ok, 1 unexpected error (a bug), 2 user error
    (usage, bad input), 130 interrupted (Ctrl-C), 141 stdout closed (a broken pipe). Every
    failure prints exactly one line on stderr, never a traceback (``CCAMERGE_DEBUG=1`` shows
    the traceback of an unexpected error). Run as a program (``argv`` None), the process keeps
    freed memory for reuse (:func:`ccamerge.allocator.keep_freed_memory`)."""
    if argv is None:
        keep_freed_memory()
    try:
        return _run(argv)
    except KeyboardInterrupt:
        _say("ccamerge: interrupted; no partial output was left behind")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _detach_stdout()
        _say("ccamerge: error: stdout was closed before the output was written (broken pipe)")
        return EXIT_PIPE


def _run(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors and --help: argparse already printed
        return int(exc.code or 0)
    try:
        args.ctx = init_from_env(device=args.device)
        try:
            result = args.func(args)
        finally:
            shutdown(synchronise=sys.exc_info()[0] is None)
    except CcamergeError as exc:
        _say(f"ccamerge: error: {_one_line(exc)}")
        return EXIT_USAGE
    except MemoryError:
        _say(f"ccamerge: error: out of memory in {args.command}; use smaller models or fewer "
             "--stats-samples")
        return EXIT_UNEXPECTED
    except Exception as exc:  # never a traceback for users; CCAMERGE_DEBUG=1 shows it
        if os.environ.get("CCAMERGE_DEBUG"):
            raise
        _say(f"ccamerge: unexpected error ({type(exc).__name__}): {_one_line(exc)}; this is a "
             "bug in ccamerge (CCAMERGE_DEBUG=1 shows where)")
        return EXIT_UNEXPECTED
    if not args.ctx.is_main:  # under torchrun only rank 0 reports (and writes files)
        return EXIT_OK
    if args.json:
        print(json.dumps(result, default=_jsonable))
    else:
        _print_human(result)
    sys.stdout.flush()  # a closed pipe fails here, inside main, not at exit
    return EXIT_OK


def _one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (libraries' messages may span many)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _say(line: str) -> None:
    """One line on stderr (nothing when stderr itself is closed)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (BrokenPipeError, ValueError, OSError):
        pass


def _detach_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush of a closed pipe prints no
    second error."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # captured (tests): nothing to detach
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
