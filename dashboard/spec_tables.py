"""Tables of the Merge points page, from ``ccamerge.trace.explain.explain``'s JSON (rows of plain
values; no ``st.*``, so plain pytest tests them)."""

from __future__ import annotations


def axis_text(axis: dict) -> str:
    """``fc1.weight[0]``, with ``×r`` when each feature spans ``r`` entries (a flatten) and
    ``+o`` when its block starts at entry ``o`` (a concatenation)."""
    text = f"{axis['param']}[{axis['axis']}]"
    if axis.get("repeat", 1) != 1:
        text += f" ×{axis['repeat']}"
    if axis.get("offset", 0):
        text += f" +{axis['offset']}"
    return text


def point_rows(report: dict) -> list[dict]:
    """One row per merge point: (for a built-in family, the name its hand-written spec and the
    other pages use), width, the module(s) whose output gives its features, the parameters (and
    axes) that produce and consume them, and its verification."""
    tolerance, written = report.get("tolerance"), report.get("hand_written_names") or {}
    rows = []
    for p in report["points"]:
        diff = p.get("verification")
        hand = {"hand-written name": written.get(p["name"])} if written else {}
        rows.append({"merge point": p["name"], **hand, "width": p["width"],
                     "features from": ", ".join(p["features"]),
                     "producers": ", ".join(axis_text(a) for a in p["producers"]),
                     "consumers": ", ".join(axis_text(a) for a in p["consumers"]),
                     "max |Δ output|": diff,
                     "verified": None if diff is None or tolerance is None else diff <= tolerance})
    return rows


def verification_rows(report: dict) -> list[dict]:
    """Max |output difference| after a random permutation of each merge point alone and of all
    together (``all``), against the tolerance; rejected points (dropped from the spec) last."""
    tolerance = report.get("tolerance")
    rows = [{"merge point": name, "max |Δ output|": diff, "tolerance": tolerance,
             "result": "pass" if tolerance is not None and diff <= tolerance else "fail",
             "used": True}
            for name, diff in (report.get("verification") or {}).items()]
    rows += [{"merge point": name, "max |Δ output|": diff, "tolerance": tolerance,
              "result": "fail", "used": False}
             for name, diff in (report.get("rejected") or {}).items()]
    return rows


def unsupported_rows(report: dict) -> list[dict]:
    return [{"operation": u.get("op"), "where": u.get("location"), "reason": u.get("reason")}
            for u in report.get("unsupported") or []]


def max_difference(report: dict) -> float | None:
    values = list((report.get("verification") or {}).values())
    return max(values) if values else None
