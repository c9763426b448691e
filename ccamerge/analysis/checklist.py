"""A plain-language checklist computed from a :func:`ccamerge.analysis.diagnose.diagnose` report.

Each finding: ``id``, ``severity`` ("failure" explains a broken merge, "warning" weakens it,
"info"), ``title`` (one sentence with the numbers), ``next_step`` (what to try), ``chart`` (the
view that shows the evidence: "summary", "partial", "spectra", "health", "collapse" or "sweep")
and, where the next step is a setting, ``apply``: ``{"method", "options"}``.
"""

from __future__ import annotations

from ccamerge.stats import MIN_SAMPLES_PER_FEATURE

FAR_APART_RHO = 0.35  # two digits MLP seeds: ~0.6; random first layers still ~0.5
FAR_APART_MATCHED = 0.35  # matched unit pairs: digits MLP seeds 0.6-0.7; demo VGG+BN 0.30-0.48
DEAD_FRACTION = 0.25
COLLAPSE_RATIO = 0.5
UNDERTRAINED_GAP = 20.0  # accuracy points below the best model
GAP_INFO, GAP_FAILURE = 2.0, 5.0  # accuracy points the merge loses against the mean base model
SWEEP_MARGIN = 2.0  # held-out accuracy points the sweep's best must beat the setting used by
RARE_SHARE, COMMON_SHARE = 0.001, 0.02


def _finding(id_, severity, title, next_step, chart, apply: dict | None = None) -> dict:
    """One finding; ``apply`` (``{"method", "options"}``) is a setting the next step suggests,
    for a front end to apply in one click."""
    found = {"id": id_, "severity": severity, "title": title, "next_step": next_step,
             "chart": chart}
    return found | ({"apply": apply} if apply else {})


def _batchnorm(r) -> list[dict]:
    if not (r["has_batchnorm"] and not r["bn_reset"]):
        return []
    return [_finding("bn_not_reset", "failure",
                     f"BatchNorm statistics were not reset: the merged net normalises with "
                     f"averaged running statistics that match none of its units (merged "
                     f"{r['merged']['accuracy']:.1f}% vs ensemble "
                     f"{r['ensemble']['accuracy']:.1f}%).",
                     "Merge with the BatchNorm reset on (drop --no-bn-reset / tick "
                     "'Reset BatchNorm').",
                     "summary")]


def _undertrained(r) -> tuple[list[dict], set[int]]:
    accs = [b["accuracy"] for b in r["base"]]
    chance = 100.0 / r["num_classes"]
    floor = max(2 * chance, max(accs) - UNDERTRAINED_GAP)
    weak = {i for i, a in enumerate(accs) if a < floor}
    out = [_finding("undertrained", "failure",
                    f"Model {i} is under-trained: {accs[i]:.1f}% test accuracy against "
                    f"{max(accs):.1f}% for the best model; its features are not worth aligning.",
                    f"Train model {i} longer, or leave it out of the merge.", "summary")
           for i in sorted(weak)]
    return out, weak


def _label_spaces(r, skip: set[int]) -> list[dict]:
    shares = r["predicted_classes"]
    classes = max(len(s) for s in shares)
    padded = [list(s) + [0.0] * (classes - len(s)) for s in shares]
    out = []
    for i, mine in enumerate(padded):
        if i in skip:
            continue
        missing = [c for c in range(classes) if mine[c] < RARE_SHARE
                   and any(other[c] > COMMON_SHARE for j, other in enumerate(padded) if j != i)]
        if missing:
            out.append(_finding("label_spaces", "failure",
                                f"Model {i} never predicts classes {missing} that the other models "
                                "use: the models were trained on different label spaces.",
                                "Merge models trained on the same classes (a class-skewed split is "
                                "fine, a missing class is not), or compare with the ensemble.",
                                "summary"))
    return out


def _samples(r) -> list[dict]:
    thin = [p for p in r["points"] if p["samples_per_feature"] < MIN_SAMPLES_PER_FEATURE]
    if not thin:
        return []
    worst = min(thin, key=lambda p: p["samples_per_feature"])
    severity = "failure" if worst["samples_per_feature"] < 2 else "warning"
    return [_finding("few_samples", severity,
                     f"Too few statistics samples: {worst['samples_per_feature']:.1f} per feature "
                     f"at {worst['name']} ({worst['samples']} samples for {worst['width']} "
                     f"units); the covariances there are noise ({len(thin)} merge point(s) below "
                     f"{MIN_SAMPLES_PER_FEATURE:.0f}).",
                     "Collect statistics on more data (raise --stats-samples, or use the whole "
                     "training set).", "health")]


def _dissimilar(point: dict) -> bool:
    return point["mean_rho"] < FAR_APART_RHO or point["mean_matched"] < FAR_APART_MATCHED


