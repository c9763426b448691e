import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ccamerge.errors import CcamergeError
from ccamerge.io import (
    archive_info,
    is_archive_model,
    load_archive_model,
    load_model,
    load_model_bytes,
    model_summary,
    read_info,
    save_merged,
    save_model,
)
from ccamerge.models import build_model

CONFIGS = {
    "mlp": {"in_channels": 1, "image_size": 8, "num_classes": 10, "hidden": [16, 16]},
    "vgg": {"in_channels": 1, "image_size": 8, "num_classes": 10, "width": 0.5},
    "resnet20": {"in_channels": 1, "image_size": 8, "num_classes": 10, "width": 0.5, "blocks": 1},
}


def _model(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = build_model(arch, **{**CONFIGS[arch], **overrides})
    model.train()
    with torch.no_grad():  # move BatchNorm running statistics away from their defaults
        model(torch.randn(16, 1, 8, 8))
    return model.eval()


class RunsCode:
    """Pickles to ``os.system(command)``: unpickling it with plain pickle would run the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_round_trip_is_bitwise(tmp_path, arch):
    model = _model(arch)
    info = {"dataset": "digits", "seed": 0, "test_accuracy": np.float64(97.5), "split": ("same",)}
    path = save_model(model, tmp_path / "sub" / f"{arch}.safetensors", info=info)
    loaded = load_model(path)
    assert loaded.arch == arch and loaded.config == model.config and not loaded.training
    assert loaded.info == {"dataset": "digits", "seed": 0, "test_accuracy": 97.5, "split": ["same"]}
    assert loaded.source == str(path)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_metadata_layout(tmp_path):
    path = save_model(_model("resnet20"), tmp_path / "r.safetensors", info={"recipe": {"g": 1}})
    header = read_info(path)
    assert header["format"] == 1 and header["arch"] == "resnet20"
    assert header["config"]["blocks"] == 1 and header["info"] == {"recipe": {"g": 1}}
    assert "stages.0.0.bn1.num_batches_tracked" in load_model(path).state_dict()
    summary = model_summary(load_model(path))
    assert (summary["arch"] == "resnet20" and summary["parameters"] > 0
            and summary["accuracy"] is None)
    json.dumps(summary)


def test_save_rejects_bad_info_and_suffix(tmp_path):
    with pytest.raises(CcamergeError, match="not JSON-able"):
        save_model(_model("mlp"), tmp_path / "m.safetensors", info={"x": object()})
    with pytest.raises(CcamergeError, match="safetensors"):
        save_model(_model("mlp"), tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []  # no temp file left behind


def test_shape_mismatch_names_the_tensor(tmp_path):
    path = save_model(_model("vgg", width=1.0), tmp_path / "v.safetensors")
    config = dict(CONFIGS["vgg"], width=0.5)
    with pytest.raises(CcamergeError) as caught:
        load_model(path, arch="vgg", config=config)
    assert str(caught.value).startswith(
        "tensor features.0.weight has shape [16, 1, 3, 3] but a vgg with width 0.5 expects "
        "[8, 1, 3, 3]")


def test_missing_and_unexpected_tensors(tmp_path):
    path = save_model(_model("mlp"), tmp_path / "m.safetensors")
    with pytest.raises(CcamergeError, match="missing .*unexpected"):
        load_model(path, arch="vgg", config=CONFIGS["vgg"])


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\xff" * 64, "not a valid safetensors file"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}", "not a valid safetensors file"),
])
def test_corrupt_files(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CcamergeError, match=message):
        load_model(path)
    with pytest.raises(CcamergeError, match=message):
        load_model_bytes(content, "bad.safetensors")


def test_truncated_oversize_and_extension(tmp_path):
    path = save_model(_model("mlp"), tmp_path / "m.safetensors")
    whole = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CcamergeError, match="truncated or corrupt"):
        load_model(cut)
    with pytest.raises(CcamergeError, match="over the 100-byte limit"):
        load_model(path, max_bytes=100)
    other = tmp_path / "m.bin"
    other.write_bytes(whole)
    with pytest.raises(CcamergeError, match=r"expected a \.safetensors, \.pt or \.pth"):
        load_model(other)
    with pytest.raises(CcamergeError, match="does not exist"):
        load_model(tmp_path / "absent.safetensors")


def test_missing_metadata_needs_description(tmp_path):
    model = _model("mlp")
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(CcamergeError, match="no ccamerge metadata.*architecture description"):
        load_model(path)
    loaded = load_model(path, arch="mlp", config=CONFIGS["mlp"])
    assert loaded.info == {}


def test_non_finite_weights_refused(tmp_path):
    model = _model("mlp")
    with torch.no_grad():
        model.layers[1].weight[0, 0] = float("nan")
    path = save_model(model, tmp_path / "nan.safetensors")
    with pytest.raises(CcamergeError, match="layers.1.weight .*NaN or infinite"):
        load_model(path)


def test_pt_state_dict_needs_description(tmp_path):
    model = _model("vgg")
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "wrapped.pth"
    torch.save(model.state_dict(), plain)
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, wrapped)
    with pytest.raises(CcamergeError, match="architecture description"):
        load_model(plain)
    for path in (plain, wrapped):
        loaded = load_model(path, arch="vgg", config=CONFIGS["vgg"])
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    from_bytes = load_model_bytes(plain.read_bytes(), "up.pt", arch="vgg", config=CONFIGS["vgg"])
    assert from_bytes.source == "up.pt"
    not_state = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], not_state)
    with pytest.raises(CcamergeError, match="does not hold a state dict"):
        load_model(not_state, arch="vgg", config=CONFIGS["vgg"])


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    state = dict(_model("mlp").state_dict())
    state["layers.1.bias"] = RunsCode(f"touch {marker}")
    path = tmp_path / "evil.pt"
    torch.save(state, path)
    with pytest.raises(CcamergeError) as caught:
        load_model(path, arch="mlp", config=CONFIGS["mlp"])
    assert str(caught.value) == (
        "refused to unpickle evil.pt: it holds pickled objects that are not plain tensors "
        "(posix.system); ccamerge only loads .safetensors files or weights-only state dicts "
        "(name -> tensor)")  # ccamerge's own words: no advice to allow-list the global
    with pytest.raises(CcamergeError, match="refused to unpickle"):
        load_model_bytes(path.read_bytes(), "evil.pt", arch="mlp", config=CONFIGS["mlp"])
    assert not marker.exists()


def test_corrupt_pt(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"PK\x03\x04 definitely not a torch archive")
    with pytest.raises(CcamergeError, match="cannot read junk.pt"):
        load_model(path, arch="mlp", config=CONFIGS["mlp"])


def test_bytes_load_like_files(tmp_path):
    paths = [save_model(_model("mlp", seed=s), tmp_path / f"m{s}.safetensors",
                        info={"test_accuracy": 90.0 + s}) for s in range(2)]
    models = [load_model(p) for p in paths]
    assert [model_summary(m)["accuracy"] for m in models] == [90.0, 91.0]
    uploaded = load_model_bytes(paths[1].read_bytes(), "m1.safetensors")
    assert uploaded.info == {"test_accuracy": 91.0} and uploaded.source == "m1.safetensors"
    assert torch.equal(uploaded.layers[1].weight, models[1].layers[1].weight)


def _archive(tmp_path, seed: int = 0):
    """A scripted net outside the built-in families, saved with ``torch.jit.save``."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.GELU(),
                              torch.nn.Linear(16, 10)).eval()
    path = tmp_path / f"net{seed}.ts"
    torch.jit.save(torch.jit.script(net), str(path))
    return net, path


