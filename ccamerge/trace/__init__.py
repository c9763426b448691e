"""Merge points of any traceable model: derive them by tracing (torch.fx, or a replay of a
TorchScript archive), verify them with a random permutation, explain them (tables, diagrams).

Modules: ``derive`` (the entry points), ``graph`` (propagation of channel spaces through the fx
graph), ``ops`` (the table of supported operations), ``spaces`` (channel layouts), ``eager``
(layers kept as leaves), ``torchscript`` (archive IO and replay), ``explain`` (reports).
"""

from ccamerge.trace.derive import DerivedSpec, derive_and_verify, derive_spec, verify
from ccamerge.trace.explain import explain
from ccamerge.trace.torchscript import (
    is_torchscript_archive,
    load_torchscript,
    script_to_module,
    with_script_state,
)

__all__ = ["DerivedSpec", "derive_and_verify", "derive_spec", "explain", "is_torchscript_archive",
           "load_torchscript", "script_to_module", "verify", "with_script_state"]
