"""What the library offers that pages show, named once so pages import only ``dashboard.*``:
the method registry, the model families, the feature explorer's embeddings and networks, the
widest matrix a chart draws unit by unit and the share of training images the Spectra page holds
out.
"""

from __future__ import annotations

from ccamerge.analysis.explorer import EMBEDDINGS as EXPLORER_EMBEDDINGS
from ccamerge.analysis.explorer import GROUPS as EXPLORER_GROUPS
from ccamerge.analysis.features import MAX_DISPLAY as MAX_DISPLAY_UNITS
from ccamerge.analysis.spectra import HOLDOUT as SPECTRA_HOLDOUT
from ccamerge.cli import option_flags as _option_flags
from ccamerge.methods import METHODS
from ccamerge.models import ARCHITECTURES

__all__ = ["ARCHITECTURES", "EXPLORER_EMBEDDINGS", "EXPLORER_GROUPS", "MAX_DISPLAY_UNITS",
           "METHODS", "SPECTRA_HOLDOUT", "joint_methods", "methods_help",
           "option_flags", "pairwise_methods"]


def pairwise_methods() -> list[str]:
    """Methods that align one model to another (they define a path between two models)."""
    return [name for name, spec in METHODS.items() if not spec.joint]


def joint_methods() -> list[str]:
    """Methods that align every model at once (no path between two models)."""
    return [name for name, spec in METHODS.items() if spec.joint]


def option_flags(method: str, options: dict) -> str:
    """The command-line flags that give ``method`` these ``options``: ``--gamma 0.1
    --relative``."""
    return " ".join(_option_flags(method, options))


def methods_help() -> str:
    """One Markdown line per method, ``**name**: summary``, for a method picker's help."""
    return "  \n".join(f"**{name}**: {spec.summary}" for name, spec in METHODS.items())
