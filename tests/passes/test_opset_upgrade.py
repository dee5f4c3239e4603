"""try_upgrade: the default opset is raised only when every node keeps its meaning."""

from __future__ import annotations

from graph_testing import model_from_text, random_feeds
from graphopt.passes.graphopt_ops import run_ort
from graphopt.passes.opset_upgrade import try_upgrade, upgrade_blockers
from graphopt.core.verify import verify

import numpy as np


def _model(opset: int, body: str, x="float[2,1,4] x", y="float[2,4] y"):
    return model_from_text(f'<ir_version: 8, opset_import: ["" : {opset}]>\ng ({x}) => ({y}) {{ {body} }}')


def test_attributes_that_became_inputs_are_converted():
    model = _model(12, "s = Squeeze<axes = [1]>(x) \n m = ReduceMean<axes = [1], keepdims = 1>(s) \n"
                       "u = Unsqueeze<axes = [0]>(m) \n r = ReduceSum<axes = [0], keepdims = 0>(u) \n"
                       "p = Softmax<axis = 1>(s) \n y = Mul(p, r)")
    feeds = random_feeds(model)
    before = run_ort(model, feeds)
    assert try_upgrade(model, 18)
    assert model.opset_imports[""] == 18
    verify(model)
    for node in model.graph:
        if node.op_type in ("Squeeze", "Unsqueeze", "ReduceMean", "ReduceSum"):
            assert "axes" not in node.attributes and len(node.inputs) == 2
    np.testing.assert_allclose(run_ort(model, feeds)[0], before[0], rtol=1e-6, atol=1e-6)


def test_softmax_on_a_non_last_axis_blocks():
    model = _model(12, "s = Squeeze<axes = [1]>(x) \n y = Softmax<axis = 0>(s)")
    assert any("Softmax" in r for r in upgrade_blockers(model, 17))
    assert not try_upgrade(model, 17)
    assert model.opset_imports[""] == 12


def test_old_or_removed_ops_block():
    old = _model(10, "s = Squeeze<axes = [1]>(x) \n y = Relu(s)")
    assert not try_upgrade(old, 14) and old.opset_imports[""] == 10
    scatter = _model(11, "i = Constant<value = int64[2,1] {0, 1}>() \n u = Constant<value = float[2,1] {1.0, 2.0}>() \n"
                         "s = Squeeze<axes = [1]>(x) \n y = Scatter<axis = 1>(s, i, u)")
    assert any("Scatter" in r for r in upgrade_blockers(scatter, 14))
