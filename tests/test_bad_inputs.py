"""The corpus of bad inputs, as a table: every case exits 2 (or raises CcamergeError) with exactly
one line that names the file at fault and says what to do, leaves every input byte-identical and
no output behind; interrupts exit 130 and a closed stdout 141, one line each; hostile files that
declare more than they hold stay within a peak-memory bound."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bad_inputs import build_files, snapshot, tiny, write_recipes, zip_bomb

from ccamerge import api, cli
from ccamerge.data import load_dataset
from ccamerge.errors import CcamergeError
from ccamerge.io import load_archive_model, load_model, load_model_bytes, save_model
from ccamerge.methods import get_method

PAIR = "{d}/m0.safetensors {d}/m1.safetensors"
MERGE = f"merge {PAIR} --method average --out {{d}}/out.safetensors"
CCA = f"merge {PAIR} --out {{d}}/out.safetensors"

# (id, command line, what the line says, the file it names)
CLI_CASES = [
    # outputs: never an input, checked before any work
    ("out-is-input", f"merge {PAIR} --out {{d}}/m0.safetensors", "never overwrites", "m0"),
    ("out-is-second-input", f"merge {PAIR} --out {{d}}/m1.safetensors", "never overwrites", "m1"),
    ("out-other-spelling", f"merge {PAIR} --out {{d}}/sub/../m0.safetensors", "never overwrites",
     "m0"),
    ("out-symlink-to-input", f"merge {PAIR} --out {{d}}/link.safetensors", "never overwrites",
     "link"),
    ("out-hard-link-to-input", f"merge {PAIR} --out {{d}}/hard.safetensors", "never overwrites",
     "hard"),
    ("out-is-the-data", f"merge {PAIR} --data {{d}}/tiny.npz --out {{d}}/tiny.npz",
     "never overwrites", "tiny.npz"),
    ("replay-onto-itself", "replay {d}/merged.safetensors --out {d}/merged.safetensors",
     "never overwrites", "merged"),
    ("replay-onto-a-model", "replay {d}/recipe.json --out {d}/m1.safetensors", "never overwrites",
     "m1"),
    ("replay-onto-the-recipe", "replay {d}/recipe.json --out {d}/recipe.json", "never overwrites",
     "recipe.json"),
    ("out-is-a-folder", f"merge {PAIR} --out {{d}}/sub", "give the path of a file", "sub"),
    ("out-wrong-suffix", f"merge {PAIR} --out {{d}}/out.pt", "give a .safetensors name",
     "out.pt"),
    ("out-under-a-file", f"merge {PAIR} --out {{d}}/m0.safetensors/x.safetensors",
     "is not a folder", "m0"),
    ("archive-merge-as-safetensors",
     "merge {d}/gelu0.ts {d}/gelu1.ts --trust-code --out {d}/out.safetensors",
     "give a .pt or .ts name", "out.safetensors"),
    ("train-out-is-a-file", "train --arch mlp --out {d}/m0.safetensors", "give a folder", "m0"),
    # model files
    ("model-missing", f"{MERGE.replace('m1.', 'absent.')}", "does not exist", "absent"),
    ("model-empty", "evaluate {d}/empty.safetensors", "is empty", "empty"),
    ("model-garbage", "evaluate {d}/junk.safetensors", "not a valid safetensors", "junk"),
    ("model-truncated", "evaluate {d}/cut.safetensors", "truncated or corrupt", "cut"),
    ("model-header-too-long", "evaluate {d}/long.safetensors", "not a valid safetensors", "long"),
    ("model-fifo", "evaluate {d}/fifo.safetensors", "is a FIFO", "fifo"),
    ("model-dev-zero", "evaluate {d}/zero.safetensors", "is a character device", "zero"),
    ("model-folder", "evaluate {d}/folder.safetensors", "is a folder", "folder"),
    ("model-dangling-link", "evaluate {d}/gone.safetensors", "link to a missing file", "gone"),
    ("archive-fifo", "evaluate {d}/fifo.ts --trust-code", "is a FIFO", "fifo.ts"),
    ("declares-20000-wide", "evaluate {d}/big.safetensors", "does not describe its tensors", "big"),
    ("declares-60000-wide", "evaluate {d}/huge.safetensors", "does not describe its tensors",
     "huge"),
    ("declares-1e7-blocks", "evaluate {d}/blocks.safetensors", "does not describe it", "blocks"),
    ("declares-nan-width", "evaluate {d}/nanwidth.safetensors", "check its config", "nanwidth"),
    ("unknown-architecture", "evaluate {d}/alien.safetensors", "choose one of", "alien"),
    ("future-format", "evaluate {d}/future.safetensors", "this version reads format 1", "future"),
    ("no-metadata", "evaluate {d}/bare.safetensors", "pass an architecture description", "bare"),
    ("nan-weights", "evaluate {d}/nan.safetensors", "NaN or infinite", "nan.safetensors"),
    ("int-weights", "evaluate {d}/ints.safetensors", "expects float values", "ints"),
    ("wrong-extension", "evaluate {d}/m0.bin", "expected a .safetensors", "m0.bin"),
    ("bare-pt", "evaluate {d}/plain.pt", "pass an architecture description", "plain.pt"),
    ("archive-untrusted", "evaluate {d}/gelu0.ts", "--trust-code", "gelu0.ts"),
    ("archive-merge-untrusted", "merge {d}/gelu0.ts {d}/gelu1.ts --out {d}/out.ts",
     "--trust-code", "gelu0.ts"),
    ("architectures-differ", "merge {d}/m0.safetensors {d}/vgg.safetensors "
     "--out {d}/out.safetensors", "only models of one architecture", None),
    ("one-model", "merge {d}/m0.safetensors --out {d}/out.safetensors", "at least 2", None),
    # models and data that do not fit
    ("classes-do-not-fit", "evaluate {d}/three.safetensors", "3 classes", "three"),
    ("spec-does-not-fit", "spec {d}/m0.safetensors --data {d}/small4.npz", "pick the dataset",
     "m0"),
    ("merge-does-not-fit", f"{MERGE} --data {{d}}/small4.npz", "pick the dataset", "m0"),
    ("interpolate-does-not-fit", f"interpolate {PAIR} --data {{d}}/small4.npz", "pick the dataset",
     "m0"),
    ("diagnose-does-not-fit", f"diagnose {PAIR} --data {{d}}/small4.npz", "pick the dataset",
     "m0"),
    # datasets
    ("data-unknown", f"{MERGE} --data imagenet", "choose one of", "imagenet"),
    ("data-missing", f"{MERGE} --data {{d}}/absent.npz", "does not exist", "absent.npz"),
    ("data-fifo", f"{MERGE} --data {{d}}/fifo.npz", "is a FIFO", "fifo.npz"),
    ("data-dev-zero", f"{MERGE} --data {{d}}/zero.npz", "is a character device", "zero.npz"),
    ("data-garbage", f"{MERGE} --data {{d}}/junk.npz", "cannot read", "junk.npz"),
    ("data-lacks-arrays", f"{MERGE} --data {{d}}/keys.npz", "lacks", "keys.npz"),
    ("data-dir-not-a-folder", f"{MERGE} --data fashion-mnist --data-dir {{d}}/m0.safetensors",
     "is not a folder", "m0"),
    # numbers: finite and in range, before any work
    ("gamma-nan", f"{CCA} --gamma nan", "finite number", None),
    ("gamma-inf", f"{CCA} --gamma inf", "finite number", None),
    ("gamma-1e308", f"{CCA} --gamma 1e308", "must be in [0, 1e+06]", None),
    ("gamma-negative", f"{CCA} --gamma -1", "must be in [0, 1e+06]", None),
    ("gamma-word", f"{CCA} --gamma lots", "invalid float value", None),
    ("alpha-above-1", f"{CCA} --method zipit --alpha 2", "must be in [0, 1]", None),
    ("beta-negative", f"{CCA} --method zipit --beta -0.5", "must be in [0, 1]", None),
    ("max-sweeps-0", f"{CCA} --method weight_matching --max-sweeps 0", "[1, 10000]", None),
    ("max-sweeps-1e5", f"{CCA} --method weight_matching --max-sweeps 100000", "[1, 10000]", None),
    ("spectrum-gamma-nan", f"spectrum {PAIR} --gamma nan", "finite number", None),
    ("steps-0", f"interpolate {PAIR} --steps 0", "in 2..1001", None),
    ("steps-1", f"interpolate {PAIR} --steps 1", "in 2..1001", None),
    ("steps-1002", f"interpolate {PAIR} --steps 1002", "in 2..1001", None),
    ("steps-fraction", f"interpolate {PAIR} --steps 2.5", "expected an integer", None),
    ("width-0", "train --arch mlp --width 0 --out {d}/zoo", "in (0, 64]", None),
    ("width-nan", "train --arch mlp --width nan --out {d}/zoo", "in (0, 64]", None),
    ("width-1e9", "train --arch mlp --width 1e9 --out {d}/zoo", "in (0, 64]", None),
    ("epochs-0", "train --arch mlp --epochs 0 --out {d}/zoo", "in 1..10000", None),
    ("epochs-negative", "train --arch mlp --epochs -5 --out {d}/zoo", "in 1..10000", None),
    ("seeds-negative", "train --arch mlp --seeds -1 --out {d}/zoo", "in 0..4294967295", None),
    ("seeds-2-40", "train --arch mlp --seeds 1099511627776 --out {d}/zoo", "in 0..4294967295",
     None),
    ("seeds-repeated", "train --arch mlp --seeds 0 0 --out {d}/zoo", "different seeds", None),
    ("seed-negative", f"{MERGE} --seed -1", "in 0..4294967295", None),
    ("stats-samples-1", f"{CCA} --stats-samples 1", "in 2..", None),
    ("stats-samples-0", f"spectrum {PAIR} --stats-samples 0", "in 2..", None),
    ("reference-2-of-2", f"{MERGE} --reference 2", "(0..1), got 2", None),
    ("reference-negative", f"{MERGE} --reference -1", "in 0..", None),
    ("diagnose-reference", f"diagnose {PAIR} --reference 5", "(0..1), got 5", None),
    ("unknown-method", f"{MERGE} --method magic", "choose one of", None),
    ("option-of-another-method", f"{MERGE} --gamma 1", "has no option", None),
    ("interpolate-joint", f"interpolate {PAIR} --method zipit", "use it with merge", None),
    ("interpolate-paper", f"interpolate {PAIR} --bn-policy paper", "available for merge", None),
    ("repair-joint", f"{CCA} --method zipit --repair", "joint method", None),
    # recipes
    ("recipe-missing", "replay {d}/absent.json --out {d}/out.safetensors", "does not exist",
     "absent.json"),
    ("recipe-fifo", "replay {d}/fifo.json --out {d}/out.safetensors", "is a FIFO", "fifo.json"),
    ("recipe-not-json", "replay {d}/r_text.json --out {d}/out.safetensors", "not valid JSON",
     "r_text"),
    ("recipe-nested", "replay {d}/r_nested.json --out {d}/out.safetensors", "not valid JSON",
     "r_nested"),
    ("recipe-17-mb", "replay {d}/r_huge.json --out {d}/out.safetensors", "byte limit", "r_huge"),
    ("recipe-array", "replay {d}/r_array.json --out {d}/out.safetensors", "not a JSON object",
     "r_array"),
    ("recipe-lacks", "replay {d}/r_lacks.json --out {d}/out.safetensors", "lacks", "r_lacks"),
    ("recipe-models-string", "replay {d}/r_string_models.json --out {d}/out.safetensors",
     "at least 2 model files", "r_string_models"),
    ("recipe-one-model", "replay {d}/r_one_model.json --out {d}/out.safetensors",
     "at least 2 model files", "r_one_model"),
    ("recipe-nan-gamma", "replay {d}/r_nan_gamma.json --out {d}/out.safetensors", "finite",
     "r_nan_gamma"),
    ("recipe-unknown-option", "replay {d}/r_unknown_option.json --out {d}/out.safetensors",
     "no option", "r_unknown_option"),
    ("recipe-reference", "replay {d}/r_reference.json --out {d}/out.safetensors", "in 0..1",
     "r_reference"),
    ("recipe-weights", "replay {d}/r_weights.json --out {d}/out.safetensors", "sum to 1",
     "r_weights"),
    ("recipe-seed", "replay {d}/r_seed.json --out {d}/out.safetensors", "in 0..4294967295",
     "r_seed"),
    ("recipe-policy", "replay {d}/r_policy.json --out {d}/out.safetensors", "bn_policy",
     "r_policy"),
    ("recipe-data", "replay {d}/r_data.json --out {d}/out.safetensors", "its dataset", "r_data"),
    ("recipe-bad-sha", "replay {d}/r_bad_sha.json --out {d}/out.safetensors", "hex digests",
     "r_bad_sha"),
    ("recipe-model-changed", "replay {d}/r_changed.json --out {d}/out.safetensors",
     "its sha256 differs", "m1.safetensors"),
    ("recipe-models-count", "replay {d}/recipe.json --models {d}/m0.safetensors "
     "--out {d}/out.safetensors", "give them in the recipe's order", "recipe.json"),
    ("recipe-models-swapped", "replay {d}/recipe.json --models {d}/m1.safetensors "
     "{d}/m0.safetensors --out {d}/out.safetensors", "its sha256 differs", "m1.safetensors"),
    ("recipe-folder-lacks", "replay {d}/recipe.json --models {d}/copies --out {d}/out.safetensors",
     "put a copy of it there", "copies"),
    ("recipe-no-sha-folder", "replay {d}/r_no_sha.json --models {d}/copies "
     "--out {d}/out.safetensors", "give the files in order", "r_no_sha"),
    ("replay-unmerged-model", "replay {d}/m0.safetensors --out {d}/out.safetensors",
     "not a merged model", "m0"),
]


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    """The folder of bad inputs (and ``merged.safetensors``, ``recipe.json``)."""
    folder = tmp_path_factory.mktemp("bad")
    build_files(folder)
    merged = folder / "merged.safetensors"
    assert cli.main(["merge", str(folder / "m0.safetensors"), str(folder / "m1.safetensors"),
                     "--method", "average", "--out", str(merged), "--quiet", "--json"]) == 0
    write_recipes(folder, merged)
    return folder


@pytest.fixture(autouse=True)
def _deadline():
    """A case that blocks (a FIFO opened by mistake) fails after 60 s instead of hanging."""
    def expire(_signum, _frame):
        raise TimeoutError("the command blocked")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_a_bad_command_line_fails_in_one_line_and_changes_nothing(d, capsys, case):
    _, command, says, names = case
    before = snapshot(d)
    code = cli.main([*command.format(d=d).split(), "--quiet"])
    out, err = capsys.readouterr()
    line = one_line(err)
    assert code == 2, line
    assert out == ""
    assert says in line
    if names is not None:
        assert names in line
    assert snapshot(d) == before  # inputs byte-identical, no output or temporary file left


def test_the_case_table_is_large_and_distinct():
    ids = [c[0] for c in CLI_CASES] + [_id(c) for c in API_CASES]
    assert len(ids) == len(set(ids)) and len(CLI_CASES) >= 60 and len(API_CASES) >= 40


# ----------------------------------------------------------------------------- API
@pytest.fixture(scope="module")
def pair(d):
    return [load_model(d / "m0.safetensors"), load_model(d / "m1.safetensors")]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _merge(**kwargs):
    """``api.merge`` of the pair with ``kwargs`` (method cca unless given)."""
    return lambda pair, data, _d: api.merge(pair, data, **{"method": "cca", **kwargs})


def _models(models):
    return lambda pair, data, _d: api.merge(models(pair), data, "average")


def _interpolate(**kwargs):
    return lambda pair, data, _d: api.interpolate(*pair, data, **{"method": "cca", **kwargs})


def _spectrum(**kwargs):
    return lambda pair, data, _d: api.spectrum(pair, data, **kwargs)


def _load(name, **kwargs):
    return lambda _pair, _data, d: load_model(d / name, **kwargs)


def _load_bytes(name, **kwargs):
    return lambda _pair, _data, d: load_model_bytes((d / name).read_bytes(), name, **kwargs)


MLP = {"arch": "mlp", "config": tiny().config}

# (id, call(pair, data, folder), what the message says)
API_CASES = [
    ("api-gamma-nan", _merge(gamma=float("nan")), "finite number"),
    ("api-gamma-inf", _merge(gamma=float("inf")), "finite number"),
    ("api-gamma-1e308", _merge(gamma=1e308), "[0, 1e+06]"),
    ("api-gamma-negative", _merge(gamma=-1.0), "[0, 1e+06]"),
    ("api-gamma-word", _merge(gamma="lots"), "must be a number"),
    ("api-relative-word", _merge(relative="maybe"), "true or false"),
    ("api-relative-2", _merge(relative=2), "true or false"),
    ("api-alpha-2", _merge(method="zipit", alpha=2.0), "[0, 1]"),
    ("api-beta-nan", _merge(method="zipit", beta=float("nan")), "finite number"),
    ("api-sweeps-fraction", _merge(method="weight_matching", max_sweeps=2.5), "an integer"),
    ("api-sweeps-0", _merge(method="weight_matching", max_sweeps=0), "[1, 10000]"),
    ("api-sweeps-1e6", _merge(method="weight_matching", max_sweeps=10**6), "[1, 10000]"),
    ("api-unknown-option", _merge(strength=2), "has no option"),
    ("api-unknown-method", _merge(method="magic"), "choose one of"),
    ("api-method-not-a-name", _merge(method=3), "must be a name"),
    ("api-reference-5", _merge(reference=5), "in 0..1"),
    ("api-reference-negative", _merge(reference=-1), "in 0..1"),
    ("api-reference-string", _merge(reference="0"), "an integer"),
    ("api-reference-bool", _merge(reference=True), "an integer"),
    ("api-weights-short", _merge(weights=[1.0]), "one per model"),
    ("api-weights-nan", _merge(weights=[float("nan"), 1.0]), "finite"),
    ("api-weights-negative", _merge(weights=[-1.0, 2.0]), "sum to 1"),
    ("api-weights-unnormalised", _merge(weights=[1.0, 1.0]), "sum to 1"),
    ("api-weights-string", _merge(weights="ab"), "a list of 2 numbers"),
    ("api-stats-samples-1", _merge(stats_samples=1), "at least 2 statistics samples"),
    ("api-stats-samples-fraction", _merge(stats_samples=1.5), "an integer"),
    ("api-seed-negative", _merge(seed=-1), "in 0..4294967295"),
    ("api-seed-2-40", _merge(seed=2**40), "in 0..4294967295"),
    ("api-batch-size-0", _merge(batch_size=0), "batch_size"),
    ("api-bn-policy", _merge(bn_policy="sideways"), "bn_policy"),
    ("api-bn-reset-word", _merge(bn_reset="yes"), "True or False"),
    ("api-no-models", _models(lambda p: []), "at least 2"),
    ("api-one-model", _models(lambda p: p[:1]), "at least 2"),
    ("api-not-a-module", _models(lambda p: [p[0], "m1.safetensors"]), "not a torch.nn.Module"),
    ("api-not-a-list", _models(lambda p: p[0]), "a list of models"),
    ("api-steps-0", _interpolate(steps=0), "in 2..1001"),
    ("api-steps-1e6", _interpolate(steps=10**6), "in 2..1001"),
    ("api-steps-fraction", _interpolate(steps=2.5), "an integer"),
    ("api-interpolate-joint", _interpolate(method="zipit"), "use it with merge"),
    ("api-interpolate-gamma-nan", _interpolate(gamma=float("nan")), "finite number"),
    ("api-spectrum-gamma-nan", _spectrum(gamma=float("nan")), "finite number"),
    ("api-spectrum-gamma-inf", _spectrum(gamma=float("inf")), "finite number"),
    ("api-spectrum-relative-word", _spectrum(relative="x"), "true or false"),
    ("api-spectrum-reference", _spectrum(reference=3), "in 0..1"),
    ("api-load-fifo", _load("fifo.safetensors"), "is a FIFO"),
    ("api-load-dev-zero", _load("zero.safetensors"), "is a character device"),
    ("api-load-declared-size", _load("huge.safetensors"), "does not describe its tensors"),
    ("api-load-bytes-declared-size", _load_bytes("big.safetensors"), "does not describe"),
    ("api-load-bytes-header-length", _load_bytes("long.safetensors"), "header claims"),
    ("api-load-pt-wrong-config", _load("plain.pt", arch="mlp", config={**MLP["config"],
                                                                       "hidden": [9, 9]}),
     "check the architecture description"),
    ("api-archive-fifo", lambda _p, _x, d: load_archive_model(d / "fifo.ts", torch.zeros(2, 64)),
     "is a FIFO"),
    ("api-save-into-a-folder", lambda p, _x, d: save_model(p[0], d / "sub"), "safetensors"),
    ("api-save-under-a-file", lambda p, _x, d: save_model(p[0], d / "m0.bin" / "x.safetensors"),
     "cannot write"),
    ("api-data-missing", lambda _p, _x, d: load_dataset(str(d / "absent.npz")), "absent.npz"),
    pytest.param("api-data-fifo", lambda _p, _x, d: load_dataset(str(d / "fifo.npz")),
                 "fifo.npz is a FIFO"),
    pytest.param("api-data-dev-zero", lambda _p, _x, d: load_dataset(str(d / "zero.npz")),
                 "zero.npz is a character device"),
    pytest.param("api-classes-do-not-fit", lambda p, x, d: api.interpolate(
        load_model(d / "three.safetensors"), load_model(d / "three.safetensors"), x, steps=2),
        "classes"),
    ("api-shape-does-not-fit", lambda p, _x, d: api.merge(p, load_dataset(str(d / "small4.npz"))),
     "pick the dataset"),
]


def _id(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


def _state_digest(models) -> str:
    digest = hashlib.sha256()
    for model in models:
        for key, tensor in model.state_dict().items():
            digest.update(key.encode() + tensor.numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("name, call, says", API_CASES, ids=[_id(c) for c in API_CASES])
def test_a_bad_api_call_raises_one_clear_line_and_changes_nothing(d, pair, digits, name, call,
                                                                   says):
    files, states = snapshot(d), _state_digest(pair)
    with pytest.raises(CcamergeError) as caught:
        call(pair, digits, d)
    assert says in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1
    assert snapshot(d) == files and _state_digest(pair) == states


def test_options_are_checked_by_the_registry_itself():
    cca = get_method("cca")
    assert cca.resolve({"gamma": "2", "relative": "no"}) == {"gamma": 2.0, "relative": False}
    assert cca.resolve({"gamma": 1e6}) == {"gamma": 1e6, "relative": True}  # the bound itself
    assert get_method("weight_matching").resolve({"max_sweeps": 7.0}) == {"max_sweeps": 7}
    with pytest.raises(CcamergeError, match="must be in"):
        cca.resolve({"gamma": 1e6 * (1 + 1e-9)})


# ----------------------------------------------------------------------------- interrupts, pipes
def _interrupted(*_args, **_kwargs):
    raise KeyboardInterrupt


def _half_written(tensors, tmp, metadata=None):
    Path(tmp).write_bytes(b"half a file")
    raise KeyboardInterrupt


class _ClosedPipe(io.StringIO):
    def write(self, _text):
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("where, code", [("merging", 130), ("writing", 130), ("printing", 141)])
def test_interrupts_and_closed_pipes_exit_in_one_line(d, capsys, monkeypatch, where, code):
    out = d / "out.safetensors"
    if where == "merging":
        monkeypatch.setattr(api, "merge", _interrupted)
    elif where == "writing":
        monkeypatch.setattr("ccamerge.io.save_file", _half_written)
    before = snapshot(d)
    if where == "printing":
        monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    result = cli.main(["merge", str(d / "m0.safetensors"), str(d / "m1.safetensors"), "--method",
                       "average", "--out", str(out), "--quiet"])
    monkeypatch.undo()
    line = one_line(capsys.readouterr().err)
    assert result == code
    assert ("interrupted" if code == 130 else "broken pipe") in line
    if where != "printing":
        assert snapshot(d) == before  # no output, no temporary file
    out.unlink(missing_ok=True)


def _ccamerge(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-m", "ccamerge", *args], env=env,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_ctrl_c_of_a_real_process_exits_130_in_one_line(d, tmp_path):
    hang = tmp_path / "hang.py"  # a merge that waits: Ctrl-C arrives while it works
    hang.write_text("import sys, time\nfrom ccamerge import api, cli\n"
                    "api.merge = lambda *a, **k: (print('ready', file=sys.stderr, flush=True), "
                    "time.sleep(60))\nsys.exit(cli.main(sys.argv[1:]))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(hang), "merge", str(d / "m0.safetensors"),
                             str(d / "m1.safetensors"), "--method", "average", "--quiet",
                             "--out", str(tmp_path / "out.safetensors")],
                            env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 130
    assert one_line(err).startswith("ccamerge: interrupted")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_closed_stdout_pipe_exits_141_in_one_line():
    read, write = os.pipe()
    os.close(read)  # nobody reads: the first write fails with EPIPE
    proc = _ccamerge("methods", "--json", stdout=write)
    os.close(write)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert "broken pipe" in one_line(err)


# ----------------------------------------------------------------------------- memory
PEAK = """
import sys
from ccamerge.cli import main
def mb(field):
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1]) // 1024
main(sys.argv[1].split())  # warm: imports, the dataset, the allocator
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # the peak (VmHWM) restarts from the resident size now
before = mb("VmRSS:")
code = main(sys.argv[2].split())
print(code, mb("VmHWM:") - before)
"""


def _peak(warm: str, command: str) -> tuple[int, int, str]:
    """``(exit code, extra peak MB, stderr)`` of ``command`` after ``warm`` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", PEAK, warm, command], capture_output=True,
                          text=True, timeout=300, env=env)
    code, extra = proc.stdout.split()[-2:]
    return int(code), int(extra), proc.stderr


