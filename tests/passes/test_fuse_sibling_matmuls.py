"""FuseSiblingMatMulsPass: MatMuls sharing an input with constant weights become one MatMul and a Split."""

from __future__ import annotations

import numpy as np
import pytest

from graph_testing import RNG, apply_and_compare, model_from_text, ops
from graphopt.passes.fuse_sibling_matmuls import FuseSiblingMatMulsPass


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _qkv(opset: int, biases: tuple[bool, bool, bool]):
    lines, inits = [], {}
    for i, (name, has_bias) in enumerate(zip("qkv", biases)):
        inits[f"w{name}"] = _w(16, 8 + 4 * i)
        if has_bias:
            inits[f"b{name}"] = _w(8 + 4 * i)
            lines.append(f"m{name} = MatMul(x, w{name})\n{name} = Add(m{name}, b{name})")
        else:
            lines.append(f"{name} = MatMul(x, w{name})")
    body = "\n".join(lines)
    text = f'''<ir_version: 8, opset_import: ["" : {opset}]>
        g (float[2,5,16] x) => (float[2,5,8] yq, float[2,5,12] yk, float[2,5,16] yv) {{
            {body}
            yq = Relu(q)
            yk = Sigmoid(k)
            yv = Neg(v)
        }}'''
    return model_from_text(text, **inits)


@pytest.mark.parametrize("opset", [11, 17])  # Split's sizes: an attribute before opset 13, an input since
@pytest.mark.parametrize("biases", [(True, True, True), (False, False, False), (True, False, True)])
def test_projections_merge_into_one_matmul(opset, biases):
    result = apply_and_compare(FuseSiblingMatMulsPass(target_runtime="graphopt"), _qkv(opset, biases), rtol=1e-6, atol=1e-6)
    assert result.modified
    counts = ops(result.model)
    assert counts["MatMul"] == 1 and counts["Split"] == 1
    assert counts.get("Add", 0) == (1 if any(biases) else 0)  # one bias Add; zeros for a sibling without one


def test_one_matmul_or_a_computed_weight_stays():
    model = model_from_text(
        '''<ir_version: 8, opset_import: ["" : 17]>
        g (float[2,16] x, float[16,4] w2) => (float[2,8] a, float[2,4] b) {
            a = MatMul(x, w1)
            b = MatMul(x, w2)
        }''', w1=_w(16, 8))
    p = FuseSiblingMatMulsPass(target_runtime="graphopt")
    result = p(model)
    assert not result.modified
    assert any("not a constant" in s for s in p.skipped), p.skipped
    assert ops(result.model)["MatMul"] == 2


def test_graph_output_matmul_stays_out():
    model = model_from_text(
        '''<ir_version: 8, opset_import: ["" : 17]>
        g (float[2,16] x) => (float[2,8] a, float[2,4] r) {
            a = MatMul(x, w1)
            b = MatMul(x, w2)
            r = Relu(b)
        }''', w1=_w(16, 8), w2=_w(16, 4))
    p = FuseSiblingMatMulsPass(target_runtime="graphopt")
    assert not p(model).modified
    assert any("graph output" in s for s in p.skipped), p.skipped


def test_merged_nodes_name_their_parts():
    model = model_from_text(
        '''<ir_version: 8, opset_import: ["" : 17]>
        g (float[2,16] x) => (float[2,8] a, float[2,4] b) {
            ma = MatMul(x, w1)
            mb = MatMul(x, w2)
            a = Relu(ma)
            b = Relu(mb)
        }''', w1=_w(16, 8), w2=_w(16, 4))
    for i, node in enumerate(model.graph):
        node.name = node.name or f"n{i}"
    result = FuseSiblingMatMulsPass(target_runtime="graphopt")(model)
    merged = next(n for n in result.model.graph if n.op_type == "MatMul")
    assert merged.name == "n0+n1"
    assert next(n for n in result.model.graph if n.op_type == "Split").name == "n0+n1_split"


@pytest.mark.parametrize("runtime", ["onnx", "ort"])
def test_other_runtimes_keep_their_projections(runtime):
    """ONNX Runtime fuses attention from three separate projections: only graphopt's compiler merges them."""
    assert not FuseSiblingMatMulsPass(target_runtime=runtime)(_qkv(17, (True, True, True))).modified


def _quantized_qkv(per_block: bool, zero_points: bool):
    """Three projections of x [2, 5, 64] whose weights are int8 codes dequantized per block of 32 rows of
    K (axis 0) or per output column (axis 1), as ``graphopt optimize --quantize int8-weights`` writes them."""
    lines, inits = [], {}
    for i, name in enumerate("qkv"):
        n = 8 + 8 * i
        inits[f"c{name}"] = RNG.integers(-127, 128, (64, n)).astype(np.int8)
        inits[f"s{name}"] = (RNG.random((2, n) if per_block else (n,)) * 0.02 + 0.01).astype(np.float32)
        inputs = f"c{name}, s{name}"
        if zero_points:
            inits[f"z{name}"] = RNG.integers(-3, 4, inits[f"s{name}"].shape).astype(np.int8)
            inputs += f", z{name}"
        attrs = "<axis = 0, block_size = 32>" if per_block else "<axis = 1>"
        lines.append(f"w{name} = DequantizeLinear {attrs} ({inputs})\nm{name} = MatMul(x, w{name})\ny{name} = Relu(m{name})")
    body = "\n".join(lines)
    text = f'''<ir_version: 10, opset_import: ["" : 21]>
        g (float[2,5,64] x) => (float[2,5,8] yq, float[2,5,16] yk, float[2,5,24] yv) {{
            {body}
        }}'''
    return model_from_text(text, **inits)


@pytest.mark.parametrize("per_block", [True, False])
@pytest.mark.parametrize("zero_points", [False, True])
def test_dequantized_projections_merge_with_their_codes_and_scales(per_block, zero_points):
    result = apply_and_compare(FuseSiblingMatMulsPass(target_runtime="graphopt"), _quantized_qkv(per_block, zero_points),
                               rtol=1e-6, atol=1e-6)
    assert result.modified
    counts = ops(result.model)
    assert counts["MatMul"] == 1 and counts["DequantizeLinear"] == 1 and counts["Split"] == 1


def test_dequantized_and_float_weights_stay_apart():
    model = model_from_text(
        '''<ir_version: 10, opset_import: ["" : 21]>
        g (float[2,64] x) => (float[2,8] a, float[2,8] b) {
            w1 = DequantizeLinear <axis = 1> (c1, s1)
            ma = MatMul(x, w1)
            mb = MatMul(x, w2)
            a = Relu(ma)
            b = Relu(mb)
        }''', c1=RNG.integers(-127, 128, (64, 8)).astype(np.int8), s1=np.full(8, 0.01, np.float32), w2=_w(64, 8))
    p = FuseSiblingMatMulsPass(target_runtime="graphopt")
    assert not p(model).modified
    assert any("does not match the group's" in s for s in p.skipped), p.skipped


def test_weights_in_an_external_file_stay_apart(tmp_path):
    """A merged copy of external weights would stay resident beside the file's pages (gen:gpt2-large:
    compile's peak RSS 1.42x the weights instead of 1.20x): such projections are not merged."""
    import onnx

    import onnx_ir as ir

    proto = ir.serde.serialize_model(_qkv(17, (True, True, True)))
    path = tmp_path / "m.onnx"
    onnx.save(proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location="m.bin",
              size_threshold=0)
    p = FuseSiblingMatMulsPass(target_runtime="graphopt")
    assert not p(ir.load(path)).modified
    assert any("external file" in s for s in p.skipped), p.skipped