def _far_apart(r) -> list[dict]:
    """Every merge point where the models share little, the worst named with its numbers."""
    low = [p for p in r["points"] if _dissimilar(p)]
    if not low:
        return []
    worst = min(low, key=lambda p: (p["mean_matched"], p["mean_rho"]))
    where = ", ".join(f"{p['name']} {p['mean_matched']:.2f}" for p in low)
    numbers = (f"mean matched correlation {worst['mean_matched']:.2f}, mean canonical "
               f"correlation {worst['mean_rho']:.2f}")
    count = f"{len(low)} of {len(r['points'])} merge points dissimilar"
    if worst is r["points"][0]:
        return [_finding("far_apart_early", "warning",
                         f"The models are far apart already at the first merge point "
                         f"{worst['name']} ({numbers}; {count}, matched correlation {where}): "
                         "they did not learn the same low-level features.",
                         "Check that they saw the same inputs and preprocessing; models from a "
                         "shared initialisation or more similar data merge better.", "spectra")]
    return [_finding("far_apart", "warning",
                     f"The models are far apart at {worst['name']} ({numbers}; {count}, matched "
                     f"correlation {where}): merging there averages features the models do not "
                     "share.",
                     f"Look at the partial merges: merging only the points before {worst['name']} "
                     "may keep the accuracy; models from a shared initialisation, trained longer "
                     "or on more similar data merge better at depth.", "spectra")]


def _dead(r) -> list[dict]:
    worst = max(r["points"], key=lambda p: p["dead_fraction"])
    if worst["dead_fraction"] <= DEAD_FRACTION:
        return []
    return [_finding("dead_units", "warning",
                     f"{worst['dead_fraction']:.0%} of the units at {worst['name']} never fire "
                     f"(dead units per model {worst['dead_units']}); they are paired by identity "
                     "and carry nothing.",
                     "Train with a lower learning rate or better initialisation; a narrower layer "
                     "would lose nothing.", "health")]


def _non_finite(r) -> list[dict]:
    broken = [p["name"] for p in r["points"] if p["variance_ratio"] is None]
    if not broken:
        return []
    cause = ("BatchNorm running statistics went through a transform that is not a permutation, so "
             "some running variances are negative" if r["has_batchnorm"] and not r["bn_reset"]
             else "its weights overflow")
    step = ("Merge with the BatchNorm reset on, which recomputes the running statistics."
            if r["has_batchnorm"] and not r["bn_reset"]
            else "Check the models' weights for NaN/inf and raise gamma.")
    return [_finding("non_finite", "failure",
                     f"The merged model computes NaN/inf at {', '.join(broken)}: {cause}.",
                     step, "collapse")]


def _collapse(r) -> list[dict]:
    low = [p for p in r["points"]
           if p["variance_ratio"] is not None and p["variance_ratio"] < COLLAPSE_RATIO]
    if not low:
        return []
    worst = min(low, key=lambda p: p["variance_ratio"])
    if not r["has_batchnorm"]:
        fix = "Merge with REPAIR (--repair) to rescale the merged units"
    elif r["bn_reset"]:
        fix = "BatchNorm reset is on, so look at the partial merges for the layer that breaks"
    else:
        fix = "Reset the BatchNorm statistics, which rescales every merged unit"
    return [_finding("variance_collapse", "warning",
                     f"Activations collapse in the merged model: variance at {worst['name']} is "
                     f"{worst['variance_ratio']:.2f}x the endpoints' ({len(low)} point(s) below "
                     f"{COLLAPSE_RATIO}).", fix + ".", "collapse")]


def _setting(options: dict, keys: list[str] | None = None) -> str:
    """``gamma = 1, relative = True``; only ``keys`` when given."""
    return ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}"
                     for k, v in options.items() if keys is None or k in keys)


def _gamma(r) -> list[dict]:
    sweep = r.get("sweep")
    if sweep and sweep.get("best_at_edge"):
        return [_finding("gamma_extreme", "warning",
                         f"The best {sweep['parameter']} ({_setting(sweep['best'])}) is at the "
                         "edge of the grid searched; the optimum may lie beyond it.",
                         "Extend the sweep grid in that direction.", "sweep")]
    options = r["options"]
    if r["method"] != "cca" or not options.get("relative", False):
        return []
    gamma = options["gamma"]
    if 1e-5 <= gamma <= 1e3:
        return []
    what = "nearly exact CCA, which overfits noise" if gamma < 1e-5 else "nearly a pure rotation"
    return [_finding("gamma_extreme", "warning", f"gamma = {gamma:g} is at an extreme ({what}).",
                     "Run the gamma sweep and use the best value on held-out data.", "sweep")]


def _dense_batchnorm(r) -> list[dict]:
    check = r.get("permute_check")
    if not check or not r["bn_reset"]:
        return []
    lost = check["accuracy"] - r["merged"]["accuracy"]
    if lost < GAP_INFO:
        return []
    return [_finding("dense_batchnorm", "failure" if _gap(r) >= GAP_FAILURE else "warning",
                     f"CCA's dense maps lose {lost:.1f} points to permutation matching on this "
                     f"BatchNorm net ({r['merged']['accuracy']:.1f}% vs "
                     f"{check['accuracy']:.1f}% from the same statistics): a dense map does not "
                     "commute with per-channel BatchNorm, so mixing units through it is an "
                     "approximation that only a permutation makes exact.",
                     _dense_batchnorm_step(r.get("bn_policy")), "summary")]


