import dataclasses

import pytest
import torch

from ccamerge.errors import CcamergeError
from ccamerge.models import build_model
from ccamerge.spec import AlignmentSpec, build_spec, matching_names, same_points
from ccamerge.transform import verify_spec

FAMILIES = [
    ("mlp", {}),
    ("mlp", {"hidden": [32, 16, 8], "in_channels": 3, "image_size": 4, "num_classes": 5}),
    ("vgg", {}),
    ("vgg", {"batch_norm": True, "classifier": [24, 12], "width": 0.5}),
    ("vgg", {"image_size": 28, "width": 0.25}),
    ("resnet20", {"width": 0.5}),
    ("resnet20", {"width": 1.5, "image_size": 16, "in_channels": 3, "blocks": 2}),
]


def _randomise_batchnorm(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()


@pytest.mark.parametrize("arch,config", FAMILIES)
def test_a_permutation_through_the_spec_keeps_the_function(arch, config):
    torch.manual_seed(0)
    model = build_model(arch, **config)
    _randomise_batchnorm(model)
    size = model.config["image_size"]
    x = torch.randn(8, model.config["in_channels"], size, size)
    report = verify_spec(model, build_spec(model), x)
    assert max(report.values()) < 1e-4, report
    # and the permutation really moved weights (a no-op would also "pass")
    twin_state = build_model(arch, **config).state_dict()
    assert any(not torch.equal(v, twin_state[k]) for k, v in model.state_dict().items())


def test_every_parameter_with_hidden_axes_is_covered():
    model = build_model("resnet20", width=0.5)
    spec = build_spec(model)
    covered = spec.axes_by_param()
    for name in model.state_dict():
        if name.endswith("num_batches_tracked") or name == "fc.bias":  # logits are never aligned
            continue
        assert name in covered, f"{name} is in no merge point"
    # the stem, block conv2s and shortcuts all write stream widths
    assert ([p.name for p in spec.points if p.name.startswith("stream")]
            == ["stream1", "stream2", "stream3"])


def test_vgg_flatten_consumer_has_spatial_repeat():
    model = build_model("vgg")  # 8x8 input, two pools -> 2x2 map
    last = build_spec(model).points[-1]
    assert last.consumers[0].param == "classifier.1.weight"
    assert last.consumers[0].repeat == 4


def test_spec_round_trips_through_dict():
    spec = build_spec(build_model("resnet20", width=0.5))
    assert AlignmentSpec.from_dict(spec.to_dict()) == spec


def test_unknown_point_and_foreign_model_fail_clearly():
    spec = build_spec(build_model("mlp"))
    with pytest.raises(CcamergeError, match="no merge point"):
        spec.point("nope")
    with pytest.raises(CcamergeError, match="built-in families"):
        build_spec(torch.nn.Linear(2, 2))


def _renamed_and_reordered(spec: AlignmentSpec) -> AlignmentSpec:
    """The same points, renamed, in reverse order, with every axis list reversed."""
    return AlignmentSpec(tuple(
        dataclasses.replace(p, name=f"p{k}", features=p.features[::-1],
                            producers=p.producers[::-1], consumers=p.consumers[::-1])
        for k, p in enumerate(reversed(spec.points))))


def test_same_points_ignores_names_and_axis_order_but_not_the_wiring():
    spec = build_spec(build_model("resnet20", width=0.5))
    twin = _renamed_and_reordered(spec)
    assert same_points(spec, twin) and same_points(twin, spec)
    first = spec.points[0]
    narrower = dataclasses.replace(first, width=first.width - 1)
    one_axis_less = dataclasses.replace(first, consumers=first.consumers[:-1])
    for changed in (narrower, one_axis_less):
        assert not same_points(spec, AlignmentSpec((changed, *spec.points[1:])))
    assert not same_points(spec, AlignmentSpec(spec.points[1:]))


def test_matching_names_maps_each_point_to_its_twin():
    spec = build_spec(build_model("mlp", hidden=[32, 16, 8]))
    twin = _renamed_and_reordered(spec)
    assert matching_names(twin, spec) == {"p0": "fc3", "p1": "fc2", "p2": "fc1"}
    assert matching_names(AlignmentSpec(twin.points[:1]), spec) == {"p0": "fc3"}
    assert matching_names(spec, build_spec(build_model("mlp", hidden=[8]))) == {}
