"""A seeded fuzz of the command line, in-process: a few hundred malformed models, .npz inputs and
output paths. For every case: exit code 2 (a user's mistake, never 1 and never 0), exactly one line
on stderr and no traceback, every input file byte-identical afterwards, and no stray file left.

A case is (label, seed); its files are built from ``random.Random(seed)`` when it runs, so a failing
case id reproduces alone. Cases whose mutation may happen to leave a valid model (a few flipped
bytes) may also exit 0, writing just the requested output; never 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as _io
import os
import random
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.front import cli

SEED = 20250125

# --- the models and the bundle -------------------------------------------------------------------------


def relu_add() -> onnx.ModelProto:
    """x -> Relu -> Add(b) -> y, shapes (2, 3), with a 6-float initializer b."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Add", ["r", "b"], ["y"], name="add")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [onnx.numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


GOOD = relu_add().SerializeToString()


@pytest.fixture(scope="module")
def base():
    """A world-readable work dir (the read-only cases run as an unprivileged user, who cannot enter
    pytest's private tmp dirs)."""
    top = Path(tempfile.mkdtemp(prefix="graphopt-fuzz-"))
    os.chmod(top, 0o755)
    yield top
    for p in top.rglob("*"):
        if p.is_dir() and not p.is_symlink():
            os.chmod(p, 0o755)
    shutil.rmtree(top)


@pytest.fixture(scope="module")
def bundle(base) -> Path:
    from graphopt.front import api

    (base / "relu_add.onnx").write_bytes(GOOD)
    api.compile(base / "relu_add.onnx", output=base / "bundle")
    return base / "bundle"


@contextlib.contextmanager
def unprivileged():
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


class Case:
    """What one builder returns: the argv, and how to run it."""

    def __init__(self, argv: list, *, may_succeed: bool = False, as_user: bool = False) -> None:
        self.argv = [str(a) for a in argv]
        self.may_succeed = may_succeed
        self.as_user = as_user


# --- malformed models ------------------------------------------------------------------------------------


def _external(d: Path) -> tuple[Path, onnx.ModelProto]:
    path = d / "ext.onnx"
    onnx.save(relu_add(), path, save_as_external_data=True, location="w.bin", size_threshold=0)
    return path, onnx.load(str(path), load_external_data=False)


def _set_ext(proto: onnx.ModelProto, key: str, value: str) -> None:
    entries = proto.graph.initializer[0].external_data
    for e in entries:
        if e.key == key:
            e.value = value
            return
    entries.add(key=key, value=value)


def _model_bytes(d: Path, rng: random.Random, kind: str) -> Path:
    path = d / "m.onnx"
    if kind == "truncated":
        path.write_bytes(GOOD[: rng.randrange(0, len(GOOD))])
    elif kind == "random_bytes":
        path.write_bytes(rng.randbytes(rng.randrange(1, 300)))
    elif kind == "flipped":
        data = bytearray(GOOD)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
    else:
        proto = relu_add()
        node = proto.graph.node[rng.randrange(2)]
        if kind == "renamed_input":
            node.input[rng.randrange(len(node.input))] = f"ghost{rng.randrange(1000)}"
        elif kind == "renamed_output":
            proto.graph.output[0].name = f"nowhere{rng.randrange(1000)}"
        elif kind == "bad_opset":
            proto.opset_import[0].version = rng.choice([0, -1, 99, 1000, 2**40])
        elif kind == "unknown_op":
            node.op_type = rng.choice(["Frobnicate", "relu", "", "Conv2d"])
        elif kind == "duplicate_output":
            proto.graph.node[1].output[0] = "r"
        elif kind == "bad_dtype":
            proto.graph.initializer[0].data_type = rng.choice([0, 999])
        path.write_bytes(proto.SerializeToString())
    return path


def _external_damage(d: Path, rng: random.Random, kind: str) -> Path:
    path, proto = _external(d)
    size = (d / "w.bin").stat().st_size
    if kind == "ext_location":
        _set_ext(proto, "location", rng.choice(["nope.bin", "../w.bin", "/nonexistent/w.bin", "sub/../../w.bin", ""]))
    elif kind == "ext_length":
        _set_ext(proto, "length", str(size + rng.randint(1, 100)))
    elif kind == "ext_offset":
        _set_ext(proto, "offset", str(rng.choice([size, size + 7, -4])))
    elif kind == "ext_truncated":
        with open(d / "w.bin", "r+b") as f:
            f.truncate(rng.randrange(0, size))
    elif kind == "ext_missing":
        (d / "w.bin").unlink()
    path.write_bytes(proto.SerializeToString())
    return path


MODEL_KINDS = {"truncated": 30, "random_bytes": 20, "flipped": 20, "renamed_input": 15, "renamed_output": 5,
               "bad_opset": 10, "unknown_op": 6, "duplicate_output": 3, "bad_dtype": 4}
EXTERNAL_KINDS = {"ext_location": 10, "ext_length": 6, "ext_offset": 6, "ext_truncated": 8, "ext_missing": 4}


def _model_command(d: Path, rng: random.Random, model: Path) -> list:
    if rng.random() < 0.4:
        return ["inspect", model] + (["--json"] if rng.random() < 0.5 else [])
    return ["optimize", model, "-o", d / "out.onnx", "-q", f"-O{rng.randrange(4)}"]


def build_model_case(kind: str) -> Callable[[Path, random.Random, Path], Case]:
    def build(d: Path, rng: random.Random, bundle: Path) -> Case:
        make = _external_damage if kind in EXTERNAL_KINDS else _model_bytes
        model = make(d, rng, kind)
        return Case(_model_command(d, rng, model), may_succeed=kind == "flipped")
    return build


def build_shape_case(d: Path, rng: random.Random, bundle: Path) -> Case:
    (d / "m.onnx").write_bytes(GOOD)
    shape = rng.choice(["x:1,2,3,4", "y:2,3", "x:a,b", "x", ":2,3", "x:-5,3", "x:2,3,"])
    return Case(["inspect", d / "m.onnx", "--input-shape", shape])


# --- malformed .npz inputs for `run` -------------------------------------------------------------------------


def _npz(d: Path, rng: random.Random, kind: str) -> Path:
    path = d / "in.npz"
    x = np.zeros((2, 3), np.float32)
    if kind == "missing_key":
        np.savez(path, **{rng.choice(["X", "input", "y", "b"]): x})
    elif kind == "extra_key":
        np.savez(path, x=x, extra=x)
    elif kind == "wrong_dtype":
        np.savez(path, x=x.astype(rng.choice([np.int64, np.float64, np.bool_, np.int8, np.float16, np.complex64])))
    elif kind == "wrong_shape":
        np.savez(path, x=np.zeros(tuple(rng.randint(1, 4) for _ in range(rng.choice([0, 1, 3, 4]))), np.float32))
    elif kind == "not_zip":
        path.write_bytes(rng.randbytes(rng.randrange(1, 200)))
    elif kind == "truncated_npz":
        buf = _io.BytesIO()
        np.savez(buf, x=x)
        path.write_bytes(buf.getvalue()[: rng.randrange(1, len(buf.getvalue()))])
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, x)
    elif kind == "object":
        np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    elif kind == "empty":
        np.savez(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "missing":
        pass
    return path


NPZ_KINDS = {"missing_key": 6, "extra_key": 3, "wrong_dtype": 10, "wrong_shape": 10, "not_zip": 8,
             "truncated_npz": 10, "npy": 3, "object": 2, "empty": 2, "directory": 2, "missing": 2}


def build_npz_case(kind: str) -> Callable[[Path, random.Random, Path], Case]:
    def build(d: Path, rng: random.Random, bundle: Path) -> Case:
        return Case(["run", bundle, "--inputs", _npz(d, rng, kind), "-o", d / "out.npz"])
    return build


# --- bad output paths ----------------------------------------------------------------------------------------


def _bad_output(d: Path, rng: random.Random, kind: str, input_file: Path | None) -> tuple[Path, bool]:
    """A path graphopt must refuse to write; returns it and whether to run as an unprivileged user."""
    p = d / "target"
    if kind == "dir":
        p.mkdir()
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "chardev":
        os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(1, rng.choice([3, 5, 8])))
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()  # the socket file stays
    elif kind == "symlink":
        (d / "victim.txt").write_text("keep")
        p.symlink_to("victim.txt")
    elif kind == "dangling_symlink":
        p.symlink_to("nowhere.txt")
    elif kind == "missing_parent":
        p = d / "no" / "such" / "out.x"
    elif kind == "parent_is_file":
        (d / "plain").write_text("x")
        p = d / "plain" / "out.x"
    elif kind == "same_as_input":
        p = input_file
    elif kind == "hard_link_to_input":
        os.link(input_file, p)
    elif kind == "too_long":
        p = d / ("n" * rng.randint(256, 400))
    elif kind == "read_only_dir":
        (d / "ro").mkdir()
        os.chmod(d / "ro", 0o555)
        p = d / "ro" / "out.x"
    return p, kind == "read_only_dir"


