"""Reference architectures: an MLP, a VGG-style convnet and a ResNet20-style net.

Every model stores the keyword arguments that built it in ``model.config`` and its family name in
``model.arch``, so ``build_model(model.arch, **model.config)`` rebuilds an identical (untrained)
network. Activations are separate ``nn.ReLU`` modules (never the functional form) so that forward
hooks can read the features of each merge point.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ccamerge.errors import CcamergeError


def _scaled(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


class MLP(nn.Module):
    """Fully connected net: flatten -> [Linear -> ReLU] * len(hidden) -> Linear.

    Input ``[B, C, H, W]`` (or anything that flattens to ``C*H*W``), output logits ``[B, classes]``.
    Hidden widths are ``round(h * width)`` for each ``h`` in ``hidden``.
    """

    arch = "mlp"

    def __init__(self, *, in_channels=1, image_size=8, num_classes=10, hidden=(128, 128), width=1.0):
        super().__init__()
        self.config = dict(in_channels=in_channels, image_size=image_size,
                           num_classes=num_classes, hidden=list(hidden), width=width)
        sizes = [in_channels * image_size * image_size] + [_scaled(h, width) for h in hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def default_vgg_cfg(image_size: int) -> list:
    """A VGG-style layer list for square inputs of ``image_size`` pixels (ints = conv widths at x1,
    "M" = 2x2 max-pool). Small images get fewer pools so the map never shrinks below 2x2."""
    pools = max(1, min(3, int(math.log2(image_size)) - 1))
    blocks = [[16, 16], [32, 32], [64, 64], [128, 128]]
    cfg: list = []
    for stage in range(pools):
        cfg += blocks[stage] + ["M"]
    return cfg + blocks[pools][:1]


class VGG(nn.Module):
    """VGG-style convnet: ``features`` (3x3 convs, optional BatchNorm, ReLU, 2x2 max-pools from
    ``cfg``) -> flatten -> ``classifier`` (optional hidden Linear+ReLU layers, then Linear).

    Input ``[B, C, S, S]``, output ``[B, classes]``. Conv widths are ``round(c * width)``.
    """

    arch = "vgg"

    def __init__(self, *, in_channels=1, image_size=8, num_classes=10, cfg=None, width=1.0,
                 batch_norm=False, classifier=()):
        super().__init__()
        cfg = list(cfg) if cfg is not None else default_vgg_cfg(image_size)
        self.config = dict(in_channels=in_channels, image_size=image_size, num_classes=num_classes,
                           cfg=cfg, width=width, batch_norm=batch_norm, classifier=list(classifier))
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
                continue
            out = _scaled(int(item), width)
            layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU())
            channels = out
        if size < 1:
            raise CcamergeError(f"VGG cfg {cfg} pools a {image_size}px input below 1 pixel; use fewer 'M'")
        self.features = nn.Sequential(*layers)
        self.flat_size = size * size
        sizes = [channels * size * size] + [_scaled(h, width) for h in classifier]
        head: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            head += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        head.append(nn.Linear(sizes[-1], num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm; output ``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))``.
    The shortcut is a 1x1 conv + BatchNorm when stride or width changes, else the identity."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet20-style net: stem (conv 3x3, BN, ReLU) -> three stages of ``blocks`` BasicBlocks with
    16w, 32w, 64w channels (stride 2 entering stages 2 and 3) -> global average pool -> Linear.

    Input ``[B, C, S, S]``, output ``[B, classes]``.
    """

    arch = "resnet20"

    def __init__(self, *, in_channels=1, image_size=8, num_classes=10, width=1.0, blocks=3):
        super().__init__()
        self.config = dict(in_channels=in_channels, image_size=image_size,
                           num_classes=num_classes, width=width, blocks=blocks)
        planes = [_scaled(c, width) for c in (16, 32, 64)]
        self.conv = nn.Conv2d(in_channels, planes[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU()
        stages, in_planes = [], planes[0]
        for index, width_s in enumerate(planes):
            stride = 1 if index == 0 else 2
            stage = [BasicBlock(in_planes, width_s, stride)]
            stage += [BasicBlock(width_s, width_s, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            in_planes = width_s
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(planes[-1], num_classes)

    def forward(self, x):
        out = self.stages(self.relu(self.bn(self.conv(x))))
        return self.fc(self.flatten(self.pool(out)))


ARCHITECTURES: dict[str, type[nn.Module]] = {"mlp": MLP, "vgg": VGG, "resnet20": ResNet20}


def build_model(arch: str, **config) -> nn.Module:
    """Build an untrained model of family ``arch`` ("mlp", "vgg", "resnet20") from its config."""
    if arch not in ARCHITECTURES:
        raise CcamergeError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    try:
        return ARCHITECTURES[arch](**config)
    except TypeError as exc:
        raise CcamergeError(f"bad config for {arch}: {exc}") from exc


def describe(model: nn.Module) -> dict:
    """``{"arch": name, "config": {...}}`` for a model built here; raises for foreign modules."""
    if getattr(model, "arch", None) not in ARCHITECTURES:
        raise CcamergeError(f"{type(model).__name__} is not a ccamerge architecture")
    return {"arch": model.arch, "config": dict(model.config)}


def same_architecture(models: list[nn.Module]) -> None:
    """Raise a CcamergeError naming the first model whose architecture or config differs from model 0."""
    first = describe(models[0])
    for index, model in enumerate(models[1:], start=1):
        other = describe(model)
        if other != first:
            diff = [k for k in set(first["config"]) | set(other["config"])
                    if first["config"].get(k) != other["config"].get(k)]
            what = "architecture" if other["arch"] != first["arch"] else ", ".join(sorted(diff))
            raise CcamergeError(
                f"model {index} does not match model 0 ({what}: {other['arch']} {other['config']} vs "
                f"{first['arch']} {first['config']}); only models of one architecture and size merge")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Eval-mode logits ``[B, classes]`` for inputs ``x`` ``[B, ...]``, in batches."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
