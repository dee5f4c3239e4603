"""Weights outside the library: params.npz written aligned, memory-mapped by the loader and handed to
TVM without a copy; a missing or truncated external weights file refused with one line naming it."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import onnx_ir as ir
import pytest

import graphopt

from graphopt.backends.bundle import load_bundle
from graphopt.backends.bundle.loader import map_params
from graphopt.backends.bundle.weights import ALIGN, write_params
from graphopt.backends.compile import compile_model
from graphopt.core.errors import GraphoptError
from graphopt.front.cli import main
from tests.test_large_model import build_matmul_chain, ort_in_child

LAYERS, WIDTH = 3, 256  # 768 KiB of weights: compiled with embed_params=False to get a params file


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "p0": rng.standard_normal((3, 5)).astype(np.float32),
        "p1": np.arange(7, dtype=np.int64),
        "p2": np.asfortranarray(rng.standard_normal((4, 6))),
        "p3": rng.standard_normal((8, 6)).astype(np.float32)[:, ::2],  # not contiguous: copied when written
        "p4": np.zeros((0, 3), np.float32),
        "p5": np.array(3.5, np.float16),
        "p6": rng.standard_normal(100) > 0,
    }


def _data_offsets(path) -> dict[str, int]:
    """Where each member's array data starts in the file (local header, then the .npy header)."""
    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            f.seek(info.header_offset + 26)
            n, e = np.frombuffer(f.read(4), "<u2")
            f.seek(info.header_offset + 30 + int(n) + int(e))
            version = np.lib.format.read_magic(f)
            (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
            out[info.filename[:-4]] = f.tell()
    return out


def test_params_file_is_a_plain_npz_with_aligned_mapped_arrays(tmp_path):
    arrays = _arrays()
    path = tmp_path / "params.npz"
    write_params(path, arrays)
    with np.load(path, allow_pickle=False) as data:  # any numpy reads it
        for key, want in arrays.items():
            assert data[key].dtype == want.dtype and np.array_equal(data[key], want), key
    offsets = _data_offsets(path)
    assert all(offset % ALIGN == 0 for offset in offsets.values()), offsets
    mapped = map_params(str(path), list(arrays))
    for (key, want), got in zip(arrays.items(), mapped):
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), key
        if want.size:
            assert isinstance(got, np.memmap) and got.ctypes.data % 64 == 0, key


def test_params_array_past_its_entry_names_the_array_and_weight(tmp_path):
    """An .npy header promising more bytes than its zip entry holds (a damaged or forged file, loaded
    with verify=False) is refused naming the file, the array and the weight, not mapped past the end."""
    from graphopt.backends.bundle.loader import BundleError

    path = tmp_path / "params.npz"
    write_params(path, {"p0": np.ones((64, 64), np.float32)})
    raw = path.read_bytes()
    assert raw.count(b"(64, 64)") == 1
    path.write_bytes(raw.replace(b"(64, 64)", b"(64, 99)"))
    with pytest.raises(BundleError) as e:
        map_params(str(path), ["p0"], ["W0"])
    message = str(e.value)
    assert str(path) in message and "array 'p0' (weight 'W0')" in message and "truncated or damaged" in message


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    d = tmp_path_factory.mktemp("chain")
    model, weight_bytes = build_matmul_chain(d / "src", LAYERS, WIDTH)
    x = np.random.default_rng(1).standard_normal((1, WIDTH), dtype=np.float32)
    np.savez(d / "in.npz", x=x)
    ort_in_child(model, d / "in.npz", d / "ort.npz")
    with np.load(d / "ort.npz") as data:
        want = {k: data[k] for k in data.files}
    bundle = d / "bundle"
    compile_model(ir.load(model), output=bundle, embed_params=False, source_path=model)
    return d, model, weight_bytes, bundle, x, want


def test_bundle_weights_are_mapped_not_copied(chain):
    d, _, weight_bytes, bundle, x, want = chain
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["params"]["file"] == "params.npz"
    assert all(o % ALIGN == 0 for o in _data_offsets(bundle / "params.npz").values())
    module = load_bundle(bundle)
    assert module.runner.weights_mapped_bytes == weight_bytes and module.runner.weights_copied_bytes == 0
    (name,) = want
    np.testing.assert_allclose(module(x=x)[name], want[name], rtol=1e-4, atol=1e-5)
    report = module.load_report()
    assert report.startswith("loaded in ") and f"weights {weight_bytes / 2**20:.0f} MiB memory-mapped, 0 MiB copied" \
        in report and "peak RSS" in report, report


