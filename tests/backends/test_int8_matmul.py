"""MatMulInteger with a constant weight on VNNI and AMX-INT8 (``schedules/int8_matmul.py``,
``amx_matmul.py``): exact against ONNX Runtime's MatMulInteger (and its Cast + Mul dequantization
after DynamicQuantizeLinear) over random and adversarial ranges, the products on ``vpdpbusd`` (fewer
than 16 rows) and ``tdpbusd``. Needs a CPU with AVX-512 VNNI (AMX-INT8 for the AMX cases; this
project's machines have both; skipped elsewhere)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graphopt.backends.bundle import loader
from graphopt.backends.schedules import int8_matmul
from graphopt.backends.schedules.int8_dot import DOTS
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).parent))
from conformance_util import make_model
from test_int8_vnni import _count_per_function

F, U8, I8, I32 = TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32
HAS_AMX = "amx_int8" in loader.cpu_flags()
needs_vnni = pytest.mark.skipif("avx512_vnni" not in loader.cpu_flags() or shutil.which("objdump") is None,
                                reason="needs AVX-512 VNNI and objdump")


def _net():
    """Seven MatMulIntegers, each a case of the kernels: 1, 4 and 2x5 rows on VNNI, 2x9 and 20 rows on AMX."""
    rng = np.random.default_rng(0)
    inits = {
        "w_m1": rng.integers(-128, 128, (13, 20)).astype(np.int8),  # M = 1, K = 13 (not a multiple of 4)
        "w_u8": rng.integers(0, 256, (38, 33)).astype(np.uint8),  # uint8 weight, a zero point per column
        "z_u8": rng.integers(0, 256, 33).astype(np.uint8),
        "w_i8": rng.integers(-128, 128, (38, 17)).astype(np.int8),  # int8 weight, a zero point per column
        "z_i8": rng.integers(-128, 128, 17).astype(np.int8),
        "w_3d": rng.integers(-128, 128, (24, 36)).astype(np.int8),  # [2, 5, 24] rows: a 3-d output on VNNI
        "w_far": np.full((600, 8), -128, np.int8),  # |sums| past 2**24: the int32 form of the lowering
        "w_dq": rng.integers(-128, 128, (64, 48)).astype(np.int8),  # dynamically quantized, per-column scale
        "z_dq": np.zeros(48, np.int8), "s_dq": rng.uniform(1e-3, 2e-2, 48).astype(np.float32),
        "w_dq2": rng.integers(0, 256, (64, 40)).astype(np.uint8), "z_dq2": np.array(131, np.uint8),
        "s_dq2": np.array(0.0125, np.float32),
    }
    mm = "MatMulInteger"
    nodes = [
        helper.make_node(mm, ["a_m1", "w_m1", "az"], ["y_m1"]),
        helper.make_node(mm, ["a3", "w_u8", "az", "z_u8"], ["y_u8"]),
        helper.make_node(mm, ["a3", "w_i8", "az", "z_i8"], ["y_i8"]),
        helper.make_node(mm, ["a_far", "w_far", "az"], ["y_far"]),
        helper.make_node(mm, ["a_3d", "w_3d", "az"], ["y_3d"]),
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node(mm, ["xq", "w_dq", "xz", "z_dq"], ["p_dq"]),
        helper.make_node("Cast", ["p_dq"], ["c_dq"], to=F),
        helper.make_node("Mul", ["xs", "s_dq"], ["m_dq"]),
        helper.make_node("Mul", ["c_dq", "m_dq"], ["y_dq"]),
        helper.make_node(mm, ["xq", "w_dq2", "xz", "z_dq2"], ["p_dq2"]),
        helper.make_node("Cast", ["p_dq2"], ["c_dq2"], to=F),
        helper.make_node("Mul", ["xs", "s_dq2"], ["m_dq2"]),
        helper.make_node("Mul", ["m_dq2", "c_dq2"], ["y_dq2"]),
    ]
    inputs = [("a_m1", U8, [1, 13]), ("a3", U8, [2, 9, 38]), ("a_far", U8, [4, 600]), ("a_3d", U8, [2, 5, 24]),
              ("az", U8, []),
              ("x", F, [20, 64])]
    outputs = [(n, I32, None) for n in ("y_m1", "y_u8", "y_i8", "y_far", "y_3d")] + [("y_dq", F, None), ("y_dq2", F, None)]
    return make_model(nodes, inputs, outputs, inits, opset=13)


def _feeds(rng, az: int, fill: int | None = None, x_scale: float = 3.0) -> dict:
    def a(shape):
        return np.full(shape, fill, np.uint8) if fill is not None else rng.integers(0, 256, shape).astype(np.uint8)

    return {"a_m1": a((1, 13)), "a3": a((2, 9, 38)), "a_far": a((4, 600)), "a_3d": a((2, 5, 24)), "az": np.array(az, np.uint8),
            "x": (rng.standard_normal((20, 64)) * x_scale).astype(np.float32)}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from graphopt.backends.compile import compile_model

    model = _net()
    out = tmp_path_factory.mktemp("qmm") / "b"
    return model, compile_model(ir.serde.deserialize_model(model), target="x86", output=out), out


@needs_vnni
def test_every_matmul_integer_on_a_kernel(compiled):
    """All seven MatMulIntegers become kernel calls: products on vpdpbusd below 16 rows, on AMX tiles
    from 16 rows where the CPU has AMX-INT8; the range of the dynamically quantized input is one
    vectorized kernel."""
    _, _, bundle = compiled
    vnni = [n for n in _count_per_function(bundle / "lib.so", "vpdpbusd") if n.startswith("vnni_qmatmul")]
    amx = [n for n in _count_per_function(bundle / "lib.so", "tdpbusd") if n.startswith("amx_qmatmul")]
    assert (len(vnni), len(amx)) == ((3, 4) if HAS_AMX else (7, 0)), (vnni, amx)
    # DynamicQuantizeLinear's minimum and maximum: one vector pass (value_range.py)
    assert [n for n in _count_per_function(bundle / "lib.so", "vmaxps") if n.startswith("value_range")]


@needs_vnni
def test_dequantization_folded_into_the_kernels():
    """The Cast and Mul after the two dynamically quantized MatMulIntegers, and the product of the
    activation's and the weight's scales before them, are all inside the kernels: no multiply left."""
    from graphopt.backends.compile import fused_module

    mod = fused_module(ir.serde.deserialize_model(_net()), "x86")
    names = [gv.name_hint for gv in mod.functions]
    assert sum(n.startswith(("vnni_qmatmul", "amx_qmatmul")) for n in names) == 7
    assert not [n for n in names if "multiply" in n], names


@needs_vnni
@pytest.mark.parametrize("az,fill", [(0, None), (128, None), (255, None), (0, 255), (255, 0), (128, 255)],
                         ids=["zp0", "zp128", "zp255", "all255-zp0", "all0-zp255", "all255-zp128"])
def test_exactly_ort(compiled, az, fill):
    """Random uint8 activations and adversarial ones (|a - a_zp| = 255 everywhere, against weights at
    the type's ends), every output bit-identical to ONNX Runtime."""
    model, lib, _ = compiled
    feeds = _feeds(np.random.default_rng(az + (fill or 0)), az, fill)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    got = lib(**feeds)
    for name, w in want.items():
        g = np.asarray(got[name])
        assert g.dtype == w.dtype and g.shape == w.shape, name
        np.testing.assert_array_equal(g, w, err_msg=name)
    if fill == 255 and az == 0:
        assert np.abs(want["y_far"]).max() == 255 * 600 * 128


@needs_vnni
@pytest.mark.parametrize("m,k,n,kind,amx", [
    (1, 512, 384, "i8", False), (9, 31, 70, "u8col", False), (128, 64, 16, "i8zp", False),
    (16, 512, 384, "i8", True), (37, 70, 33, "u8col", True), (64, 128, 64, "i8zp", True)])
def test_kernel_alone_exact(m, k, n, kind, amx):
    """Each kernel alone against numpy's int64 product: one row, K and rows off the tiles, N off the
    16-column blocks, the row-sum correction (uint8 weights, per-column zero points)."""
    import tvm
    from graphopt.backends.schedules import amx_matmul
    from graphopt.backends.targets import get_target

    if amx and not HAS_AMX:
        pytest.skip("needs AMX-INT8")
    rng = np.random.default_rng(m)
    dot = DOTS["vnni"]
    x = rng.integers(0, 256, (m, k)).astype(np.uint8)
    if kind == "i8":
        centered = rng.integers(-128, 128, (k, n))
    elif kind == "u8col":
        centered = rng.integers(0, 256, (k, n)) - rng.integers(0, 256, n)
    else:
        centered = rng.integers(-128, 128, (k, n)) - rng.integers(-128, 128, n)
    zx = np.array([rng.integers(0, 256)], np.uint8)
    if amx:
        w, shift = int8_matmul.split_weight(centered.astype(np.int64))
        consts = {"wp": amx_matmul.pack(w), **int8_matmul.column_constants(w, shift, amx_matmul.columns(n))}
    else:
        consts = int8_matmul.pack(dot, centered.astype(np.int64), m)
    rows = bool(consts["shift"].any())
    assert rows == (kind != "i8")
    if amx:
        func = amx_matmul.qmatmul_func(m, k, n, rows=rows, scales=0, threads=2,
                                       value=int8_matmul.epilogue(k, rows, 0))
    else:
        func = int8_matmul.qmatmul_func(dot, m, k, n, rows=rows, scales=0, threads=2)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=get_target("x86").target)
    out = tvm.runtime.tensor(np.zeros((m, n), np.int32))
    args = [x, zx, consts["wp"], consts["colsum"], *([consts["shift"]] if rows else [])]
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
    np.testing.assert_array_equal(out.numpy(), (x.astype(np.int64) - int(zx[0])) @ centered)


