"""Merge points as data: which hidden units several parameters share, and where to read them.

An :class:`AlignmentSpec` lists :class:`MergePoint` s. Each names

* ``features``: the modules whose outputs (channel axis 1) are the point's features; a residual
  stream lists every block writing into it, and their samples are pooled;
* ``producers``: parameter axes that create the features (rows of a weight, a bias, BatchNorm
  vectors): a transform ``T`` acts on them as ``T^T @ p`` along that axis;
* ``consumers``: parameter axes that read them (columns of the next weight): ``p @ T^-T``.

``Axis.repeat`` handles a Linear after the flatten of a ``[C, H, W]`` map: its input axis has
``C * H * W`` entries, channel-major, so the transform acts on blocks of ``repeat = H * W``.
``Axis.offset`` handles a layer reading a channel concatenation: the point's ``width * repeat``
entries start at ``offset`` along the axis.
One generic function (``transform.apply_transforms``) applies any spec; nothing else in the
library knows an architecture's wiring.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ccamerge.errors import CcamergeError

BN_VECTORS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class Axis:
    """One axis of one state-dict entry that indexes a merge point's features."""

    param: str
    axis: int
    repeat: int = 1
    offset: int = 0

    def span(self, width: int) -> slice:
        """The entries of this axis that belong to a merge point of ``width`` units."""
        return slice(self.offset, self.offset + width * self.repeat)


@dataclass(frozen=True)
class MergePoint:
    name: str
    width: int
    features: tuple[str, ...]
    producers: tuple[Axis, ...]
    consumers: tuple[Axis, ...]


@dataclass(frozen=True)
class AlignmentSpec:
    points: tuple[MergePoint, ...]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.points]

    def point(self, name: str) -> MergePoint:
        for point in self.points:
            if point.name == name:
                return point
        raise CcamergeError(f"no merge point {name!r}; the spec has {self.names}")

    def axes_by_param(self) -> dict[str, list[tuple[Axis, MergePoint, str]]]:
        """``param -> [(axis, merge point, "producer" | "consumer"), ...]``."""
        table: dict[str, list[tuple[Axis, MergePoint, str]]] = {}
        for point in self.points:
            for role, axes in (("producer", point.producers), ("consumer", point.consumers)):
                for axis in axes:
                    table.setdefault(axis.param, []).append((axis, point, role))
        return table

    def to_dict(self) -> dict:
        return {"points": [asdict(p) for p in self.points]}

    @staticmethod
    def from_dict(data: dict) -> AlignmentSpec:
        points = []
        for p in data["points"]:
            points.append(MergePoint(
                name=p["name"], width=int(p["width"]), features=tuple(p["features"]),
                producers=tuple(Axis(**a) for a in p["producers"]),
                consumers=tuple(Axis(**a) for a in p["consumers"])))
        return AlignmentSpec(tuple(points))


STREAM_POINTS = ("pooled", "last")  # what a residual stream's statistics read


def with_stream_points(spec: AlignmentSpec, which: str) -> AlignmentSpec:
    """``spec`` with the feature modules its statistics read: ``"pooled"`` keeps every module
    writing a point (a residual stream's stem and block outputs, their samples pooled);
    ``"last"`` keeps only the last of each point (features are in forward order: a stream's
    last block output, the stream's final state, as the official code reads it). Producers and
    consumers are unchanged."""
    if which not in STREAM_POINTS:
        raise CcamergeError(f"stream_points must be one of {STREAM_POINTS}, not {which!r}")
    if which == "pooled":
        return spec
    return AlignmentSpec(tuple(MergePoint(p.name, p.width, p.features[-1:], p.producers,
                                          p.consumers) for p in spec.points))


def point_key(point: MergePoint) -> tuple:
    """What a merge point is, up to its name and the order of its features and axes."""
    return (point.width, frozenset(point.features), frozenset(point.producers),
            frozenset(point.consumers))


def same_points(a: AlignmentSpec, b: AlignmentSpec) -> bool:
    """True when ``a`` and ``b`` have the same merge points, up to names and axis order (e.g. a
    traced spec against the hand-written one)."""
    return {point_key(p) for p in a.points} == {point_key(p) for p in b.points}


def matching_names(a: AlignmentSpec, b: AlignmentSpec) -> dict[str, str]:
    """``{name in a: name in b}`` for the points of ``a`` that ``b`` has too (up to names and
    axis order)."""
    names = {point_key(p): p.name for p in b.points}
    return {p.name: names[point_key(p)] for p in a.points if point_key(p) in names}


def _linear_or_conv_producers(prefix: str, module: nn.Module) -> list[Axis]:
    axes = [Axis(f"{prefix}.weight", 0)]
    if getattr(module, "bias", None) is not None:
        axes.append(Axis(f"{prefix}.bias", 0))
    return axes


def _bn_producers(prefix: str) -> list[Axis]:
    return [Axis(f"{prefix}.{v}", 0) for v in BN_VECTORS]


def _sequential_spec(model: nn.Module, containers: list[str],
                     repeats: dict[str, int]) -> AlignmentSpec:
    """Spec for a plain chain (MLP, VGG): every Linear/Conv followed by an activation opens a merge
    point that its [BatchNorm ->] ReLU defines and the next Linear/Conv consumes.
    ``repeats`` gives the flatten block size seen by a consumer module, by module name."""
    chain = [(f"{c}.{n}", m) for c in containers for n, m in getattr(model, c).named_children()]
    points: list[MergePoint] = []
    pending: tuple[str, int, list[Axis]] | None = None  # (feature module, width, producers)
    kind = "fc"
    for name, module in chain:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if pending is not None:
                feat, width, producers = pending
                consumer = Axis(f"{name}.weight", 1, repeats.get(name, 1))
                points.append(MergePoint(f"{kind}{len(points) + 1}", width, (feat,),
                                         tuple(producers), (consumer,)))
                pending = None
            current = _linear_or_conv_producers(name, module)
            kind = "fc" if isinstance(module, nn.Linear) else "conv"
            width = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        elif isinstance(module, nn.BatchNorm2d):
            current += _bn_producers(name)
        elif isinstance(module, nn.ReLU):
            pending = (name, width, current)
    return AlignmentSpec(tuple(points))


