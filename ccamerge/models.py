"""Reference architectures: an MLP, a VGG-style convnet and a ResNet20-style net.

Every model stores the keyword arguments that built it in ``model.config`` and its family name in
``model.arch``, so ``build_model(model.arch, **model.config)`` rebuilds an identical (untrained)
network. Activations are separate ``nn.ReLU`` modules (never the functional form) so that forward
hooks can read the features of each merge point.

Inputs: the MLP takes feature vectors ``[B, F]`` (config ``in_features``) or images of any shape
(flattened); the convnets take images ``[B, C, H, W]`` of any channel count, height and width. A
config records the shape as ``in_features: F``, ``in_channels: C`` + ``image_size: S`` (square
images: the form saved files have always used) or ``image_shape: [C, H, W]`` (other images); any
of the forms is accepted and stored in this canonical one.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ccamerge.errors import CcamergeError


def _scaled(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


DEFAULT_SHAPE = (1, 8, 8)  # the digits


def _positive(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value \
            or value < 1:
        raise CcamergeError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def resolve_input_shape(*, in_features=None, image_shape=None, in_channels=None,
                        image_size=None) -> tuple[int, ...]:
    """One sample's shape, ``(F,)`` or ``(C, H, W)``, from whichever config form is given
    (``in_channels`` defaults to 1 and ``image_size`` to 8; nothing given: ``(1, 8, 8)``)."""
    forms = [in_features is not None, image_shape is not None,
             in_channels is not None or image_size is not None]
    if sum(forms) > 1:
        raise CcamergeError("give the input shape one way: in_features, image_shape, or "
                            "in_channels with image_size")
    if in_features is not None:
        return (_positive(in_features, "in_features"),)
    if image_shape is not None:
        if not isinstance(image_shape, list | tuple) or len(image_shape) != 3:
            raise CcamergeError(f"image_shape must be [C, H, W], got {image_shape!r}")
        return tuple(_positive(d, "every entry of image_shape") for d in image_shape)
    size = _positive(DEFAULT_SHAPE[1] if image_size is None else image_size, "image_size")
    return _positive(DEFAULT_SHAPE[0] if in_channels is None else in_channels, "in_channels"), \
        size, size


def shape_config(shape: tuple[int, ...]) -> dict:
    """The canonical config keys for an input shape ``(F,)`` or ``(C, H, W)``."""
    if len(shape) == 1:
        return {"in_features": int(shape[0])}
    if len(shape) != 3:
        raise CcamergeError(f"inputs must be feature vectors [F] or images [C, H, W], got "
                            f"{list(shape)}")
    channels, height, width = (int(d) for d in shape)
    if height == width:
        return {"in_channels": channels, "image_size": height}
    return {"image_shape": [channels, height, width]}


def input_shape(config: dict) -> tuple[int, ...]:
    """The sample shape ``(F,)`` or ``(C, H, W)`` a built-in model's ``config`` expects."""
    keys = ("in_features", "image_shape", "in_channels", "image_size")
    return resolve_input_shape(**{k: config[k] for k in keys if k in config})


def _image_input(arch: str, in_features, **shape) -> tuple[int, int, int]:
    if in_features is not None:
        raise CcamergeError(f"{arch} takes images [C, H, W]; feature vectors [{in_features}] "
                            "need an mlp")
    return resolve_input_shape(**shape)