def test_an_archive_loads_from_a_path_or_bytes_as_the_same_hookable_network(tmp_path):
    net, path = _archive(tmp_path)
    x = torch.randn(8, 1, 8, 8)
    for source, name in ((path, str(path)), (path.read_bytes(), "upload.ts")):
        model = load_archive_model(source, x, name=None if name == str(path) else name)
        assert is_archive_model(model) and model.source == name and model.info == {}
        assert set(model.state_dict()) == set(net.state_dict())
        seen = []
        hook = model.get_submodule("1").register_forward_hook
        hook(lambda _module, _inputs, out, seen=seen: seen.append(out))
        with torch.no_grad():
            assert torch.allclose(model(x), net(x), atol=1e-6)
        assert seen and seen[0].shape == (8, 16)
    assert not is_archive_model(_model("mlp"))


def test_a_merged_archive_carries_the_weights_and_the_info(tmp_path):
    _, path = _archive(tmp_path)
    x = torch.randn(8, 1, 8, 8)
    reference, other = load_archive_model(path, x), load_archive_model(_archive(tmp_path, 1)[1], x)
    out = tmp_path / "sub" / "merged.ts"
    info = {"merge": {"method": "average", "weights": [0.5, 0.5]}, "test_accuracy": 91.5}
    assert save_merged(other, reference, out, info) == out
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged.ts"]  # no temp file left
    assert archive_info(out) == info and archive_info(out.read_bytes()) == info
    written = torch.jit.load(str(out))
    with torch.no_grad():
        assert torch.equal(written(x), other(x))
    again = load_archive_model(out, x)
    assert again.info == info and not torch.equal(again.state_dict()["1.weight"],
                                                  reference.state_dict()["1.weight"])
    before = out.read_bytes()
    with pytest.raises(CcamergeError, match="not JSON-able"):
        save_merged(reference, reference, out, {"x": object()})
    assert out.read_bytes() == before and len(list(out.parent.iterdir())) == 1


