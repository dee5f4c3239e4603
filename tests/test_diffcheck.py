"""The differential check catches a wrong pass, names it, and lets a correct pipeline through."""

from __future__ import annotations


import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
import pytest
from onnx import TensorProto, helper

from graphopt.front import api
from graphopt.core.diffcheck import (
    DifferentialCheckInstrument,
    first_mismatch,
    random_inputs,
    run_onnxruntime,
)
from graphopt.core.errors import PassError
from graphopt.core.pipeline import PassRegistry


def _model() -> ir.Model:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    b = helper.make_tensor("b", TensorProto.FLOAT, [4], [0.5, -1.0, 2.0, 3.0])
    nodes = [
        helper.make_node("Identity", ["x"], ["t"]),
        helper.make_node("Add", ["t", "b"], ["u"], name="add0"),
        helper.make_node("Relu", ["u"], ["y"]),
    ]
    g = helper.make_graph(nodes, "g", [x], [y], [b])
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


class FlipAddToSubPass(ir.passes.InPlacePass):
    """A deliberately wrong pass: Add becomes Sub."""

    def call(self, model):
        modified = False
        for node in model.graph:
            if node.op_type == "Add":
                node.op_type = "Sub"
                modified = True
        return ir.passes.PassResult(model, modified)


def _registry() -> PassRegistry:
    reg = PassRegistry()
    reg.register("identity", common.IdentityEliminationPass)
    reg.register("flip", FlipAddToSubPass)
    return reg


def test_random_inputs_follow_dtypes_and_dynamic_dims():
    feeds = random_inputs(_model(), seed=3)
    assert feeds["x"].shape == (1, 4) and feeds["x"].dtype == np.float32
    np.testing.assert_array_equal(feeds["x"], random_inputs(_model(), seed=3)["x"])


def test_random_inputs_treat_exporters_minus_one_as_dynamic():
    m = _model()
    m.graph.inputs[0].shape = ir.Shape([-1, 4])  # rapidocr's exporter writes -1 for the batch
    assert random_inputs(m)["x"].shape == (1, 4)


def test_wrong_pass_is_caught_and_named(tmp_path):
    with pytest.raises(PassError) as info:
        api.optimize(_model(), passes=["identity", "flip"], registry=_registry(), check=True,
                     check_dir=tmp_path / "chk")
    assert info.value.pass_name == "flip"
    assert "'flip'" in str(info.value) and "output 'y'" in str(info.value)
    before = onnx.load(tmp_path / "chk" / "before.onnx")
    after = onnx.load(tmp_path / "chk" / "after.onnx")
    assert [n.op_type for n in before.graph.node] == ["Add", "Relu"]  # after 'identity', before 'flip'
    assert [n.op_type for n in after.graph.node] == ["Sub", "Relu"]


def test_correct_pipeline_passes_and_is_checked():
    model = _model()
    inst = DifferentialCheckInstrument(model, inputs={"x": np.linspace(-3, 3, 8, dtype=np.float32).reshape(2, 4)})
    res = api.optimize(model, passes=["identity"], registry=_registry(), instruments=[inst])
    assert res.modified
    assert inst.checked == ["identity"]
    assert [n.op_type for n in res.model.graph] == ["Add", "Relu"]
    np.testing.assert_allclose(inst.reference["y"], np.maximum(inst.feeds["x"] + [0.5, -1, 2, 3], 0), rtol=1e-6)


def test_unmodified_pass_is_not_rerun():
    model = _model()
    inst = DifferentialCheckInstrument(model)
    api.optimize(model, passes=["identity", "identity"], registry=_registry(), instruments=[inst])
    assert inst.checked == ["identity"]  # the second run changed nothing


def test_first_mismatch_reports_shape_dtype_and_error():
    a = {"o": np.zeros((2, 2), np.float32)}
    assert first_mismatch(a, {"o": np.zeros((2, 2), np.float32)}, rtol=1e-3, atol=1e-4) is None
    assert "shape" in first_mismatch(a, {"o": np.zeros((4,), np.float32)}, rtol=1e-3, atol=1e-4)[1]
    assert "dtype" in first_mismatch(a, {"o": np.zeros((2, 2), np.float64)}, rtol=1e-3, atol=1e-4)[1]
    name, why = first_mismatch(a, {"o": np.full((2, 2), 0.5, np.float32)}, rtol=1e-3, atol=1e-4)
    assert name == "o" and "0.5" in why