def test_tile_pads_least():
    """Register tiles: no padding where some tile divides rows and blocks; at most 24 accumulators."""
    dot = DOTS["vnni"]
    assert int8_matmul.tile(128, 24, dot) == (8, 3)
    assert int8_matmul.tile(1, 24, dot) == (1, 4)
    for m, nb in [(128, 32), (16, 2008), (7, 5), (3, 1)]:
        qi, obi = int8_matmul.tile(m, nb, dot)
        assert qi * obi <= dot.accumulators and (m % qi == 0 or qi >= m) and nb % obi == 0


@pytest.mark.parametrize("n,threads", [(7, 1), (1000, 2), (300007, 2)])
def test_value_range_kernel(n, threads):
    """DynamicQuantizeLinear's minimum and maximum in one pass: fewer values than a vector, a tail after
    whole vectors, two threads; the extremes placed at the ends and inside."""
    import tvm
    from graphopt.backends.schedules.value_range import range_func
    from graphopt.backends.targets import get_target

    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    x[n // 3], x[-1] = 40.0, -50.0
    lib = tvm.compile(tvm.IRModule({"main": range_func(n, 16, threads).with_attr("global_symbol", "main")}),
                      target=get_target("x86").target)
    lo, hi = (tvm.runtime.tensor(np.zeros((), np.float32)) for _ in range(2))
    lib["main"](tvm.runtime.tensor(x), lo, hi)
    assert (float(lo.numpy()), float(hi.numpy())) == (-50.0, 40.0)
