"""Magnitude pruning: the smallest weights become zeros (per layer or under one scale-free global
threshold), shapes stay, ONNX Runtime runs the result, and the gzip size is what shrinks."""

from __future__ import annotations

import numpy as np
import pytest
from test_prune_channels import feeds, prune_model

from graphopt.compression.compress import copy_model, ort_run
from graphopt.core.errors import UsageError
from graphopt.passes.prune_magnitude import PruneMagnitudePass
from graphopt.compression.pruning import gzip_size

LAYERS = ("c1", "dw", "c2", "c3", "c4", "c5", "gemm")


def _weights(model):
    return {n.name: n.inputs[1].const_value.numpy() for n in model.graph if n.name in LAYERS}


def test_per_layer_zeroes_the_smallest_share_of_each_layer():
    model = prune_model(dead=False)
    before = _weights(model)
    p = PruneMagnitudePass(0.5)
    assert p(model).modified
    after = _weights(model)
    for name, w in before.items():
        new = after[name]
        assert new.shape == w.shape
        zeros = new == 0
        assert zeros.sum() == int(w.size * 0.5)
        assert np.abs(w[zeros]).max() <= np.abs(w[~zeros]).min()  # the smallest went
        np.testing.assert_array_equal(new[~zeros], w[~zeros])
    assert {r["layer"]: r["zeroed"] for r in p.rows} == {k: int(v.size * 0.5) for k, v in before.items()}
    out = ort_run(model)(feeds(1)[0])["y"]
    assert out.shape == (1, 5) and np.isfinite(out).all()


def test_global_threshold_is_scale_free_and_layers_differ():
    model = prune_model(dead=False)
    scaled = next(n for n in model.graph if n.name == "c5")
    w = scaled.inputs[1].const_value.numpy() * 100  # a layer whose weights are 100x larger
    from onnx_ir import tensor

    scaled.inputs[1].const_value = tensor(w, name=scaled.inputs[1].name)
    p = PruneMagnitudePass(0.4, scope="global", norm="l1")
    p(model)
    shares = {r["layer"]: r["share"] for r in p.rows}
    total = sum(r["zeroed"] for r in p.rows) / sum(r["weights"] for r in p.rows)
    assert abs(total - 0.4) < 0.01
    assert 0.1 < shares["c5"] < 0.9  # not spared for its scale
    assert max(shares.values()) - min(shares.values()) > 0.05  # one threshold, not one share


def test_exclude_overrides_and_compressed_size():
    model = prune_model(dead=False)
    original = copy_model(model)
    p = PruneMagnitudePass(0.7, exclude=["Gemm"], overrides={"c1": 0.0})
    p(model)
    rows = {r["layer"]: r for r in p.rows}
    assert "gemm" not in rows and rows["c1"]["zeroed"] == 0 and rows["c4"]["share"] > 0.69
    assert gzip_size(model) < gzip_size(original)


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 1.0}, r"outside \[0, 1\)"),
    ({"ratio": 0.5, "scope": "everything"}, "scope"),
    ({"ratio": 0.5, "exclude": ["nosuch"]}, "--exclude nosuch"),
    ({"ratio": 0.5, "overrides": {"nosuch": 0.2}}, "layer nosuch"),
])
def test_bad_input(kwargs, message):
    with pytest.raises(UsageError, match=message):
        PruneMagnitudePass(kwargs.pop("ratio"), **kwargs)(prune_model())