def test_run_onnxruntime_matches_reference_evaluator():
    from onnx.reference import ReferenceEvaluator

    model = _model()
    feeds = random_inputs(model, seed=1)
    proto = ir.serde.serialize_model(model)
    (expected,) = ReferenceEvaluator(proto).run(None, feeds)
    np.testing.assert_allclose(run_onnxruntime(model, feeds)["y"], expected, rtol=1e-6)


def _weight_pipeline_model() -> ir.Model:
    """Conv with weight-norm weights and BN, an fp64 bias cast to fp32, duplicate constants, a shape subgraph."""
    rng = np.random.default_rng(0)

    def t(name, shape, dtype=np.float32, positive=False):
        a = rng.standard_normal(shape).astype(dtype)
        return onnx.numpy_helper.from_array(np.abs(a) + 0.5 if positive else a, name)

    i64 = lambda name, v: onnx.numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("ReduceL2", ["v", "axes"], ["norm"], keepdims=1),
        helper.make_node("Div", ["v", "norm"], ["vn"]),
        helper.make_node("Mul", ["g", "vn"], ["w"]),
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "var"], ["bn"]),
        helper.make_node("Cast", ["bias64"], ["bias"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["bn", "bias"], ["a"]),
        helper.make_node("Mul", ["a", "two_a"], ["a2"]),
        helper.make_node("Mul", ["a2", "two_b"], ["a4"]),
        helper.make_node("Shape", ["a4"], ["shp"]),
        helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["a4", "target"], ["y"]),
    ]
    inits = [t("v", [4, 3, 3, 3]), i64("axes", [1, 2, 3]), t("g", [4, 1, 1, 1]), t("s", [4]), t("b", [4]),
             t("m", [4]), t("var", [4], positive=True), t("bias64", [4, 1, 1], np.float64),
             onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two_a"),
             onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two_b"),
             i64("zero", 0), i64("zero1", [0]), i64("minus1", [-1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 144])], inits)
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))


def test_weight_passes_pass_the_check():
    # fold_weight_reparam first: BN folds only into a constant weight
    passes = ["parameter_sharing", "fold_weight_reparam", "fold_batchnorm", "canonical_dtypes",
              "constant_folding", "dead_code", "weight_statistics"]
    model = _weight_pipeline_model()
    inst = DifferentialCheckInstrument(model, rtol=1e-4, atol=1e-5)
    res = api.optimize(model, passes=passes, instruments=[inst])
    assert inst.checked == passes[:5] + ["weight_statistics"]  # dead_code had nothing left to do
    assert sorted(n.op_type for n in res.model.graph) == ["Add", "Conv", "Mul", "Mul", "Reshape"]


@pytest.mark.parametrize("name, shape", [
    ("rapidocr:cls", "x:1,3,48,192"),
    pytest.param("rapidocr:rec", "x:1,3,48,320", marks=pytest.mark.slow),
    pytest.param("rapidocr:det", "x:1,3,320,320", marks=pytest.mark.slow),
])
def test_default_pipeline_on_real_model_passes_the_check(name, shape, tmp_path):
    from graphopt.core.errors import GraphoptError
    from graphopt.models import resolve

    try:
        resolve(name)
    except GraphoptError as e:  # no PyPI access on this machine
        pytest.skip(f"{name} unavailable: {e}")
    res = api.optimize(name, opt_level=3, input_shapes=[shape], check=True, check_dir=tmp_path)
    assert res.modified
    assert res.records[-1].nodes < res.initial_nodes / 2
    assert not list(tmp_path.iterdir())  # nothing diverged, nothing dumped


