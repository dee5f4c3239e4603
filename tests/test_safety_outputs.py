"""Output paths, inputs that must survive, exit codes and signals: each reproduction of the safety
report is a case here. Every refusal is exit 2 with one line naming the option and the path, comes
before any work (nothing is written), and leaves every input byte-identical."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_io import good_model, sha256

from graphopt.front import cli

from graphopt.core import io

# --- helpers ----------------------------------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_refused(code: int, err: str, *parts: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    return lines[0]


def listing(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def make_special(path: Path, kind: str) -> contextlib.AbstractContextManager:
    """Create a device node, FIFO, socket, directory or symlink at ``path`` (in a tmp dir only)."""
    if kind == "chardev":
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is, but here
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    elif kind == "symlink":
        (path.parent / "target.txt").write_text("keep")
        path.symlink_to("target.txt")
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        return contextlib.closing(s)
    return contextlib.nullcontext()


KIND_WORDS = {"chardev": "character device", "fifo": "FIFO", "dir": "directory", "socket": "socket",
              "symlink": "is a symbolic link; graphopt does not write through links"}


@contextlib.contextmanager
def unprivileged():
    """Drop to an ordinary user's rights (root writes into a read-only directory regardless)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(good_model(), path)
    return path


@pytest.fixture
def external_model(tmp_path) -> Path:
    path = tmp_path / "ext.onnx"
    onnx.save(good_model(), path, save_as_external_data=True, location="w.bin", size_threshold=0)
    return path


# --- 1. -o, --report, --plot: only regular files or new paths -----------------------------------------


@pytest.mark.parametrize("kind", sorted(KIND_WORDS))
@pytest.mark.parametrize("option", ["-o", "--report", "--plot"])
def test_optimize_refuses_special_output_before_any_work(kind, option, model, tmp_path, capsys):
    target = tmp_path / "special"
    with make_special(target, kind):
        before = os.lstat(target)
        out = target if option == "-o" else tmp_path / "out.onnx"
        extra = [] if option == "-o" else [option, target]
        code, _, err = run_cli(capsys, "optimize", model, "-q", "-o", out, *extra)
        assert_refused(code, err, option, str(target), KIND_WORDS[kind])
        after = os.lstat(target)
    assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev)
    assert not (tmp_path / "out.onnx").exists()  # refused before the model was written
    if kind == "symlink":
        assert (tmp_path / "target.txt").read_text() == "keep"