def test_save_merged_writes_safetensors_for_the_builtin_families(tmp_path):
    model = _model("mlp")
    path = save_merged(model, _model("mlp", seed=1), tmp_path / "m.safetensors", {"a": 1})
    loaded = load_model(path)
    assert loaded.info == {"a": 1} and torch.equal(loaded.layers[1].weight, model.layers[1].weight)


def test_broken_archives_fail_with_their_name(tmp_path):
    _, path = _archive(tmp_path)
    with pytest.raises(CcamergeError, match=r"does not run on images of shape \[3, 4, 4\]"):
        load_archive_model(path, torch.randn(2, 3, 4, 4))
    with pytest.raises(CcamergeError, match="notes.ts: not a TorchScript archive"):
        load_archive_model(b"plain text" * 10, torch.randn(2, 1, 8, 8), name="notes.ts")
    assert archive_info(b"plain text") == {} and archive_info(tmp_path / "missing.ts") == {}


def _claiming(tmp_path, name: str, model, **config) -> "os.PathLike":
    """``model``'s tensors under metadata that describes its config changed by ``config``."""
    header = {"format": 1, "arch": model.arch, "config": {**model.config, **config}, "info": {}}
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"ccamerge": json.dumps(header)})
    return path


PEAK_SCRIPT = """
import sys
from ccamerge.errors import CcamergeError
from ccamerge.io import load_model
def mb(field):
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1]) // 1024
load_model(sys.argv[1])  # warm: imports, allocator
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # the peak (VmHWM) restarts from the resident size now
before = mb("VmRSS:")
try:
    load_model(sys.argv[2])
except CcamergeError as exc:
    print(exc)
print(mb("VmHWM:") - before)
"""


@pytest.mark.parametrize("hidden", [[20000, 20000], [60000, 60000]])
def test_metadata_declaring_a_larger_net_is_refused_before_allocating(tmp_path, hidden):
    import subprocess
    import sys

    good = save_model(_model("mlp"), tmp_path / "good.safetensors")
    hostile = _claiming(tmp_path, "big.safetensors", _model("mlp"), hidden=hidden)
    assert hostile.stat().st_size < 10_000  # the file holds a few KB; it declares GBs
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(good), str(hostile)],
                          capture_output=True, text=True, timeout=120, check=True)
    message, extra_mb = proc.stdout.strip().splitlines()
    assert message.startswith(f"tensor layers.1.weight has shape [16, 64] but a mlp with width "
                              f"1.0 expects [{hidden[0]}, 64] (in big.safetensors)")
    assert int(extra_mb) < 200, proc.stdout


