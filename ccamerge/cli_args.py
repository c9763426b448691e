"""The CLI's arguments: flags generated from the method registry (one per option, typed by the
:class:`~ccamerge.methods.Option`), and argparse types that refuse out-of-range or non-finite
numbers in one usage line (exit 2) before any work."""

from __future__ import annotations

import argparse
import math

from ccamerge import validate
from ccamerge.batchnorm import DEFAULT_POLICY, POLICIES
from ccamerge.data import DATASETS
from ccamerge.methods import METHODS, Option, get_method
from ccamerge.moments import PRODUCTS
from ccamerge.spec import STREAM_POINTS

OPTION_DEST = "method_option:"  # argparse dest prefix of the flags made from the registry
MAX_WIDTH = 64.0  # --width: x64 of the reference widths
MAX_EPOCHS = 10_000
MAX_SEEDS = 1000  # models one `ccamerge train` writes


def integer(low: int, high: int):
    """An argparse type: an integer in ``low..high``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in {low}..{high}, got {value}")
        return value
    return parse


def positive(high: float):
    """An argparse type: a finite number in ``(0, high]``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and 0 < value <= high):
            raise argparse.ArgumentTypeError(f"must be a number in (0, {high:g}], got {text}")
        return value
    return parse


SEED = integer(0, validate.MAX_SEED)


def add_data(p) -> None:
    """``--data`` and ``--data-dir``."""
    p.add_argument("--data", default="digits",
                   help=f"dataset: {', '.join(DATASETS)}, an .npz file, a folder of .npy files or "
                   "an image folder (root/<class>/*.png) (default: digits)")
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


def add_method_flags(p, methods, only=None) -> None:
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


def add_merge_options(p) -> None:
    """Every method's flags and the merge settings (BatchNorm reset and policy, statistics)."""
    add_method_flags(p, METHODS.values())
    p.add_argument("--no-bn-reset", action="store_true",
                   help="keep the averaged BatchNorm statistics")
    p.add_argument("--bn-policy", choices=list(POLICIES), default=DEFAULT_POLICY,
                   help="mapped (default): fold BatchNorm into the conv first and give each merged "
                   "unit the mean and scale of the mapped endpoint features (from the original "
                   "models' statistics; exact for permutations); paper: transform BatchNorm "
                   "vectors with the conv rows, as the paper's code does")
    p.add_argument("--reset-base-bn", action="store_true",
                   help="recompute the base models' BatchNorm statistics on the training images "
                   "before merging (as the official code does)")
    p.add_argument("--stream-points", choices=list(STREAM_POINTS), default="pooled",
                   help="residual stream statistics: pooled over the stem and every block output "
                   "(default) or read at the last block of each stage only (the official code)")
    p.add_argument("--products", choices=list(PRODUCTS), default="float32",
                   help="precision of the statistics pass's products: float32 (default) or "
                   "bfloat16 (centred, summed in float32: faster on CPUs with AMX or "
                   "AVX512-BF16, covariances to about 1e-3)")
    p.add_argument("--stats-samples", type=integer(2, 2**31), default=None,
                   help="training images used for statistics, >= 2 (default: all)")
    p.add_argument("--seed", type=SEED, default=0)


class Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, like every other error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