def _dense_batchnorm_step(policy: str | None) -> str:
    if policy == "paper":
        return ("Merge with bn_policy mapped (the default: each merged unit gets the mapped "
                "features' mean and scale), or with permute.")
    return "Merge this net with permute (or zipit); with cca, run the gamma sweep."


def _gap(r) -> float:
    """Accuracy points the merge loses against the mean base model."""
    return sum(b["accuracy"] for b in r["base"]) / len(r["base"]) - r["merged"]["accuracy"]


def _unaligned(r) -> list[dict]:
    if r["method"] != "average" or _gap(r) < GAP_INFO:
        return []
    worst = min(r["points"], key=lambda p: p["mean_same_index"] - p["mean_matched"])
    return [_finding("unaligned", "failure",
                     f"Plain averaging without alignment loses {_gap(r):.1f} points: at "
                     f"{worst['name']} units at the same position correlate "
                     f"{worst['mean_same_index']:.2f} on average, matched units "
                     f"{worst['mean_matched']:.2f}, so averaging mixes unrelated units.",
                     "Align first: merge with permute or cca.", "spectra")]


def _untuned(r) -> list[dict]:
    sweep = r.get("sweep")
    if not sweep or "current" not in sweep:
        return []
    best, current = max(sweep["accuracy"]), sweep["current"]["accuracy"]
    if best - current < SWEEP_MARGIN:
        return []
    severity = "failure" if _gap(r) >= GAP_FAILURE else "warning"
    varied = [k for k in sweep["parameter"].split(", ") if k] or None
    return [_finding("untuned", severity,
                     f"{_setting(sweep['current']['options'], varied)} is not the best setting: on "
                     f"held-out training data {_setting(sweep['best'], varied)} merges to "
                     f"{best:.1f}% against {current:.1f}%.",
                     f"Merge with {_setting(sweep['best'])} (chosen on held-out data).", "sweep",
                     apply={"method": sweep["method"], "options": dict(sweep["best"])})]


def _headline(finding: dict) -> str:
    """A finding's title up to its first colon or parenthesis, e.g. ``The models are far apart
    at conv3``."""
    return finding["title"].split(" (")[0].split(":")[0].rstrip(".")


def _causes(warnings: list[dict]) -> str:
    """What the merge-gap finding says about causes: none known, or the warnings found."""
    if not warnings:
        return " and no known cause explains it"
    return ("; no failure explains it, but these warnings may: "
            + "; ".join(_headline(w) for w in warnings))


def _summary(r, found: list[dict]) -> list[dict]:
    base = sum(b["accuracy"] for b in r["base"]) / len(r["base"])
    merged = r["merged"]["accuracy"]
    if any(f["severity"] == "failure" for f in found):
        return []
    if _gap(r) >= GAP_FAILURE:
        sweepable = r["method"] in ("cca", "zipit") and "sweep" not in r
        warnings = [f for f in found if f["severity"] == "warning"]
        return [_finding("merge_gap", "failure",
                         f"The merge loses {_gap(r):.1f} points against the mean base model"
                         f"{_causes(warnings)}. Most loss is added at {r['ranking'][0]} "
                         "(partial merges).",
                         ("Run the hyperparameter sweep: the default may not suit this network. "
                          if sweepable else "") + "Inspect that layer's spectrum and feature "
                         "matching, and compare with another method.", "partial")]
    if merged >= base - GAP_INFO:
        return [_finding("healthy", "info",
                         f"The merge is healthy: {merged:.1f}% against {base:.1f}% for the mean "
                         f"base model and {r['ensemble']['accuracy']:.1f}% for the ensemble.",
                         "Nothing to fix; try more models or another method to compare.",
                         "summary")]
    return [_finding("merge_gap", "info",
                     f"The merge loses {base - merged:.1f} points against the mean base model; "
                     f"most loss is added at {r['ranking'][0]} (partial merges).",
                     "Inspect that layer's spectrum and feature matching; "
                     "try another method or gamma.",
                     "partial")]


SEVERITY_ORDER = {"failure": 0, "warning": 1, "info": 2}


def findings_for(report: dict) -> list[dict]:
    """Every finding that applies, most severe first."""
    undertrained, weak = _undertrained(report)
    found = (_batchnorm(report) + undertrained + _label_spaces(report, weak) + _samples(report)
             + _far_apart(report) + _dead(report) + _non_finite(report) + _collapse(report)
             + _unaligned(report) + _untuned(report) + _gamma(report) + _dense_batchnorm(report))
    found += _summary(report, found)
    return sorted(found, key=lambda f: SEVERITY_ORDER[f["severity"]])
