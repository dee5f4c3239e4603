"""Loading and saving: bad files are one-line errors naming the file and node, saves are atomic,
inputs are never modified; the named-model loader (graphopt.models) and its cache."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.core import io
from graphopt import models
from graphopt.core.errors import GraphoptError, ModelLoadError, UsageError
from graphopt.models import cache

# --- bad models (test_cli.py uses these too) ------------------------------------------------------


def _vi(name, shape=(2, 3)):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def good_model() -> onnx.ModelProto:
    w = onnx.numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "W")
    return _model(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"], name="relu0")],
        [_vi("x")], [_vi("y", (2, 4))], [w],
    )


def _bytes_of(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


# name -> (file contents, substrings the one-line message must contain besides the file name)
BAD_MODELS: dict[str, tuple[bytes, tuple[str, ...]]] = {
    "truncated": (_bytes_of(good_model())[:45], ("not a valid ONNX file",)),
    "not_onnx": (b"name,value\nx,1\n" * 20, ("not a valid ONNX file",)),
    "fails_checker": (
        _bytes_of(_model([helper.make_node("Relu", ["x"], ["y"], name="relu0", alpha=1.0)], [_vi("x")], [_vi("y")])),
        ("onnx.checker", "relu0", "alpha"),
    ),
    "cycle": (
        _bytes_of(_model(
            [helper.make_node("Add", ["x", "b"], ["a"], name="add0"), helper.make_node("Relu", ["a"], ["b"], name="relu1")],
            [_vi("x")], [_vi("b")],
        )),
        ("cycle", "add0", "relu1"),
    ),
    "dangling_value": (
        _bytes_of(_model([helper.make_node("Add", ["x", "ghost"], ["y"], name="add_ghost")], [_vi("x")], [_vi("y")])),
        ("add_ghost", "'ghost'", "never defined"),
    ),
    "missing_initializer": (
        _bytes_of(_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [_vi("x")], [_vi("y", (2, 4))])),
        ("'mm'", "'W'", "never defined"),
    ),
    "unknown_opset": (
        _bytes_of(_model([helper.make_node("Relu", ["x"], ["y"], name="relu0")], [_vi("x")], [_vi("y")], opset=99)),
        ("opset", "99"),
    ),
    "unknown_op": (
        _bytes_of(_model([helper.make_node("Frobnicate", ["x"], ["y"], name="frob")], [_vi("x")], [_vi("y")])),
        ("Frobnicate",),
    ),
}


def write_bad_model(directory: Path, kind: str) -> tuple[Path, tuple[str, ...]]:
    data, expected = BAD_MODELS[kind]
    path = directory / f"{kind}.onnx"
    path.write_bytes(data)
    return path, expected


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- loading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BAD_MODELS))
def test_bad_model_is_one_line_error_naming_file_and_node(kind, tmp_path):
    path, expected = write_bad_model(tmp_path, kind)
    for load in (io.load, graphopt.load):
        with pytest.raises(ModelLoadError) as info:
            load(path)
        msg = str(info.value)
        assert "\n" not in msg
        assert str(path) in msg
        for part in expected:
            assert part in msg, f"{kind}: {part!r} not in {msg!r}"


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        io.load(tmp_path / "nope.onnx")
    with pytest.raises(ModelLoadError, match="is a directory"):
        io.load(tmp_path)


def test_good_model_loads_and_runs_like_the_file(tmp_path):
    src = tmp_path / "good.onnx"
    onnx.save(good_model(), src)
    model = io.load(src)
    assert [n.op_type for n in model.graph] == ["MatMul", "Relu"]
    out = io.save(model, tmp_path / "copy.onnx")
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, ref)


# --- saving ----------------------------------------------------------------------------------------


class _InPlaceScale(ir.passes.InPlacePass):
    """Scales every initializer in place (so a careless loader would write through to the input)."""

    def call(self, model):
        for v in model.graph.initializers.values():
            v.const_value = ir.tensor(v.const_value.numpy() * 2, name=v.name)
        return ir.passes.PassResult(model, modified=True)


def test_input_file_never_modified(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(good_model(), src)
    before = sha256(src)
    registry = graphopt.default_registry(plugins=False)
    registry.register("scale_weights", _InPlaceScale)
    result = graphopt.optimize(src, passes=["scale_weights"], registry=registry)
    graphopt.save(result.model, tmp_path / "out.onnx")
    assert sha256(src) == before
    w = onnx.numpy_helper.to_array(onnx.load(str(tmp_path / "out.onnx")).graph.initializer[0])
    np.testing.assert_array_equal(w, np.arange(12, dtype=np.float32).reshape(3, 4) * 2)


def test_failed_save_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous contents")
    model = ir.serde.deserialize_model(good_model())

    def failing_save(model, path, **kwargs):
        Path(path).write_bytes(b"\x08\x07partial")  # half a model, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.ir, "save", failing_save)
    with pytest.raises(GraphoptError, match="No space left on device") as info:
        io.save(model, out)
    assert str(out) in str(info.value)
    assert out.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_save_to_missing_directory_is_an_error(tmp_path):
    model = ir.serde.deserialize_model(good_model())
    with pytest.raises(ModelLoadError, match="does not exist"):
        io.save(model, tmp_path / "no" / "such" / "dir.onnx")


def _external_model(tmp_path: Path, nbytes: int = 1 << 20) -> Path:
    w = np.random.default_rng(0).standard_normal((nbytes // 16, 4)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [x], [y],
                   [onnx.numpy_helper.from_array(w, "W")])
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="ext.weights", size_threshold=0)
    return path


def test_external_data_round_trip_keeps_weights_and_input(tmp_path):
    src = _external_model(tmp_path)
    data = tmp_path / "ext.weights"
    hashes = (sha256(src), sha256(data))
    model = io.load(src)
    assert io.has_external_data(model)
    (tmp_path / "out").mkdir()
    out = io.save(model, tmp_path / "out" / "o.onnx")
    assert (tmp_path / "out" / "o.onnx.data").exists()
    reloaded = onnx.load(str(out))
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(reloaded.graph.initializer[0]),
        onnx.numpy_helper.to_array(onnx.load(str(src)).graph.initializer[0]),
    )
    assert (sha256(src), sha256(data)) == hashes


def test_save_refuses_to_overwrite_the_weights_it_reads(tmp_path):
    src = _external_model(tmp_path)
    before = sha256(tmp_path / "ext.weights")
    model = io.load(src)
    with pytest.raises(ModelLoadError, match="ext.weights"):
        io.save(model, tmp_path / "other.onnx", external_data="ext.weights")
    assert sha256(tmp_path / "ext.weights") == before


# --- named models ----------------------------------------------------------------------------------


def test_unknown_model_name_lists_known_names():
    with pytest.raises(UsageError) as info:
        models.resolve("light:nosuchnet")
    assert "light:resnet50" in str(info.value) and "rapidocr:det" in str(info.value)
    with pytest.raises(UsageError):
        models.default_input_shapes("nosuch:model")


def test_light_models_resolve_and_match_their_reference_data():
    names = models.available()
    assert {"light:squeezenet", "rapidocr:rec", "silero:openvino_16k"} <= set(names)
    inputs, outputs = models.reference_data("light:squeezenet")
    assert set(inputs) == {"data_0"} and inputs["data_0"].shape == (1, 3, 224, 224)
    sess = ort.InferenceSession(str(models.resolve("light:squeezenet")), providers=["CPUExecutionProvider"])
    got = sess.run(None, inputs)[0]
    np.testing.assert_allclose(got, next(iter(outputs.values())), rtol=1e-4, atol=1e-6)
    assert models.default_input_shapes("light:resnet50") == ["gpu_0/data_0:1,3,224,224"]
    model = graphopt.load("light:squeezenet")
    assert "data_0" in [v.name for v in model.graph.inputs]


def test_random_inputs_are_seeded_and_typed():
    a = models.random_inputs("light:shufflenet", seed=3)
    b = models.random_inputs("light:shufflenet", seed=3)
    c = models.random_inputs("light:shufflenet", seed=4)
    (name, x), = a.items()
    assert x.dtype == np.float32 and x.shape == (1, 3, 224, 224)
    assert -1.0 <= x.min() < x.max() <= 1.0
    np.testing.assert_array_equal(x, b[name])
    assert not np.array_equal(x, c[name])


def test_pypi_model_is_fetched_checked_and_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    path = models.resolve("rapidocr:cls")
    assert path.parent == tmp_path / "cache"
    assert models.sha256_file(path) == models.entry("rapidocr:cls").sha256
    assert models.reference_data("rapidocr:cls") is None
    assert models.default_input_shapes("rapidocr:cls") == ["x:1,3,48,192"]
    feeds = models.random_inputs("rapidocr:cls", seed=0)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert y.shape == (1, 2) and np.allclose(y.sum(axis=1), 1.0, atol=1e-4)  # softmax over 2 classes
    # a corrupted cache entry is detected by its sha256 and fetched again
    path.write_bytes(b"corrupt")
    cache._verified.clear()
    again = models.resolve("rapidocr:cls")
    assert models.sha256_file(again) == models.entry("rapidocr:cls").sha256


def test_concurrent_fetches_do_not_corrupt_the_cache(tmp_path):
    cache = tmp_path / "cache"
    script = textwrap.dedent("""
        import sys
        from graphopt import models
        p = models.resolve("silero:openvino_16k")
        print(models.sha256_file(p))
    """)
    env = {**os.environ, "GRAPHOPT_CACHE_DIR": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    expected = models.entry("silero:openvino_16k").sha256
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert out.strip() == expected
    leftovers = [p.name for p in cache.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_download_failure_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no index, no mirror: as if offline
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(GraphoptError) as info:
        models.resolve("silero:vad")
    msg = str(info.value)
    assert "silero-vad==6.2.3" in msg and "\n" not in msg


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    import os
    import stat

    from graphopt.core.io import atomic_write_text

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        (tmp_path / "b.json").write_text("{}")
    finally:
        os.umask(mask)
    mode = stat.S_IMODE((tmp_path / "a.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o644
