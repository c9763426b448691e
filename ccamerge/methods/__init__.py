"""Alignment methods: the registry (:data:`METHODS`) and one module per method (average, permute,
weight_matching, zipit, ot, cca), all with one signature (see :mod:`ccamerge.methods.base`)."""

from ccamerge.methods.base import AlignContext, Alignment, Method, Option, hungarian
from ccamerge.methods.registry import METHODS, describe_methods, get_method

__all__ = ["METHODS", "AlignContext", "Alignment", "Method", "Option", "describe_methods",
           "get_method", "hungarian"]