OUTPUT_KINDS = ["dir", "fifo", "chardev", "socket", "symlink", "dangling_symlink", "missing_parent",
                "parent_is_file", "same_as_input", "hard_link_to_input", "too_long", "read_only_dir"]


def _command_with_output(d: Path, rng: random.Random, bundle: Path, command: str) -> tuple[list, Path | None]:
    """argv with the placeholder OUT where the bad path goes, and the input file it could clobber."""
    if command == "run":
        np.savez(d / "in.npz", x=np.ones((2, 3), np.float32))
        return ["run", bundle, "--inputs", d / "in.npz", "-o", "OUT"], d / "in.npz"
    model = d / "m.onnx"
    model.write_bytes(GOOD)
    if command.startswith("optimize"):
        option = command.split()[1]
        argv = ["optimize", model, "-q", "-o", "OUT" if option == "-o" else d / "o.onnx"]
        return argv + ([option, "OUT"] if option != "-o" else []), model
    if command == "conformance":
        return ["conformance", "-k", "test_relu", "--json", "OUT"], None
    return [command, model, "--json", "OUT"], model


OUTPUT_COMMANDS = ["optimize -o", "optimize --report", "optimize --plot", "run", "bench", "compare", "tune",
                   "conformance"]


def build_output_case(kind: str, command: str) -> Callable[[Path, random.Random, Path], Case]:
    def build(d: Path, rng: random.Random, bundle: Path) -> Case:
        argv, input_file = _command_with_output(d, rng, bundle, command)
        target, as_user = _bad_output(d, rng, kind, input_file)
        return Case([target if a == "OUT" else a for a in argv], as_user=as_user)
    return build


