"""The registry of alignment methods (:data:`METHODS`): the single source for CLI flags and
choices, dashboard widgets and option validation. Each method lives in its own module with one
solver and one ``METHOD`` entry (see :mod:`ccamerge.methods.base`); adding a method here makes
it appear in every front end.
"""

from __future__ import annotations

from ccamerge.errors import CcamergeError
from ccamerge.methods import average, cca, gcca, ot, permute, weight_matching, zipit
from ccamerge.methods.base import Method

METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in [
    average, permute, weight_matching, zipit, ot, cca, gcca]}


def get_method(name: str) -> Method:
    """The registry entry of ``name``; an unknown name fails and lists the valid ones."""
    if name not in METHODS:
        raise CcamergeError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def mixed_width_methods() -> list[str]:
    """The methods that merge models whose widths differ."""
    return [m.name for m in METHODS.values() if m.mixed_widths]


def describe_methods() -> dict:
    """JSON-able registry: name -> summary, options with defaults and ranges, needs data or
    not."""
    return {m.name: {"summary": m.summary, "needs_data": m.statistics is not None,
                     "exact": m.exact, "joint": m.joint, "mixed_widths": m.mixed_widths,
                     "options": {k: {"default": o.default, "type": o.kind.__name__, "help": o.help,
                                     "minimum": o.minimum, "maximum": o.maximum}
                                 for k, o in m.options.items()}}
            for m in METHODS.values()}