class MLP(nn.Module):
    """Fully connected net: flatten -> [Linear -> ReLU] * len(hidden) -> Linear.

    Input ``[B, F]`` (``in_features``) or ``[B, C, H, W]`` (flattened to ``C*H*W``), output logits
    ``[B, classes]``. Hidden widths are ``round(h * width)`` for each ``h`` in ``hidden``.
    """

    arch = "mlp"

    def __init__(self, *, in_features=None, image_shape=None, in_channels=None, image_size=None,
                 num_classes=10, hidden=(128, 128), width=1.0):
        super().__init__()
        shape = resolve_input_shape(in_features=in_features, image_shape=image_shape,
                                    in_channels=in_channels, image_size=image_size)
        self.config = dict(**shape_config(shape), num_classes=num_classes, hidden=list(hidden),
                           width=width)
        sizes = [math.prod(shape)] + [_scaled(h, width) for h in hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def default_vgg_cfg(image_size: int) -> list:
    """A VGG-style layer list for inputs whose shorter side is ``image_size`` pixels (ints = conv
    widths at x1, "M" = 2x2 max-pool). Small images get fewer pools so the map never shrinks
    below 2x2."""
    pools = max(1, min(3, int(math.log2(image_size)) - 1))
    blocks = [[16, 16], [32, 32], [64, 64], [128, 128]]
    cfg: list = []
    for stage in range(pools):
        cfg += blocks[stage] + ["M"]
    return cfg + blocks[pools][:1]


class VGG(nn.Module):
    """VGG-style convnet: ``features`` (3x3 convs, optional BatchNorm, ReLU, 2x2 max-pools from
    ``cfg``) -> flatten -> ``classifier`` (optional hidden Linear+ReLU layers, then Linear).

    Input ``[B, C, H, W]``, output ``[B, classes]``. Conv widths are ``round(c * width)``.
    """

    arch = "vgg"

    def __init__(self, *, in_features=None, image_shape=None, in_channels=None, image_size=None,
                 num_classes=10, cfg=None, width=1.0, batch_norm=False, classifier=()):
        super().__init__()
        shape = _image_input("vgg", in_features, image_shape=image_shape,
                             in_channels=in_channels, image_size=image_size)
        cfg = list(cfg) if cfg is not None else default_vgg_cfg(min(shape[1:]))
        self.config = dict(**shape_config(shape), num_classes=num_classes, cfg=cfg, width=width,
                           batch_norm=batch_norm, classifier=list(classifier))
        layers: list[nn.Module] = []
        channels, height, width_px = shape
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                height, width_px = height // 2, width_px // 2
                continue
            out = _scaled(int(item), width)
            layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU())
            channels = out
        if min(height, width_px) < 1:
            raise CcamergeError(f"VGG cfg {cfg} pools a {shape[1]}x{shape[2]} input below 1 "
                                "pixel; use fewer 'M'")
        self.features = nn.Sequential(*layers)
        self.flat_size = height * width_px
        sizes = [channels * height * width_px] + [_scaled(h, width) for h in classifier]
        head: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            head += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        head.append(nn.Linear(sizes[-1], num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm; output
    ``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))``. The shortcut is a 1x1 conv +
    BatchNorm when stride or width changes, else the identity."""

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

    Input ``[B, C, H, W]``, output ``[B, classes]``.
    """

    arch = "resnet20"

    def __init__(self, *, in_features=None, image_shape=None, in_channels=None, image_size=None,
                 num_classes=10, width=1.0, blocks=3):
        super().__init__()
        shape = _image_input("resnet20", in_features, image_shape=image_shape,
                             in_channels=in_channels, image_size=image_size)
        self.config = dict(**shape_config(shape), num_classes=num_classes, width=width,
                           blocks=blocks)
        planes = [_scaled(c, width) for c in (16, 32, 64)]
        self.conv = nn.Conv2d(shape[0], planes[0], 3, padding=1, bias=False)
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


def config_difference(models: list[nn.Module]) -> tuple[int, list[str]] | None:
    """``(index, differing config keys)`` of the first model whose architecture or config
    differs from model 0 (keys ``["arch"]`` for another family), None when all match."""
    first = describe(models[0])
    for index, model in enumerate(models[1:], start=1):
        other = describe(model)
        if other["arch"] != first["arch"]:
            return index, ["arch"]
        diff = sorted(k for k in set(first["config"]) | set(other["config"])
                      if first["config"].get(k) != other["config"].get(k))
        if diff:
            return index, diff
    return None