# --- the cases ---------------------------------------------------------------------------------------------


def all_cases() -> list[tuple[str, int, Callable]]:
    rng = random.Random(SEED)
    cases = []
    for kind, n in {**MODEL_KINDS, **EXTERNAL_KINDS}.items():
        cases += [(f"model-{kind}", rng.randrange(2**32), build_model_case(kind)) for _ in range(n)]
    cases += [("input-shape", rng.randrange(2**32), build_shape_case) for _ in range(8)]
    for kind, n in NPZ_KINDS.items():
        cases += [(f"npz-{kind}", rng.randrange(2**32), build_npz_case(kind)) for _ in range(n)]
    for command in OUTPUT_COMMANDS:
        for kind in OUTPUT_KINDS:
            if command == "conformance" and kind in ("same_as_input", "hard_link_to_input"):
                continue
            cases.append((f"out-{command.replace(' ', '')}-{kind}", rng.randrange(2**32),
                          build_output_case(kind, command)))
    return cases


CASES = all_cases()


def _snapshot(paths: list[Path]) -> tuple[dict[str, str], set[str]]:
    """sha256 of every regular file under ``paths`` and the listing (links and special files too)."""
    hashes, names = {}, set()
    for top in paths:
        for p in [top, *top.rglob("*")] if top.is_dir() else [top]:
            names.add(str(p))
            if p.is_file() and not p.is_symlink():
                hashes[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return hashes, names


def test_the_fuzz_has_a_few_hundred_cases():
    assert len(CASES) >= 300
    assert len({seed for _, seed, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("label,seed,build", CASES, ids=[f"{i:03d}-{c[0]}" for i, c in enumerate(CASES)])
def test_fuzz_case(label, seed, build, base, bundle, capsys):
    d = base / f"case-{seed}"
    d.mkdir()
    os.chmod(d, 0o755)
    case = build(d, random.Random(seed), bundle)
    before_hashes, before_names = _snapshot([d, bundle])
    capsys.readouterr()
    with unprivileged() if case.as_user else contextlib.nullcontext():
        try:
            code = cli.main(case.argv)
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    err = capsys.readouterr().err
    after_hashes, after_names = _snapshot([d, bundle])
    assert "Traceback" not in err, err
    assert code != 1, f"{case.argv}: internal error: {err}"
    assert {k: after_hashes.get(k) for k in before_hashes} == before_hashes, "an input file changed"
    if code == 0 and case.may_succeed:
        new = after_names - before_names
        assert new <= {str(d / "out.onnx")}, new
        return
    assert code == 2, f"{case.argv}: exit {code}: {err}"
    assert len(err.strip().splitlines()) == 1, err
    assert after_names == before_names, f"stray files: {after_names ^ before_names}"