def test_cli_check_names_the_wrong_pass(tmp_path, capsys, monkeypatch):
    from graphopt.front import cli
    from graphopt.core import io

    registry = _registry()
    import graphopt.front.api

    monkeypatch.setattr(graphopt.front.api, "default_registry", lambda plugins=True: registry)
    src = io.save(_model(), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    code = cli.main(["optimize", str(src), "-o", str(out), "--passes", "identity,flip", "--check",
                     "--check-dir", str(tmp_path / "chk")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "'flip'" in err and "output 'y'" in err
    assert not out.exists()
    assert (tmp_path / "chk" / "before.onnx").exists() and (tmp_path / "chk" / "after.onnx").exists()
    code = cli.main(["optimize", str(src), "-o", str(out), "--passes", "identity", "--check", "-q"])
    assert code == 0 and out.exists()


def test_external_data_model_is_checked_and_dumped(tmp_path):
    from graphopt.core import io

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 512])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 512])
    b = onnx.numpy_helper.from_array(np.linspace(-1, 1, 512, dtype=np.float32), "b")  # 2 KiB: external
    g = helper.make_graph([helper.make_node("Add", ["x", "b"], ["y"])], "g", [x], [y], [b])
    model = ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    io.save(model, tmp_path / "m.onnx", external_data="m.data")
    loaded = io.load(tmp_path / "m.onnx")
    assert io.has_external_data(loaded)
    with pytest.raises(PassError) as info:
        api.optimize(loaded, passes=["flip"], registry=_registry(), check=True, check_dir=tmp_path / "chk")
    assert "'flip'" in str(info.value)
    after = onnx.load(tmp_path / "chk" / "after.onnx")  # loads its external data beside it
    assert after.graph.node[0].op_type == "Sub"
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(after.graph.initializer[0]),
                                  np.linspace(-1, 1, 512, dtype=np.float32))


class DropFirstNodePass(ir.passes.InPlacePass):
    """A deliberately broken pass: removes a node whose output is still used."""

    def call(self, model):
        model.graph.remove(next(iter(model.graph)), safe=False)
        return ir.passes.PassResult(model, True)


def test_broken_graph_is_reported_by_the_verifier_not_ort(tmp_path):
    reg = _registry()
    reg.register("drop", DropFirstNodePass)
    with pytest.raises(PassError) as info:
        api.optimize(_model(), passes=["drop"], registry=reg, check=True, check_dir=tmp_path)
    assert info.value.pass_name == "drop"
    assert "'drop' left an invalid graph" in str(info.value)
    assert "ONNX Runtime" not in str(info.value)


def test_default_pipeline_folds_batchnorm_after_weight_norm():
    res = api.optimize(_weight_pipeline_model(), opt_level=2, check=True)
    ops = [n.op_type for n in res.model.graph]
    assert "BatchNormalization" not in ops and "ReduceL2" not in ops and "Shape" not in ops
    assert ops.count("Conv") == 1


def _dead_branch_model() -> ir.Model:
    """``squeeze(1)`` as exporters write it: If(dim 1 == 1, Squeeze, Identity), then an Add."""
    m = ir.from_onnx_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,T] x) => (float z) {
          r = Shape(x)
          i = Constant<value = int64[1] {1}>()
          t = Gather<axis = 0>(r, i)
          is1 = Equal(t, i)
          xs = If(is1) <then_branch = a () => (float sq) { k = Constant<value = int64[1] {1}>() \n sq = Squeeze(x, k) },
                       else_branch = b () => (float id) { id = Identity(x) }>
          z = Add(xs, xs)
        }
        """
    )
    for g in (m.graph, *m.graph.subgraphs()):  # the text format cannot say "rank unknown"
        for v in g.outputs:
            v.shape = None
    return m


def test_model_ort_refuses_for_a_dead_branch_is_checked_with_onnx_reference():
    """At 2x5 the Squeeze branch is shape-invalid, so ORT refuses the model at load time although
    the branch is never taken; the check runs it with onnx.reference and still catches a wrong pass."""
    from graphopt.core.diffcheck import run_reference
    from graphopt.core.shapes import ShapeWarning, specialize

    m = _dead_branch_model()
    with pytest.warns(ShapeWarning):
        specialize(m, ["x:2,5"])
    with pytest.raises(Exception):
        run_onnxruntime(m, random_inputs(m))
    inst = DifferentialCheckInstrument(m)
    api.optimize(m, passes=["identity"], registry=_registry(), instruments=[inst])
    assert inst.runner is run_reference

    bad = _dead_branch_model()
    with pytest.warns(ShapeWarning):
        specialize(bad, ["x:2,5"])
    with pytest.raises(PassError, match="flip"):
        api.optimize(bad, passes=["flip"], registry=_registry(), instruments=[DifferentialCheckInstrument(bad)])
