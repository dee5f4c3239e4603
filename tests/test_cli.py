"""The ``graphopt`` command: exit code 2 with one line naming the file/node/option for bad input,
never a traceback; the input is never modified; ``-o`` is written atomically; inspect and passes."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from test_io import BAD_MODELS, good_model, sha256, write_bad_model

from graphopt.passes import default_registry
from graphopt.front import cli

from graphopt.core import io
from graphopt.passes import BUILTIN_PASSES


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own usage errors exit directly
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str, command: str, *parts: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert lines[0].startswith(f"graphopt {command}: error: "), lines[0]
    assert "Traceback" not in err
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def good(tmp_path) -> Path:
    path = tmp_path / "good.onnx"
    onnx.save(good_model(), path)
    return path


# --- bad models and bad options: exit code 2 ------------------------------------------------------


@pytest.mark.parametrize("command", ["optimize", "inspect"])
@pytest.mark.parametrize("kind", sorted(BAD_MODELS))
def test_bad_model_exits_2_with_one_line(kind, command, tmp_path, capsys):
    path, expected = write_bad_model(tmp_path, kind)
    before = sha256(path)
    out = tmp_path / "out.onnx"
    argv = ["optimize", path, "-o", out] if command == "optimize" else ["inspect", path]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert_one_line_error(err, command, str(path), *expected)
    assert not out.exists()
    assert sha256(path) == before


def test_real_subprocess_exit_code_and_single_line(tmp_path):
    path, _ = write_bad_model(tmp_path, "truncated")
    exe = shutil.which("graphopt")
    cmd = [exe] if exe else [sys.executable, "-m", "graphopt.front.cli"]
    proc = subprocess.run([*cmd, "optimize", str(path), "-o", str(tmp_path / "o.onnx")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "optimize", str(path), "not a valid ONNX file")
    assert proc.stdout == ""


def test_input_shape_naming_no_input(good, tmp_path, capsys):
    code, _, err = run_cli(capsys, "optimize", good, "-o", tmp_path / "o.onnx", "--input-shape", "images:1,3")
    assert code == 2
    line = assert_one_line_error(err, "optimize", "'images'")
    assert line.rstrip(")").endswith("x")  # and lists the model's inputs


def test_input_shape_with_wrong_rank(good, tmp_path, capsys):
    code, _, err = run_cli(capsys, "optimize", good, "-o", tmp_path / "o.onnx", "--input-shape", "x:1,2,3")
    assert code == 2
    line = assert_one_line_error(err, "optimize", "'x'")
    assert "rank" in line.lower()


def test_input_shape_bad_syntax(good, tmp_path, capsys):
    code, _, err = run_cli(capsys, "inspect", good, "--input-shape", "x:2,th-ree")
    assert code == 2
    assert_one_line_error(err, "inspect", "x:2,th-ree")


@pytest.mark.parametrize("option", ["--passes", "--disable", "--force"])
def test_unknown_pass_is_named(option, good, tmp_path, capsys):
    code, _, err = run_cli(capsys, "optimize", good, "-o", tmp_path / "o.onnx", option, "remove_noops,no_such_pass")
    assert code == 2
    assert_one_line_error(err, "optimize", "no_such_pass", "remove_noops")  # and lists the known ones
    assert not (tmp_path / "o.onnx").exists()


def test_bad_opt_level_and_missing_output_are_usage_errors(good, capsys):
    assert run_cli(capsys, "optimize", good, "-O7", "-o", "x.onnx")[0] == 2
    code, _, err = run_cli(capsys, "optimize", good)
    assert code == 2 and "-o" in err and "Traceback" not in err


class _BreakGraph(ir.passes.InPlacePass):
    """Drops the first node although its output is still used: the verifier must catch it."""

    def call(self, model):
        model.graph.remove(next(iter(model.graph)), safe=False)
        return ir.passes.PassResult(model, modified=True)


class _Crash(ir.passes.InPlacePass):
    def call(self, model):
        raise RuntimeError("boom")


@pytest.fixture
def custom_registry(monkeypatch):
    registry = default_registry(plugins=False)
    registry.register("break_graph", _BreakGraph)
    registry.register("crash", _Crash)
    import graphopt.front.api

    monkeypatch.setattr(graphopt.front.api, "default_registry", lambda plugins=True: registry)
    return registry


@pytest.mark.parametrize(("name", "why"), [("break_graph", "left an invalid graph"), ("crash", "boom")])
def test_custom_pass_failure_names_the_pass(name, why, custom_registry, good, tmp_path, capsys):
    before = sha256(good)
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(capsys, "optimize", good, "-o", out, "--passes", name)
    assert code == 2
    assert_one_line_error(err, "optimize", f"'{name}'", why)
    assert not out.exists()
    assert sha256(good) == before


# --- -o: never the input, written atomically -------------------------------------------------------


def test_output_equal_to_input_is_refused(good, capsys):
    before = sha256(good)
    for spelling in (good, good.parent / "." / "sub" / ".." / good.name):
        (good.parent / "sub").mkdir(exist_ok=True)
        code, _, err = run_cli(capsys, "optimize", spelling, "-o", good, "-O0")
        assert code == 2
        assert_one_line_error(err, "optimize", "-o", "input")
    assert sha256(good) == before


def test_failed_write_keeps_the_old_output(good, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old output")

    def failing_save(model, path, **kwargs):
        Path(path).write_bytes(b"\x08partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.ir, "save", failing_save)
    code, _, err = run_cli(capsys, "optimize", good, "-o", out, "-O0")
    assert code == 2
    assert_one_line_error(err, "optimize", str(out), "No space left")
    assert out.read_bytes() == b"old output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.onnx", "out.onnx"]


def test_optimize_writes_output_and_report_leaving_input_alone(good, tmp_path, capsys):
    before = sha256(good)
    out, report = tmp_path / "o.onnx", tmp_path / "report.json"
    code, stdout, err = run_cli(capsys, "optimize", good, "-o", out, "-O1", "--report", report)
    assert code == 0, err
    assert sha256(good) == before
    onnx.checker.check_model(str(out))
    data = json.loads(report.read_text())
    assert data["opt_level"] == 1 and data["output"] == str(out)
    assert [p["name"] for p in data["passes"]]  # -O1 runs the cleanup passes
    assert "->" in stdout


# --- inspect and passes ------------------------------------------------------------------------


def test_inspect_text_and_json_agree_with_the_model(capsys):
    proto = onnx.load(str(__import__("graphopt").models.resolve("light:squeezenet")))
    code, text, err = run_cli(capsys, "inspect", "light:squeezenet")
    assert code == 0, err
    assert f"nodes: {len(proto.graph.node)}" in text
    assert "data_0" in text and "Conv" in text
    code, js, err = run_cli(capsys, "inspect", "light:squeezenet", "--json")
    assert code == 0, err
    info = json.loads(js)
    assert info["nodes"] == len(proto.graph.node)
    assert sum(info["op_histogram"].values()) == info["nodes"]
    ops = {n.op_type for n in proto.graph.node}
    assert set(info["op_histogram"]) == ops
    assert [o["name"] for o in info["outputs"]] == [o.name for o in proto.graph.output]
    assert "data_0" in [i["name"] for i in info["inputs"]]
    assert isinstance(info["flops"], int) and info["flops"] > 0


def test_inspect_with_input_shape_fixes_dynamic_dims(capsys):
    code, js, err = run_cli(capsys, "inspect", "rapidocr:cls", "--input-shape", "x:1,3,48,192", "--json")
    assert code == 0, err
    info = json.loads(js)
    assert info["inputs"][0]["shape"] == [1, 3, 48, 192]
    assert info["flops"] and info["flops"] > 0


def test_passes_lists_every_builtin(capsys):
    code, text, _ = run_cli(capsys, "passes")
    assert code == 0
    listed = {line.split()[0] for line in text.splitlines() if line.strip()}
    assert set(BUILTIN_PASSES) <= listed
    code, js, _ = run_cli(capsys, "passes", "--json")
    rows = json.loads(js)
    by_name = {r["name"]: r for r in rows}
    assert set(BUILTIN_PASSES) <= set(by_name)
    assert all(by_name[n]["source"] == "builtin" and by_name[n]["description"] for n in BUILTIN_PASSES)


def test_no_command_and_unknown_option(capsys):
    assert run_cli(capsys)[0] == 2
    code, _, err = run_cli(capsys, "passes", "--frobnicate")
    assert code == 2 and "--frobnicate" in err and "Traceback" not in err


def test_optimize_o0_reports_the_real_node_count(good, tmp_path, capsys):
    code, stdout, err = run_cli(capsys, "optimize", good, "-o", tmp_path / "o.onnx", "-O0")
    assert code == 0, err
    n = len(onnx.load(str(good)).graph.node)
    assert stdout.strip().endswith(f"nodes {n} -> {n}")


def test_optimize_dump_ir_writes_one_file_per_modifying_pass(tmp_path):
    from graphopt.front.cli import main

    out, dump = tmp_path / "o.onnx", tmp_path / "dump"
    assert main(["optimize", "light:squeezenet", "-O2", "-o", str(out), "-q", "--dump-ir", str(dump)]) == 0
    files = sorted(p.name for p in dump.iterdir())
    assert files and all(f.endswith(".txt") for f in files)
    assert any("freeze_initializers" in f for f in files)
    assert "Conv" in (dump / files[-1]).read_text()


def test_bundled_models_compile_and_tune_with_their_default_shapes():
    """`graphopt compile/tune rapidocr:rec` without --input-shape fix the dims the model is published
    with as dynamic, as `bench` does; given shapes and files are left as they are."""
    from graphopt.front import api
    from graphopt import models

    assert api.input_shapes_for("rapidocr:rec", None) == models.default_input_shapes("rapidocr:rec")
    assert api.input_shapes_for("rapidocr:rec", ["x:1,3,48,160"]) == ["x:1,3,48,160"]
    assert api.input_shapes_for("model.onnx", None) is None


def test_optimize_for_onnx_runtime_fuses_conv_activations(tmp_path, capsys):
    from graphopt.models import random_inputs, resolve
    from graphopt.passes.graphopt_ops import run_ort

    src = resolve("light:squeezenet")
    portable, ort_out = tmp_path / "p.onnx", tmp_path / "o.onnx"
    for out, extra in ((portable, []), (ort_out, ["--target-runtime", "ort"])):
        code, _, err = run_cli(capsys, "optimize", src, "-o", out, "-O3", "-q", *extra)
        assert code == 0, err
    p, o = onnx.load(str(portable)), onnx.load(str(ort_out))
    assert not any(n.domain == "com.microsoft" for n in p.graph.node)
    fused = [n for n in o.graph.node if n.op_type == "FusedConv"]
    assert len(fused) == 26 and not any(n.op_type == "Relu" for n in o.graph.node)  # every conv takes its Relu
    onnx.checker.check_model(o)
    # numerics on real weights (the light models' generated weights give uniform outputs)
    cls, cls_out = resolve("rapidocr:cls"), tmp_path / "cls.onnx"
    code, _, err = run_cli(capsys, "optimize", cls, "-o", cls_out, "-O3", "-q", "--target-runtime", "ort",
                           "--input-shape", "x:1,3,48,192")
    assert code == 0, err
    assert sum(n.op_type == "FusedConv" for n in onnx.load(str(cls_out)).graph.node) > 0
    feeds = random_inputs(str(cls), seed=0, input_shapes=["x:1,3,48,192"])
    want = run_ort(ir.load(cls), feeds)[0]
    np.testing.assert_allclose(run_ort(ir.load(cls_out), feeds)[0], want, rtol=1e-4, atol=1e-5)
