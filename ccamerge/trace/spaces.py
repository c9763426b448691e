"""Channel spaces as data: segments of a tensor's channel axis, and a union-find over spaces
that collects each space's producer and consumer axes (used by :mod:`ccamerge.trace.graph`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ccamerge.spec import Axis


def make_axis(param: str, axis: int, repeat: int = 1, offset: int = 0) -> Axis:
    return Axis(param, axis, repeat, offset)


@dataclass(frozen=True)
class Seg:
    """``channels`` units of ``space`` along axis 1, each spanning ``repeat`` entries."""

    space: int
    channels: int
    repeat: int = 1


Layout = tuple[Seg, ...]


@dataclass
class Space:
    width: int
    origin: list[str]
    producers: list[Axis] = field(default_factory=list)
    consumers: list[Axis] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    opaque: bool = False


class Spaces:
    """Union-find over channel spaces; the root (lowest index) carries the merged data."""

    def __init__(self):
        self.parent: list[int] = []
        self.items: list[Space] = []

    def new(self, width: int, origin: list[str], blocked: str | None = None,
            opaque: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.items.append(Space(width, origin, blocked=[blocked] if blocked else [], opaque=opaque))
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def __getitem__(self, s: int) -> Space:
        return self.items[self.find(s)]

    def union(self, a: int, b: int) -> int:
        ra, rb = sorted((self.find(a), self.find(b)))
        if ra == rb:
            return ra
        keep, gone = self.items[ra], self.items[rb]
        if keep.width != gone.width:
            keep.blocked.append(f"a shared parameter or sum ties widths {keep.width} and "
                                f"{gone.width}")
        for name in ("origin", "producers", "consumers", "reads", "blocked"):
            getattr(keep, name).extend(getattr(gone, name))
        keep.opaque = keep.opaque and gone.opaque
        self.parent[rb] = ra
        return ra

    def block(self, s: int, reason: str) -> None:
        if reason not in self[s].blocked:
            self[s].blocked.append(reason)

    def roots(self) -> list[int]:
        return [s for s in range(len(self.parent)) if self.find(s) == s]


def entries(layout: Layout) -> int:
    return sum(seg.channels * seg.repeat for seg in layout)


def offsets(layout: Layout) -> list[tuple[Seg, int]]:
    out, start = [], 0
    for seg in layout:
        out.append((seg, start))
        start += seg.channels * seg.repeat
    return out
