"""Default schedules for pooling, reductions (softmax, layer norm, mean) and injective ops, against ORT."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.backends.schedules import apply_default_schedules, features_of
from graphopt.backends.schedules.testing import build, ort_run, single_node_model
from graphopt.backends.schedules.features import CPUFeatures
from graphopt.backends.schedules.tiling import accumulator_tile, register_tile, vector_tile

CASES = [
    ("MaxPool", (1, 16, 15, 17), dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]), "pool"),
    ("MaxPool", (2, 8, 16, 16), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), "generic"),
    ("AveragePool", (1, 8, 14, 14), dict(kernel_shape=[2, 2], strides=[2, 2]), "generic"),
    ("AveragePool", (1, 8, 12, 12), dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=0), "pool"),
    ("GlobalAveragePool", (2, 24, 7, 7), {}, None),
    ("Softmax", (4, 64, 80), dict(axis=-1), "normalization"),
    ("Softmax", (1, 1000), dict(axis=-1), None),  # one row: the thread launch would cost more than the work
    ("ReduceMean", (2, 6, 33), dict(axes=[-1], keepdims=1), None),
    ("ReduceSum", (4, 10, 9), dict(axes=[1], keepdims=0), None),
    ("Relu", (2, 3, 17, 19), {}, "generic"),
    ("Transpose", (2, 3, 16, 20), dict(perm=[0, 2, 3, 1]), "generic"),
    ("HardSigmoid", (1, 32, 8, 48), dict(alpha=0.2, beta=0.5), "generic"),
]


@pytest.mark.parametrize("op,shape,attrs,rule", CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
def test_matches_ort(op, shape, attrs, rule):
    rng = np.random.default_rng(0)
    opset = 13 if op in ("ReduceMean", "ReduceSum") and "axes" in attrs else 17
    if op == "ReduceSum":
        model = single_node_model(op, {"x": shape}, {"axes": np.array(attrs["axes"], np.int64)}, opset=13, keepdims=attrs["keepdims"])
        from onnx import TensorProto

        model.graph.initializer[0].data_type = TensorProto.INT64
        model.graph.initializer[0].ClearField("float_data")
        model.graph.initializer[0].raw_data = np.array(attrs["axes"], np.int64).tobytes()
    else:
        model = single_node_model(op, {"x": shape}, {}, opset=opset, **attrs)
    feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
    built = build(model, {"x": shape})
    if rule is not None:
        assert rule in built.report.values(), built.report
    np.testing.assert_allclose(built(feeds)[0], ort_run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_layer_norm_matches_ort():
    rng = np.random.default_rng(1)
    shape = (2, 40, 96)
    model = single_node_model("LayerNormalization", {"x": shape},
                              {"g": rng.standard_normal(96), "b": rng.standard_normal(96)}, axis=-1, epsilon=1e-5)
    feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
    built = build(model, {"x": shape})
    np.testing.assert_allclose(built(feeds)[0], ort_run(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_tile_choices_follow_vector_width():
    # AVX-512 fp32: 16 lanes; NEON: 4 lanes. No 28-lane vectors; one or two whole vectors.
    assert vector_tile(28, 16) == 14
    assert vector_tile(64, 16) == 32
    assert vector_tile(7, 16) == 7
    assert vector_tile(28, 4) == 4
    assert register_tile(64, 12) == 8
    assert register_tile(13, 8) == 1


def test_accumulator_tile_uses_the_free_registers_when_divisors_leave_it_small():
    avx2, avx512 = CPUFeatures(vector_bits=256, cores=2), CPUFeatures(vector_bits=512, cores=2)
    assert avx2.vector_registers == 16 and avx512.vector_registers == 32
    # 13 columns (a 13x13 map): 13 accumulators + 1 weight vector + 1 broadcast fit AVX2's 16 registers
    assert accumulator_tile(avx2, 13, 1) == 13
    # two vectors of 7: 14 accumulators + 3 operands do not fit; the plan then takes one vector x 7
    assert accumulator_tile(avx2, 7, 2) == 1 and accumulator_tile(avx2, 7, 1) == 7
    # divisors that fill the tile keep the usual limit (12 on AVX2, 24 on AVX-512)
    assert accumulator_tile(avx2, 24, 2) == 6 and accumulator_tile(avx512, 24, 2) == 12
    assert accumulator_tile(avx512, 7, 2) == 7


def test_aarch64_features_and_already_scheduled_functions_left_alone():
    import tvm
    from tvm import relax

    feats = features_of(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}))
    assert feats.lanes(32) == 4
    model = single_node_model("Relu", {"x": (4, 64)}, {})
    from tvm.relax.frontend.onnx import from_onnx

    mod = relax.transform.LegalizeOps()(from_onnx(model, {"x": (4, 64)}))
    gv = next(g for g, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    mod.update_func(gv, mod[gv].with_attr("tirx.is_scheduled", True))
    report = {}
    out = apply_default_schedules(mod, feats.target, report=report)
    assert report == {}
    assert out[gv].same_as(mod[gv])


def test_rules_build_for_aarch64_neon():
    """The same rules compile for a 128-bit NEON target (4 fp32 lanes): conv, matmul, pooling."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("MatMul", ["f", "m"], ["y"])]
    graph = helper.make_graph(
        nodes, "neon", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(rng.standard_normal((12, 8, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal((12 * 16, 10)).astype(np.float32), "m")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    mod = from_onnx(model, {"x": (1, 8, 8, 8)}, keep_params_in_input=False)
    with target:
        mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                        relax.transform.FoldConstant(), relax.transform.FuseOps(),
                                        relax.transform.FuseTIR()])(mod)
    report = {}
    mod = apply_default_schedules(mod, target, report=report)
    assert {"conv2d", "matmul"} <= set(report.values()), report
    assert tvm.compile(mod, target=target) is not None


def _scheduled_transpose(shape, perm):
    """The scheduled TIR (script) of a Transpose of ``shape`` by ``perm``."""
    from tvm import te

    from graphopt.backends.schedules import schedule_primfunc
    from graphopt.backends.schedules.features import CPUFeatures

    x = te.placeholder(shape, "float32", "x")
    out_shape = [shape[p] for p in perm]
    y = te.compute(out_shape, lambda *i: x[tuple(i[perm.index(d)] for d in range(len(shape)))], name="T_transpose")
    func, _ = schedule_primfunc(te.create_prim_func([x, y]), CPUFeatures(vector_bits=512, cores=2))
    return func.script()


def test_head_split_transpose_keeps_its_rows_contiguous():
    # [1, 207, 8, 52] -> [1, 8, 207, 52] (Moonshine's heads): 52 has no 8-lane divisor. Fusing the
    # trailing loops to reach 16-lane vectors made each lane a gather with a division (2 GB/s);
    # the schedule keeps the rows and copies each by 4-lane vectors instead.
    script = _scheduled_transpose((1, 207, 8, 52), [0, 2, 1, 3])
    assert "T.vectorized(4)" in script and "10764" not in script
    # an elementwise op over the same shape still fuses its loops into whole 16-lane vectors
    model = single_node_model("Relu", {"x": (1, 8, 207, 52)}, {})
    built = build(model, {"x": (1, 8, 207, 52)})
    assert "generic" in built.report.values()


@pytest.mark.parametrize("shape,perm", [((1, 207, 8, 52), [0, 2, 1, 3]), ((2, 12, 6, 20), [0, 2, 3, 1]),
                                        ((1, 128, 12, 64), [0, 2, 3, 1])])
def test_transposes_match_ort(shape, perm):
    rng = np.random.default_rng(3)
    model = single_node_model("Transpose", {"x": shape}, {}, perm=perm)
    feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
    built = build(model, {"x": shape})
    np.testing.assert_array_equal(built(feeds)[0], ort_run(model, feeds)[0])


def test_key_transpose_goes_through_square_tiles():
    # [1, 128, 12, 64] -> [1, 12, 64, 128] (a key transposed for attention): the output's rows walk the
    # input with a stride of 768; 16 x 16 tiles read by input rows into a local buffer, written by output rows
    script = _scheduled_transpose((1, 128, 12, 64), [0, 2, 3, 1])
    assert 'scope="local"' in script and script.count("T.vectorized(16)") == 2
    # a transpose of whole rows (the innermost dim stays innermost) is no such tile
    assert 'scope="local"' not in _scheduled_transpose((1, 128, 12, 64), [0, 2, 1, 3])
