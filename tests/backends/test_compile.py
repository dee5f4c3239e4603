"""compile_model: optimize -> lower -> Relax -> schedules -> tvm.compile, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
from compile_nets import conv_net, ort_run, two_input_net, unsupported_net

from graphopt.front import api
from graphopt.backends import compile as compile_mod
from graphopt.backends.compile import CompileStageError, compile_model
from graphopt.front.cli import main
from graphopt.core.errors import GraphoptError, ShapeError, UnsupportedError

RTOL, ATOL = 1e-3, 1e-4


@pytest.fixture(scope="module")
def conv_path(tmp_path_factory):
    return conv_net(tmp_path_factory.mktemp("m") / "conv.onnx")


@pytest.fixture(scope="module")
def compiled_conv(conv_path):
    return api.compile(conv_path, target="x86", opt_level=2)


def test_conv_net_matches_onnxruntime(conv_path, compiled_conv):
    x = np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)
    (expected,) = ort_run(conv_path, {"x": x})
    out = compiled_conv(x)
    assert list(out) == ["y"]
    np.testing.assert_allclose(out["y"], expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(compiled_conv(x=x)["y"], out["y"], rtol=0, atol=0)
    assert compiled_conv.input_info == {"x": ((1, 3, 16, 16), "float32")}
    assert compiled_conv.output_names == ["y"]
    for stage in ("check_shapes", "optimize", "check_supported", "lower", "relax", "schedules", "build"):
        assert compiled_conv.timings[stage] >= 0.0
    assert compiled_conv.embedded_params


def test_two_inputs_two_outputs_positional_and_named(tmp_path):
    path = two_input_net(tmp_path / "two.onnx")
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 64)).astype(np.float32), rng.standard_normal(40).astype(np.float32)
    ey, ez = ort_run(path, {"a": a, "b": b})
    c = compile_model(api.load(path), opt_level=1, embed_params=False)
    assert c.params and not c.embedded_params
    out = c(a, b=b)
    assert list(out) == ["y", "z"]
    np.testing.assert_allclose(out["y"], ey, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out["z"], ez, rtol=RTOL, atol=ATOL)
    with pytest.raises(GraphoptError, match="input 'a': dtype float64, expected float32"):
        c(a.astype(np.float64), b)
    with pytest.raises(GraphoptError, match="missing input 'b'"):
        c(a)


def test_dynamic_dims_need_input_shape(tmp_path, capsys):
    path = conv_net(tmp_path / "dyn.onnx", batch="N")
    with pytest.raises(ShapeError, match=r"'x' dim 0 \(N\).*--input-shape"):
        compile_model(api.load(path))
    assert main(["compile", path, "-o", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "'x' dim 0" in err and "--input-shape x:1,3,16,16" in err
    assert not (tmp_path / "b").exists()
    assert main(["compile", path, "-o", str(tmp_path / "b"), "--input-shape", "x:2,3,16,16", "-O1"]) == 0
    m = api.load_bundle(tmp_path / "b")
    x = np.random.default_rng(4).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(m(x)["y"], ort_run(path, {"x": x})[0], rtol=RTOL, atol=ATOL)


def test_unsupported_op_is_listed_before_compiling(tmp_path, capsys):
    path = unsupported_net(tmp_path / "frob.onnx")
    with pytest.raises(UnsupportedError, match="Frobnicate"):
        compile_model(api.load(path))
    assert main(["compile", path, "-o", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "Frobnicate" in err and "com.example" in err
    assert "Traceback" not in err


def test_tvm_failure_names_the_stage(conv_path, tmp_path, monkeypatch, capsys):
    def broken(mod, spec):
        raise RuntimeError("InternalError: Check failed: something deep in TVM\n  File x.cc line 3")

    monkeypatch.setattr(compile_mod, "_build", broken)
    with pytest.raises(CompileStageError, match="stage 'build' failed") as e:
        compile_model(api.load(conv_path), opt_level=0)
    assert e.value.stage == "build"
    assert main(["compile", conv_path, "-o", str(tmp_path / "b"), "-O0"]) == 1
    err = capsys.readouterr().err
    assert "stage 'build'" in err and "internal error" in err


def test_bad_target_and_tuning_db_are_usage_errors(conv_path, tmp_path, capsys):
    assert main(["compile", conv_path, "-o", str(tmp_path / "b"), "--target", "riscv"]) == 2
    assert "presets: x86, aarch64, cuda" in capsys.readouterr().err
    assert main(["compile", conv_path, "-o", str(tmp_path / "b"), "--tuning-db", str(tmp_path / "nodb")]) == 2
    assert "--tuning-db" in capsys.readouterr().err


def test_cuda_code_generation_without_a_gpu(conv_path):
    c = compile_model(api.load(conv_path), target="cuda", opt_level=0)
    assert c.target.kind == "cuda"
    if not c.target.can_run_here():
        with pytest.raises(UnsupportedError, match="no CUDA GPU"):
            c(np.zeros((1, 3, 16, 16), np.float32))


def test_aarch64_compiles_but_does_not_run_here(conv_path, tmp_path, monkeypatch):
    import platform

    c = compile_model(api.load(conv_path), target="aarch64", opt_level=0)
    if platform.machine() != "aarch64":
        with pytest.raises(UnsupportedError, match="cannot run on this"):
            c(np.zeros((1, 3, 16, 16), np.float32))
    import graphopt.backends.targets as targets

    monkeypatch.setattr(targets.shutil, "which", lambda name: None)
    with pytest.raises(UnsupportedError, match="aarch64-linux-gnu-gcc"):
        compile_model(api.load(conv_path), target="aarch64", output=tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_layout_ops_on_constants_fold_without_kernels():
    import tvm
    from tvm import relax

    from graphopt.backends.constants import fold_layout_of_constants

    w = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    x = relax.Var("x", relax.TensorType((4, 3, 2), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            t = bb.emit(relax.op.permute_dims(relax.const(w), [2, 1, 0]))
            e = bb.emit(relax.op.expand_dims(relax.const(w[0, :, 0]), [0, 2]))
            y = bb.emit(relax.op.add(relax.op.add(x, t), relax.op.reshape(e, (1, 3, 1))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = fold_layout_of_constants(bb.get())
    text = mod.script()
    assert "permute_dims" not in text and "expand_dims" not in text and "reshape" not in text
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    xv = np.random.default_rng(0).standard_normal((4, 3, 2)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(xv)).numpy()
    np.testing.assert_allclose(got, xv + w.transpose(2, 1, 0) + w[0, :, 0].reshape(1, 3, 1), rtol=0, atol=0)


def test_broadcast_constants_fold_up_to_the_bound(monkeypatch):
    """A fill value broadcast to a weight's shape (ONNX Expand / ConstantOfShape) becomes the weight;
    above ``BROADCAST_MAX_BYTES`` it stays a broadcast."""
    import tvm
    from tvm import relax

    from graphopt.backends import constants

    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            w = bb.emit(relax.op.broadcast_to(relax.const(np.float32(0.5)), (8, 6)))
            out = bb.emit_output(bb.emit(relax.op.matmul(x, w)))
        bb.emit_func_output(out)
    folded = constants.fold_layout_of_constants(bb.get())
    assert "broadcast_to" not in folded.script()
    xv = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    vm = relax.VirtualMachine(tvm.compile(folded, target="llvm"), tvm.cpu())
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(xv)).numpy(), xv @ np.full((8, 6), 0.5, np.float32),
                               rtol=1e-6)
    monkeypatch.setattr(constants, "BROADCAST_MAX_BYTES", 8 * 6 * 4 - 1)
    assert "broadcast_to" in constants.fold_layout_of_constants(bb.get()).script()


def test_tvm_error_summary_is_the_failed_check():
    from graphopt.backends.compile import first_error_line

    text = ("Traceback (most recent call last):\n  File \"x.cc\", line 3\n  (... 59 lines skipped ...)\n"
            "InternalError: Check failed: (a == b) is false: shapes differ\n  File \"y.cc\", line 9\n")
    assert first_error_line(RuntimeError(text)) == "InternalError: Check failed: (a == b) is false: shapes differ"
    assert first_error_line(ValueError("plain message")) == "plain message"


def test_tuning_db_is_applied_and_recorded(conv_path, tmp_path):
    from graphopt.backends.tuning import database_hash, open_database

    db = tmp_path / "db"
    open_database(db, create=True)  # an empty database: every function keeps graphopt's schedule
    c = compile_model(api.load(conv_path), opt_level=1, tuning_db=db, output=tmp_path / "b")
    assert "tuning_db" in c.timings
    import json

    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["tuning_db_sha256"] == database_hash(db)
    x = np.random.default_rng(7).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(c(x)["y"], ort_run(conv_path, {"x": x})[0], rtol=RTOL, atol=ATOL)


def test_zero_element_constants_survive_the_executable(tmp_path):
    from onnx import TensorProto
    from onnx import helper as h
    from onnx import numpy_helper as nh

    # Reshape(allowzero) of an empty tensor folds to an empty constant, which TVM cannot reload as such
    graph = h.make_graph(
        [h.make_node("Reshape", ["data", "shape"], ["y"], allowzero=1), h.make_node("Relu", ["x"], ["z"])],
        "empty", [h.make_tensor_value_info("data", TensorProto.FLOAT, [0, 3, 4]),
                  h.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4, 0]), h.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])],
        [nh.from_array(np.array([3, 4, 0], np.int64), "shape")],
    )
    import onnx

    path = tmp_path / "empty.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), path)
    data, x = np.zeros((0, 3, 4), np.float32), np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    ey, ez = ort_run(path, {"data": data, "x": x})
    out = api.compile(str(path), opt_level=2, output=tmp_path / "b")(data, x)
    assert out["y"].shape == ey.shape == (3, 4, 0)
    np.testing.assert_array_equal(out["z"], ez)
    assert api.load_bundle(tmp_path / "b")(data=data, x=x)["y"].shape == (3, 4, 0)
