"""Explain a derived spec: JSON for ``ccamerge spec MODEL --json`` and the dashboard, and
diagrams of the network with its merge points marked (Graphviz DOT and Mermaid text; no
Graphviz binary needed)."""

from __future__ import annotations

from dataclasses import asdict

from ccamerge.spec import Axis
from ccamerge.trace.derive import DerivedSpec

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#7f7f7f", "#d62728")
FEATURE_FILL = "#d9ecff"
UNSUPPORTED_FILL = "#ffd6d6"


def _axis(axis: Axis) -> dict:
    return asdict(axis)


def _layer(param: str) -> str:
    return param.rsplit(".", 1)[0]


def explain(derived: DerivedSpec, *, diagrams: bool = True) -> dict:
    """JSON-able account of ``derived``: every merge point (width, feature modules, producer and
    consumer axes, the layers they tie together), unsupported operations with reasons, channel
    groups left unmerged, notes, verification, the graph's nodes (``graph``, for custom
    rendering) and ``dot`` / ``mermaid`` diagrams."""
    points = []
    for p in derived.spec.points:
        points.append({
            "name": p.name, "width": p.width, "features": list(p.features),
            "layers": list(dict.fromkeys(_layer(a.param) for a in p.producers + p.consumers)),
            "producers": [_axis(a) for a in p.producers],
            "consumers": [_axis(a) for a in p.consumers],
            "verification": (derived.verification or {}).get(p.name)})
    out = {"points": points, "unsupported": list(derived.unsupported),
           "unmerged": list(derived.unmerged), "notes": list(derived.notes),
           "verification": derived.verification, "tolerance": derived.tolerance,
           "verified": derived.verified, "rejected": dict(derived.rejected),
           "graph": list(derived.graph)}
    if diagrams:
        out["dot"], out["mermaid"] = to_dot(derived), to_mermaid(derived)
    return out


def _colors(derived: DerivedSpec) -> dict[str, str]:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(derived.spec.names)}


def _node_label(row: dict) -> str:
    head = row["module"] or row["id"]
    lines = [head, row["op"]]
    if row["shape"]:
        lines.append(f"[{', '.join(str(d) for d in row['shape'][1:])}]")
    if row["features_of"]:
        lines.append(f"features of {row['features_of']}")
    if row["unsupported"]:
        lines.append("unsupported")
    return "\n".join(lines)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(derived: DerivedSpec) -> str:
    """Graphviz DOT text: one box per operation; feature modules filled blue, unsupported
    operations red; edges carrying a merge point's channels coloured and labelled with it."""
    colors, points = _colors(derived), {p.name: p for p in derived.spec.points}
    lines = ["digraph ccamerge {", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fillcolor=white, fontname=Helvetica, '
             "fontsize=10];", "  edge [fontname=Helvetica, fontsize=9];"]
    rows = {row["id"]: row for row in derived.graph}
    for row in derived.graph:
        fill, extra = "white", ""
        if row["unsupported"]:
            fill, extra = UNSUPPORTED_FILL, ", shape=octagon"
        elif row["features_of"]:
            fill = FEATURE_FILL
        if row["kind"] in ("input", "output"):
            extra = ", shape=ellipse"
        tip = f", tooltip={_quote(row['unsupported'])}" if row["unsupported"] else ""
        lines.append(f"  {_quote(row['id'])} [label={_quote(_node_label(row))}, "
                     f"fillcolor={_quote(fill)}{extra}{tip}];")
    for row in derived.graph:
        for source in row["inputs"]:
            carried = rows[source]["points"]
            if carried:
                label = ", ".join(f"{n} ({points[n].width})" for n in carried)
                lines.append(f"  {_quote(source)} -> {_quote(row['id'])} [label={_quote(label)}, "
                             f"color={_quote(colors[carried[0]])}, penwidth=2];")
            else:
                lines.append(f"  {_quote(source)} -> {_quote(row['id'])};")
    lines.append("}")
    return "\n".join(lines)


def _mermaid_text(text: str) -> str:
    return text.replace('"', "#quot;").replace("\n", "<br/>")


def to_mermaid(derived: DerivedSpec) -> str:
    """Mermaid ``flowchart`` text of the same diagram as :func:`to_dot`."""
    ids = {row["id"]: f"n{i}" for i, row in enumerate(derived.graph)}
    rows = {row["id"]: row for row in derived.graph}
    lines = ["flowchart TD"]
    for row in derived.graph:
        lines.append(f'  {ids[row["id"]]}["{_mermaid_text(_node_label(row))}"]')
    for row in derived.graph:
        for source in row["inputs"]:
            carried = rows[source]["points"]
            arrow = f'==>|"{_mermaid_text(", ".join(carried))}"|' if carried else "-->"
            lines.append(f"  {ids[source]} {arrow} {ids[row['id']]}")
    lines += [f"  classDef feature fill:{FEATURE_FILL},stroke:#1f77b4",
              f"  classDef unsupported fill:{UNSUPPORTED_FILL},stroke:#d62728"]
    features = [ids[r["id"]] for r in derived.graph if r["features_of"]]
    failed = [ids[r["id"]] for r in derived.graph if r["unsupported"]]
    if features:
        lines.append(f"  class {','.join(features)} feature")
    if failed:
        lines.append(f"  class {','.join(failed)} unsupported")
    return "\n".join(lines)