def test_crafted_configs_are_refused_without_building(tmp_path):
    net = _model("resnet20")
    blocks = _claiming(tmp_path, "blocks.safetensors", net, blocks=10**7)
    with pytest.raises(CcamergeError, match=r"describes 10000000 layers in 'blocks'"):
        load_model(blocks)  # a meta network of 3e7 blocks would take minutes
    nan_width = _claiming(tmp_path, "nan.safetensors", _model("mlp"), width=float("nan"))
    with pytest.raises(CcamergeError, match=r"nan\.safetensors describes a mlp that cannot be"):
        load_model(nan_width)
    words = _claiming(tmp_path, "words.safetensors", _model("mlp"), hidden=["a", "b"])
    with pytest.raises(CcamergeError, match="words.safetensors"):
        load_model(words)


def test_a_tensor_of_the_wrong_kind_is_refused(tmp_path):
    state = {k: v.contiguous() for k, v in _model("mlp").state_dict().items()}
    state["layers.1.weight"] = state["layers.1.weight"].to(torch.int32)
    path = tmp_path / "ints.pt"
    torch.save(state, path)
    with pytest.raises(CcamergeError, match="layers.1.weight in ints.pt holds int values but a "
                                            "mlp with width 1.0 expects float"):
        load_model(path, arch="mlp", config=CONFIGS["mlp"])


def test_only_regular_files_are_read(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.safetensors"
    zero.symlink_to("/dev/zero")
    dangling = tmp_path / "gone.safetensors"
    dangling.symlink_to(tmp_path / "nothing")
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    expected = {fifo: "is a FIFO", zero: "is a character device", folder: "is a folder",
                dangling: "is a symbolic link to a missing file"}
    for path, message in expected.items():
        with pytest.raises(CcamergeError, match=f"model file {path} {message}"):
            load_model(path)  # returns at once: a FIFO is never opened
        with pytest.raises(CcamergeError, match=message):
            read_info(path)
        assert archive_info(path) == {}


def test_a_pt_with_compressed_members_is_refused_before_unpacking(tmp_path):
    import zipfile

    path = tmp_path / "packed.pt"
    torch.save(_model("mlp").state_dict(), path)
    packed = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for member in src.infolist():
            dst.writestr(member.filename, src.read(member))
        dst.writestr("archive/data/99", b"\0" * 2**22)  # 4 MB of zeros in a few KB
    assert packed.stat().st_size < 2**16
    with pytest.raises(CcamergeError, match=r"bomb\.pt would unpack to"):
        load_model(packed, arch="mlp", config=CONFIGS["mlp"])


def test_loaded_models_record_the_sha256_of_their_bytes(tmp_path):
    import hashlib

    path = save_model(_model("mlp"), tmp_path / "m.safetensors")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_model(path).sha256 == digest
    assert load_model_bytes(path.read_bytes(), "x.safetensors").sha256 == digest


def test_write_errors_name_the_users_path_and_leave_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CcamergeError, match=f"cannot write {blocker}/m.safetensors"):
        save_model(_model("mlp"), blocker / "m.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(CcamergeError, match="dir.safetensors is a folder"):
        save_model(_model("mlp"), tmp_path / "dir.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.safetensors", "file"]


def test_written_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = save_model(_model("mlp"), tmp_path / "m.safetensors")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600


KILLED_SCRIPT = """
import sys, time
import ccamerge.io as cio
from ccamerge.io import load_model, save_merged
def slow(tensors, tmp, metadata=None):
    with open(tmp, "wb") as handle:
        handle.write(b"the first half of a file")
        handle.flush()
    print("writing", flush=True)
    time.sleep(60)
cio.save_file = slow
model = load_model(sys.argv[1])
save_merged(model, model, sys.argv[2], {})
"""


def test_a_write_killed_midway_leaves_the_previous_file_whole(tmp_path):
    import signal
    import subprocess
    import sys

    source = save_model(_model("mlp"), tmp_path / "m.safetensors")
    target = save_model(_model("mlp", seed=1), tmp_path / "out.safetensors")
    before = target.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SCRIPT, str(source), str(target)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)  # kill -9: no cleanup runs
    proc.wait(timeout=60)
    assert target.read_bytes() == before  # never truncated: the rename had not happened
    leftovers = {p.name for p in tmp_path.iterdir()} - {"m.safetensors", "out.safetensors"}
    assert all(n.startswith(".out.safetensors.") and n.endswith(".tmp") for n in leftovers)
