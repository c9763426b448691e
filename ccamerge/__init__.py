"""ccamerge: merge neural networks with Canonical Correlation Analysis, and see why a merge works
or fails.

    >>> from ccamerge import load_model, load_dataset, merge
    >>> models = [load_model(p) for p in ["a.safetensors", "b.safetensors"]]
    >>> result = merge(models, load_dataset("digits"), "cca", gamma=0.1)
    >>> save_model(result.model, "merged.safetensors", info={"merge": result.recipe})
"""

from ccamerge.api import MergeResult, align, interpolate, merge, spectrum
from ccamerge.data import Dataset, load_dataset
from ccamerge.errors import CcamergeError
from ccamerge.io import load_model, save_model
from ccamerge.methods import METHODS, describe_methods, get_method
from ccamerge.models import build_model
from ccamerge.spec import AlignmentSpec, build_spec

__all__ = ["METHODS", "AlignmentSpec", "CcamergeError", "Dataset", "MergeResult", "align",
           "build_model", "build_spec", "describe_methods", "get_method", "interpolate",
           "load_dataset", "load_model", "merge", "save_model", "spectrum"]