def test_compiled_in_process_runs_on_mapped_source_weights(chain, monkeypatch):
    """Compiled and run in one process (bench, the API): the external weights reach TVM as
    copy-on-write maps of the model's own data file, not copied (matmul weights unpacked here: packed
    ones are packed in memory, below)."""
    monkeypatch.setenv("GRAPHOPT_PACKED_MATMUL", "0")
    _, model, weight_bytes, _, x, want = chain
    compiled = compile_model(ir.load(model), embed_params=False)
    assert all(isinstance(a, np.memmap) or isinstance(a.base, np.memmap) for a in compiled.params.values())
    runner = compiled.runner()
    assert runner.weights_mapped_bytes == weight_bytes and runner.weights_copied_bytes == 0
    (name,) = want
    np.testing.assert_allclose(compiled(x=x)[name], want[name], rtol=1e-4, atol=1e-5)


def test_weight_arguments_read_packed(tmp_path):
    """A matmul weight passed as an argument is packed like a constant one (its argument and the
    params file take the packed shape, packed lazily); a weight two matmuls read stays as it is."""
    from graphopt.backends.packed_params import PackedWeight

    rng = np.random.default_rng(7)
    k, n = 96, 61  # 61 columns: no power-of-two divisor, padded to whole lanes
    w1 = rng.standard_normal((k, n)).astype(np.float32)
    w2 = rng.standard_normal((k, k)).astype(np.float32)
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([3, k]))
    v1 = ir.val("W1", ir.DataType.FLOAT, ir.Shape([k, n]), const_value=ir.tensor(w1, name="W1"))
    v2 = ir.val("W2", ir.DataType.FLOAT, ir.Shape([k, k]), const_value=ir.tensor(w2, name="W2"))
    a, b, c, y = (ir.val(name, ir.DataType.FLOAT) for name in ("a", "b", "c", "y"))
    nodes = [ir.node("MatMul", [x, v2], outputs=[a]), ir.node("MatMul", [a, v2], outputs=[b]),
             ir.node("Add", [a, b], outputs=[c]), ir.node("MatMul", [c, v1], outputs=[y])]
    graph = ir.Graph([x], [y], nodes=nodes, initializers=[v1, v2], opset_imports={"": 17})
    compiled = compile_model(ir.Model(graph, ir_version=9), embed_params=False, output=tmp_path / "b")
    kinds = {name: type(value).__name__ for name, value in compiled.params.items()}
    assert kinds == {"W1": "PackedWeight", "W2": "ndarray"}, kinds
    packed = compiled.params["W1"]
    assert isinstance(packed, PackedWeight) and packed.shape == (-(-n // packed.lanes), k, packed.lanes)
    feed = rng.standard_normal((3, k)).astype(np.float32)
    a_ = feed @ w2
    want = (a_ + a_ @ w2) @ w1
    np.testing.assert_allclose(compiled(x=feed)["y"], want, rtol=1e-4, atol=1e-3)
    module = load_bundle(tmp_path / "b")
    np.testing.assert_allclose(module(x=feed)["y"], want, rtol=1e-4, atol=1e-3)
    assert module.runner.weights_mapped_bytes == packed.nbytes + w2.nbytes
    with np.load(tmp_path / "b" / "params.npz") as data:
        assert sorted(data[key].shape for key in data.files) == sorted([packed.shape, w2.shape])


def test_bundle_written_by_plain_savez_still_loads(chain, tmp_path):
    """A params.npz numpy wrote itself (unaligned or compressed members) loads with the weights copied."""
    _, _, weight_bytes, bundle, x, want = chain
    import shutil

    for save in (np.savez, np.savez_compressed):
        b = tmp_path / save.__name__
        shutil.copytree(bundle, b)
        with np.load(bundle / "params.npz") as data:
            arrays = {k: data[k] for k in data.files}
        (b / "params.npz").unlink()
        save(b / "params.npz", **arrays)
        module = load_bundle(b, verify=False)
        assert module.runner.weights_bytes == weight_bytes
        (name,) = want
        np.testing.assert_allclose(module(x=x)[name], want[name], rtol=1e-4, atol=1e-5)
    assert module.runner.weights_mapped_bytes == 0  # compressed: read into memory
    assert "weights 0 MiB memory-mapped" in module.load_report()


def test_run_prints_the_load_report(chain, capsys):
    d, _, weight_bytes, bundle, _, _ = chain
    assert main(["run", str(bundle), "--inputs", str(d / "in.npz"), "-o", str(d / "out.npz")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("loaded in ") and "0 MiB copied" in last and "peak RSS" in last, last


def _one_line_error(capsys, argv, *parts):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, err
    return err


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_external_data_truncated_or_missing_is_named(chain, tmp_path, capsys, damage):
    d, model, _, _, _, _ = chain
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.onnx").write_bytes(model.read_bytes())
    data = (model.parent / "weights.bin").read_bytes()
    if damage == "truncated":  # the last weight loses its tail
        (src / "weights.bin").write_bytes(data[: len(data) - 1000])
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    last = f"W{LAYERS - 1}" if damage == "truncated" else "W0"
    why = "truncated" if damage == "truncated" else "no such file"
    _one_line_error(capsys, ["compile", src / "model.onnx", "-o", tmp_path / "b"], "weights.bin", f"'{last}'", why)
    _one_line_error(capsys, ["optimize", src / "model.onnx", "-o", tmp_path / "o.onnx"], "weights.bin", f"'{last}'", why)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # the input is never touched
    assert not (tmp_path / "b").exists()


def test_in_memory_model_whose_weights_file_shrank_is_named(chain, tmp_path):
    """A model loaded (lazily) before its weights file was cut: compile names the file and the tensor,
    not a pass's 'buffer is smaller than requested size'."""
    _, model, _, _, _, _ = chain
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.onnx").write_bytes(model.read_bytes())
    data = (model.parent / "weights.bin").read_bytes()
    (src / "weights.bin").write_bytes(data)
    loaded = ir.load(src / "model.onnx")
    (src / "weights.bin").write_bytes(data[: len(data) // 2])
    for run in (compile_model, graphopt.optimize):  # the pipeline checks too, whoever calls it
        with pytest.raises(GraphoptError) as e:
            run(loaded)
        message = str(e.value)
        assert "weights.bin" in message and "truncated" in message and "'W1'" in message, message
        assert "\n" not in message


def test_transposed_weight_folds_in_one_copy():
    """fold_weight_reparam folds Transpose(W) (a tied embedding read transposed) in numpy: the result
    equals the transpose and is a fresh contiguous array."""
    from graphopt.passes.fold_weight_reparam import FoldWeightReparamPass

    w = np.random.default_rng(3).standard_normal((6, 4)).astype(np.float32)
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([2, 6]))
    wv = ir.val("W", ir.DataType.FLOAT, ir.Shape([6, 4]), const_value=ir.tensor(w, name="W"))
    t1 = ir.val("t1", ir.DataType.FLOAT, ir.Shape([4, 6]))
    t3 = ir.val("t3", ir.DataType.FLOAT, ir.Shape([4, 6]))
    y = ir.val("y", ir.DataType.FLOAT, ir.Shape([2, 4]))
    z = ir.val("z", ir.DataType.FLOAT, ir.Shape([2, 6]))
    nodes = [ir.node("Transpose", [wv], {"perm": [1, 0]}, outputs=[t1]),
             ir.node("Identity", [t1], outputs=[t3]),
             ir.node("MatMul", [x, wv], outputs=[y]),
             ir.node("MatMul", [y, t3], outputs=[z])]
    graph = ir.Graph([x], [z], nodes=nodes, initializers=[wv], opset_imports={"": 17})
    model = ir.Model(graph, ir_version=9)
    assert FoldWeightReparamPass()(model).modified
    matmul = [n for n in model.graph if n.op_type == "MatMul"][1]
    folded = matmul.inputs[1].const_value.numpy()
    assert folded.flags.c_contiguous and np.array_equal(folded, w.T)
    assert [n.op_type for n in model.graph] == ["MatMul", "MatMul"]
