"""The merge-point report: JSON-able, with DOT and Mermaid diagrams."""

from __future__ import annotations

import json

from traced_nets import (
    AttentionNet,
    make,
)

from ccamerge.trace.derive import (
    derive_and_verify,
)
from ccamerge.trace.explain import explain, to_dot, to_mermaid


# explanation -----------------------------------------------------------------------------------
def test_explain_is_json_with_diagrams(x):
    derived = derive_and_verify(make(AttentionNet), x[:16])
    info = json.loads(json.dumps(explain(derived)))
    assert [p["name"] for p in info["points"]] == derived.spec.names
    point = info["points"][0]
    assert {"producers", "consumers", "features", "width", "layers"} <= set(point)
    assert {"param", "axis", "repeat", "offset"} == set(point["producers"][0])
    assert info["unsupported"][0]["reason"] and info["verified"]
    dot, mermaid = info["dot"], info["mermaid"]
    assert dot.startswith("digraph") and "octagon" in dot and derived.spec.names[0] in dot
    assert mermaid.startswith("flowchart TD") and "class " in mermaid
    assert to_dot(derived) == dot and to_mermaid(derived) == mermaid