def _same_layout(key: str, a, b) -> bool:
    """Whether config values ``a``, ``b`` of ``key`` describe the same layers at other widths:
    the ``width`` multiplier, or layer lists (``hidden``, ``classifier``, ``cfg``) of one length
    whose max-pools ("M") sit at the same places."""
    if key == "width":
        return True
    if key not in ("hidden", "classifier", "cfg") or len(a) != len(b):
        return False
    return all((x == "M") == (y == "M") for x, y in zip(a, b, strict=True))


def widths_differ(models: list[nn.Module]) -> bool:
    """True when built-in ``models`` are of one family and differ only in their widths (the
    ``width`` multiplier or the layer widths of one layout), not all equal."""
    if config_difference(models) is None:
        return False
    first = describe(models[0])["config"]
    for model in models[1:]:
        diff = config_difference([models[0], model])
        if diff is not None and not all(_same_layout(k, model.config.get(k), first.get(k))
                                        for k in diff[1]):
            return False
    return True


def widths_label(models: list[nn.Module]) -> str:
    """The config fields in which ``models`` differ, each model's value in order:
    ``hidden [12, 10] / [24, 20]``."""
    keys = sorted({k for m in models for k in m.config
                   if m.config.get(k) != models[0].config.get(k)})
    return ", ".join(f"{k} " + " / ".join(str(m.config.get(k)) for m in models) for k in keys)


def same_architecture(models: list[nn.Module], mixed_widths: bool = False) -> None:
    """Raise a CcamergeError naming the first model whose architecture or config differs from
    model 0; with ``mixed_widths``, models that differ only in ``width`` pass."""
    diff = config_difference(models)
    if diff is None or (mixed_widths and widths_differ(models)):
        return
    index, keys = diff
    first, other = describe(models[0]), describe(models[index])
    what = "architecture" if keys == ["arch"] else ", ".join(keys)
    raise CcamergeError(
        f"model {index} does not match model 0 ({what}: {other['arch']} "
        f"{other['config']} vs {first['arch']} {first['config']}); only models of one "
        "architecture and size merge")


def check_input_fit(model: nn.Module, sample_shape: tuple[int, ...],
                    num_classes: int | None = None) -> None:
    """Raise one clear line when samples of ``sample_shape`` or ``num_classes`` classes do not fit
    a built-in ``model`` (shape, channel count, feature width, classes). Other modules declare
    no input shape and pass unchecked."""
    if getattr(model, "arch", None) not in ARCHITECTURES:
        return
    want, have = input_shape(model.config), tuple(int(d) for d in sample_shape)
    hint = "; pick the dataset the models were trained on"
    if have != want:
        if len(want) == 1 and len(have) == 1:
            problem = (f"the models take feature vectors of width {want[0]} but the data has "
                       f"{have[0]} features")
        elif len(want) != len(have):
            kinds = {1: "feature vectors", 3: "images"}
            problem = (f"the models take {kinds.get(len(want))} of shape {list(want)} but the "
                       f"data are {kinds.get(len(have), 'inputs')} of shape {list(have)}")
        elif want[0] != have[0]:
            problem = (f"the models take {want[0]}-channel images (shape {list(want)}) but the "
                       f"data has {have[0]} channels (shape {list(have)})")
        else:
            problem = (f"the models expect inputs of shape {list(want)} but the data has "
                       f"{list(have)}")
        raise CcamergeError(problem + hint)
    classes = model.config.get("num_classes")
    if num_classes is not None and classes != num_classes:
        raise CcamergeError(f"the models have {classes} classes (outputs) but the data has "
                            f"{num_classes}{hint}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Eval-mode logits ``[B, classes]`` for inputs ``x`` ``[B, ...]``, in batches."""
    model.eval()
    place = next((t.device for t in (*model.parameters(), *model.buffers())), x.device)
    return torch.cat([model(x[i:i + batch_size].to(place)).cpu()
                      for i in range(0, len(x), batch_size)])