@pytest.mark.parametrize("name", ["big", "huge"])
def test_a_file_declaring_gigabytes_is_refused_within_200_mb(d, name):
    code, extra, err = _peak(f"evaluate {d}/m0.safetensors --quiet",
                             f"evaluate {d}/{name}.safetensors --quiet")
    assert code == 2 and f"{name}.safetensors" in err
    assert extra < 200, f"{extra} MB"


def test_a_zip_bomb_dataset_is_refused_within_200_mb(d, tmp_path):
    bomb = zip_bomb(tmp_path / "bomb.npz")
    assert bomb.stat().st_size < 2**20  # 256 MB of zeros in a few hundred KB
    code, extra, err = _peak(f"evaluate {d}/m0.safetensors --quiet",
                             f"evaluate {d}/m0.safetensors --data {bomb} --quiet")
    assert code == 2 and "bomb.npz" in err
    assert extra < 200, f"{extra} MB"


def test_replay_points_a_recipe_at_copies_by_sha256(d, capsys, tmp_path):
    copies = tmp_path / "copies"
    copies.mkdir()
    for k, name in enumerate(["m0.safetensors", "m1.safetensors"]):
        (copies / f"renamed{k}.safetensors").write_bytes((d / name).read_bytes())
    (copies / "other.safetensors").write_bytes((d / "vgg.safetensors").read_bytes())
    out = tmp_path / "again.safetensors"
    code = cli.main(["replay", str(d / "recipe.json"), "--models", str(copies), "--out", str(out),
                     "--quiet", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["out"] == str(out)
    replayed = load_model(out).info["merge"]
    assert replayed["models"] == [str(copies / "renamed0.safetensors"),
                                  str(copies / "renamed1.safetensors")]
    recorded = json.loads((d / "recipe.json").read_text())
    assert replayed["model_sha256"] == recorded["model_sha256"]
    first, again = load_model(d / "merged.safetensors").state_dict(), load_model(out).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