def test_report_into_missing_directory_refused_before_the_model_is_written(model, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code, _, err = run_cli(capsys, "optimize", model, "-o", out, "--report", tmp_path / "nodir" / "r.json")
    assert_refused(code, err, "--report", "nodir", "does not exist")
    assert not out.exists()


def test_read_only_directory_refused_before_any_work(model, capsys):
    top = Path(tempfile.mkdtemp())  # reachable by the unprivileged user, unlike pytest's tmp dirs
    try:
        os.chmod(top, 0o755)
        src = top / "m.onnx"
        src.write_bytes(model.read_bytes())
        os.chmod(src, 0o644)
        ro = top / "ro"
        ro.mkdir(mode=0o555)
        os.chmod(ro, 0o555)
        with unprivileged():
            code, _, err = run_cli(capsys, "optimize", src, "-o", ro / "o.onnx")
        assert_refused(code, err, "-o", str(ro / "o.onnx"), "not writable")
        assert os.listdir(ro) == []
    finally:
        os.chmod(top / "ro", 0o755)
        for p in sorted(top.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        top.rmdir()


def test_two_outputs_on_one_path_refused(model, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(capsys, "optimize", model, "-o", out, "--report", out)
    assert_refused(code, err, "--report", "same path as -o")


# --- 2. never overwrite a file the input model reads ----------------------------------------------------


@pytest.mark.parametrize("how", ["external_data", "hard_link_to_model", "hard_link_to_data", "other_spelling"])
def test_optimize_refuses_every_file_the_input_reads(how, external_model, tmp_path, capsys):
    weights = tmp_path / "w.bin"
    if how == "external_data":
        out = weights
    elif how == "hard_link_to_model":
        out = tmp_path / "alias.onnx"
        os.link(external_model, out)
    elif how == "hard_link_to_data":
        out = tmp_path / "alias.bin"
        os.link(weights, out)
    else:
        (tmp_path / "sub").mkdir()
        out = tmp_path / "sub" / ".." / "w.bin"
    hashes = {p: sha256(p) for p in (external_model, weights)}
    code, _, err = run_cli(capsys, "optimize", external_model, "-o", out, "-q")
    assert_refused(code, err, "-o", str(out), "same file as the input")
    assert {p: sha256(p) for p in hashes} == hashes
    if how == "hard_link_to_data":
        out.unlink()  # onnx.checker refuses external data with several hard links
    io.load(external_model)  # the input still loads, weights included
    assert np.array_equal(onnx.numpy_helper.to_array(onnx.load(str(external_model)).graph.initializer[0]),
                          np.arange(12, dtype=np.float32).reshape(3, 4))


def test_report_naming_the_input_is_refused(external_model, tmp_path, capsys):
    before = sha256(tmp_path / "w.bin")
    code, _, err = run_cli(capsys, "optimize", external_model, "-o", tmp_path / "o.onnx", "--report",
                           tmp_path / "w.bin")
    assert_refused(code, err, "--report", "w.bin", "same file as the input")
    assert sha256(tmp_path / "w.bin") == before and not (tmp_path / "o.onnx").exists()


# --- 5. truncated or missing external data: named at load -----------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "missing", "escaping"])
def test_bad_external_data_names_file_and_tensor(damage, external_model, tmp_path, capsys):
    weights = tmp_path / "w.bin"
    if damage == "truncated":
        with open(weights, "r+b") as f:
            f.truncate(20)
    elif damage == "missing":
        weights.unlink()
    else:
        proto = onnx.load(str(external_model), load_external_data=False)
        for e in proto.graph.initializer[0].external_data:
            if e.key == "location":
                e.value = "../w.bin"
        external_model.write_bytes(proto.SerializeToString())
    for argv in (["inspect", external_model], ["optimize", external_model, "-o", tmp_path / "o.onnx"]):
        code, _, err = run_cli(capsys, *argv)
        assert_refused(code, err, str(external_model), "'W'", "w.bin")
    assert not (tmp_path / "o.onnx").exists()


# --- 3. run: -o, --inputs, temp files -------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from graphopt.front import api

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [onnx.numpy_helper.from_array(np.ones((2, 3), np.float32), "b")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    work = tmp_path_factory.mktemp("bundle")
    onnx.save(m, work / "relu_add.onnx")
    out = work / "b"
    api.compile(work / "relu_add.onnx", output=out)
    return out


@pytest.fixture
def inputs(tmp_path) -> Path:
    path = tmp_path / "in.npz"
    np.savez(path, x=np.array([[-1, 0, 2], [3, -4, 5]], np.float32))
    return path


def test_run_writes_outputs_atomically_and_nothing_else(bundle, inputs, tmp_path, capsys):
    code, out, err = run_cli(capsys, "run", bundle, "--inputs", inputs, "-o", tmp_path / "out.npz")
    assert code == 0, err
    with np.load(tmp_path / "out.npz") as got:
        np.testing.assert_array_equal(got["y"], np.maximum(np.load(inputs)["x"], 0) + 1)
    assert listing(tmp_path) == {"in.npz", "out.npz"}


@pytest.mark.parametrize("case", ["same_as_inputs", "hard_link_to_inputs", "directory", "missing_dir",
                                  "bundle_file"])
def test_run_refuses_bad_output_and_leaves_no_temp_file(case, bundle, inputs, tmp_path, capsys):
    out = {"same_as_inputs": inputs, "hard_link_to_inputs": tmp_path / "alias.npz",
           "directory": tmp_path / "d", "missing_dir": tmp_path / "nodir" / "o.npz",
           "bundle_file": bundle / "manifest.json"}[case]
    if case == "hard_link_to_inputs":
        os.link(inputs, out)
    if case == "directory":
        out.mkdir()
    before_listing, before_hash = listing(tmp_path), sha256(inputs)
    bundle_hashes = {p.name: sha256(p) for p in bundle.iterdir()}
    code, _, err = run_cli(capsys, "run", bundle, "--inputs", inputs, "-o", out)
    assert_refused(code, err, "-o", str(out))
    assert listing(tmp_path) == before_listing and sha256(inputs) == before_hash
    assert {p.name: sha256(p) for p in bundle.iterdir()} == bundle_hashes


def test_run_inputs_npy_is_named_as_such(bundle, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((2, 3), np.float32))
    code, _, err = run_cli(capsys, "run", bundle, "--inputs", tmp_path / "x.npy", "-o", tmp_path / "o.npz")
    assert_refused(code, err, "--inputs", "x.npy", "not an .npz (it is a .npy array file)")
    assert listing(tmp_path) == {"x.npy"}


def test_run_failure_after_start_leaves_no_temp_file(bundle, tmp_path, capsys):
    np.savez(tmp_path / "in.npz", x=np.zeros((3, 3), np.float32))  # wrong shape: the module refuses
    code, _, err = run_cli(capsys, "run", bundle, "--inputs", tmp_path / "in.npz", "-o", tmp_path / "o.npz")
    assert_refused(code, err, "'x'", "shape")
    assert listing(tmp_path) == {"in.npz"}


# --- 4. serve --port ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_serve_port_out_of_range_is_a_usage_error(port, tmp_path, capsys):
    code, _, err = run_cli(capsys, "serve", tmp_path, "--port", port)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--port" in err and "Traceback" not in err


# --- 6. Ctrl-C and SIGTERM -----------------------------------------------------------------------------------


def test_ctrl_c_during_start_up_prints_one_line(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    code, _, err = run_cli(capsys, "passes")
    assert code == 130 and err.strip() == "interrupted"


SLOW_SAVE_DRIVER = textwrap.dedent("""
    import sys, time
    import onnx_ir
    from graphopt.front import cli

    real_save = onnx_ir.save

    def slow_save(model, path, **kw):  # write the temp file, then hang until the signal comes
        real_save(model, path, **kw)
        print("SAVING", flush=True)
        time.sleep(60)

    onnx_ir.save = slow_save
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_sigterm_during_save_leaves_no_temp_dir(model, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(SLOW_SAVE_DRIVER)
    proc = subprocess.Popen([sys.executable, str(driver), "optimize", str(model), "-o", str(work / "o.onnx"), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "SAVING"
        assert any(p.name.startswith(".graphopt-") for p in work.iterdir())  # the save is under way
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143 and err.strip() == "terminated", err
    assert list(work.iterdir()) == []


def test_sigterm_handler_is_restored_after_main(capsys):
    before = signal.getsignal(signal.SIGTERM)
    assert run_cli(capsys, "passes")[0] == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_atomic_write_interrupted_leaves_nothing(tmp_path):
    def interrupted(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.atomic_write(tmp_path / "o.json", interrupted)
    assert listing(tmp_path) == set()


# --- 7. other user mistakes that used to exit 0 or 1 ------------------------------------------------------


@pytest.mark.parametrize("argv,part", [
    (["bench", "MODEL", "--threads", "0", "--against", "none"], "--threads"),
    (["bench", "MODEL", "--top", "-1", "--against", "none"], "--top"),
    (["inspect", "MODEL", "--coverage", "--target", "bogus"], "bogus"),
    (["conformance", "-j", "0", "-k", "test_relu"], "--jobs"),
    (["conformance", "--timeout", "-1", "-k", "test_relu"], "--timeout"),
])
def test_bad_numbers_and_targets_are_usage_errors(argv, part, model, capsys):
    code, _, err = run_cli(capsys, *[model if a == "MODEL" else a for a in argv])
    assert_refused(code, err, part)


# --- tune's database directory and bench's picture ---------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "symlink", "missing_parent"])
def test_tune_checks_its_database_directory_before_searching(tmp_path, capsys, kind):
    db = tmp_path / "db"
    if kind == "file":
        db.write_text("keep")
    elif kind == "symlink":
        (tmp_path / "real").mkdir()
        db.symlink_to(tmp_path / "real")
    else:
        db = tmp_path / "no" / "db"
    onnx.save(good_model(), tmp_path / "m.onnx")
    before = listing(tmp_path)
    code, _, err = run_cli(capsys, "tune", tmp_path / "m.onnx", "--tuning-db", db)
    assert_refused(code, err, "--tuning-db", str(db))
    assert listing(tmp_path) == before


def test_bench_plot_is_written_whole(tmp_path):
    from graphopt.front.bench import plot

    out = tmp_path / "b.png"
    out.write_bytes(b"old picture")
    result = {"model": "m.onnx", "graphopt": {"median_ms": 1.0}, "ort": {"median_ms": 2.0}, "target": "x86",
              "threads": 2}
    plot([result], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert listing(tmp_path) == {"b.png"}  # no temporary file left beside it
    with pytest.raises(KeyError):
        plot([{**result, "graphopt": {}}], out)  # a failed plot keeps the old picture
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and listing(tmp_path) == {"b.png"}


def test_bench_outputs_never_overwrite_the_float_model(tmp_path, capsys):
    onnx.save(good_model(), tmp_path / "q.onnx")
    onnx.save(good_model(), tmp_path / "f.onnx")
    digest = sha256(tmp_path / "f.onnx")
    code, _, err = run_cli(capsys, "bench", tmp_path / "q.onnx", "--float-model", tmp_path / "f.onnx",
                           "--json", tmp_path / "f.onnx")
    assert_refused(code, err, "--json", "is the same file as the input")
    assert sha256(tmp_path / "f.onnx") == digest