def _mlp_spec(model) -> AlignmentSpec:
    return _sequential_spec(model, ["layers"], {})


def _vgg_spec(model) -> AlignmentSpec:
    first_fc = next(n for n, m in model.classifier.named_children() if isinstance(m, nn.Linear))
    return _sequential_spec(model, ["features", "classifier"],
                            {f"classifier.{first_fc}": model.flat_size})


def _resnet_spec(model) -> AlignmentSpec:
    """Stream merge point per stage (stem/shortcuts/conv2 write it, conv1/shortcuts/fc read it),
    plus one internal merge point per block between conv1 and conv2. Points are in depth order:
    each stream before the blocks that read and write it."""
    points: list[MergePoint] = []
    stream = _Stream(model.conv.out_channels, [Axis("conv.weight", 0)] + _bn_producers("bn"),
                     ["relu"])
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage):
            pre = f"stages.{s}.{b}"
            if not isinstance(block.shortcut, nn.Identity):  # reads the old stream, opens a new one
                stream.consumers += [Axis(f"{pre}.conv1.weight", 1),
                                     Axis(f"{pre}.shortcut.0.weight", 1)]
                points.insert(stream.slot, stream.close(f"stream{s}"))
                stream = _Stream(block.conv2.out_channels, [Axis(f"{pre}.shortcut.0.weight", 0)]
                                 + _bn_producers(f"{pre}.shortcut.1"), [], slot=len(points))
            else:
                stream.consumers.append(Axis(f"{pre}.conv1.weight", 1))
            points.append(MergePoint(
                f"block{s + 1}.{b + 1}", block.conv1.out_channels, (f"{pre}.relu1",),
                tuple([Axis(f"{pre}.conv1.weight", 0)] + _bn_producers(f"{pre}.bn1")),
                (Axis(f"{pre}.conv2.weight", 1),)))
            stream.producers += [Axis(f"{pre}.conv2.weight", 0)] + _bn_producers(f"{pre}.bn2")
            stream.features.append(f"{pre}.relu2")
    stream.consumers.append(Axis("fc.weight", 1))
    points.insert(stream.slot, stream.close(f"stream{len(model.stages)}"))
    return AlignmentSpec(tuple(points))


class _Stream:
    """A residual stream being collected while walking the blocks."""

    def __init__(self, width: int, producers: list[Axis], features: list[str], slot: int = 0):
        self.width, self.producers, self.features, self.slot = width, producers, features, slot
        self.consumers: list[Axis] = []

    def close(self, name: str) -> MergePoint:
        return MergePoint(name, self.width, tuple(self.features), tuple(self.producers),
                          tuple(self.consumers))


_BUILDERS = {"mlp": _mlp_spec, "vgg": _vgg_spec, "resnet20": _resnet_spec}


def model_widths(models, spec: AlignmentSpec) -> dict[str, list[int]]:
    """``{point: [width of model i, ...]}``: the widths of ``spec`` for every model, except that
    when built-in models' configs differ (one family, other widths) each built-in model reads
    the width of each point from its own hand-written spec (the same point names)."""
    widths = {p.name: [p.width] * len(models) for p in spec.points}
    configs = [getattr(m, "config", None) for m in models]
    if all(c == configs[0] for c in configs):
        return widths
    for i, model in enumerate(models):
        if getattr(model, "arch", None) in _BUILDERS:
            own = {p.name: p.width for p in build_spec(model).points}
            for name, row in widths.items():
                row[i] = own.get(name, row[i])
    return widths


def resized_spec(spec: AlignmentSpec, widths: dict[str, int]) -> AlignmentSpec:
    """``spec`` for a model of the same family whose width at point ``name`` is
    ``widths[name]`` (points not named keep theirs). Along an axis that several points share (a
    layer reading a concatenation) each block's ``offset`` moves by the width changes of the
    blocks before it; entries of no point (e.g. input channels) keep their size."""
    if all(widths.get(p.name, p.width) == p.width for p in spec.points):
        return spec
    growth: dict[tuple[str, int], list[tuple[int, int]]] = {}  # (param, axis) -> [(offset, +n)]
    for point in spec.points:
        extra = widths.get(point.name, point.width) - point.width
        for axis in point.producers + point.consumers:
            growth.setdefault((axis.param, axis.axis), []).append(
                (axis.offset, extra * axis.repeat))

    def moved(axis: Axis) -> Axis:
        shift = sum(d for o, d in growth[(axis.param, axis.axis)] if o < axis.offset)
        return Axis(axis.param, axis.axis, axis.repeat, axis.offset + shift)

    return AlignmentSpec(tuple(MergePoint(
        p.name, widths.get(p.name, p.width), p.features, tuple(map(moved, p.producers)),
        tuple(map(moved, p.consumers))) for p in spec.points))


def build_spec(model: nn.Module) -> AlignmentSpec:
    """The hand-written alignment spec of a ccamerge architecture (``model.arch``)."""
    arch = getattr(model, "arch", None)
    if arch not in _BUILDERS:
        raise CcamergeError(f"no alignment spec for {type(model).__name__}; "
                            f"built-in families are {sorted(_BUILDERS)}")
    return _BUILDERS[arch](model)
