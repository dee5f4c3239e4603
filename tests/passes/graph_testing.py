"""Helpers for the pass tests: small models from ONNX text, and a differential check in ONNX Runtime."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx.parser
import onnx.shape_inference
import onnx_ir as ir
from onnx import numpy_helper

from graphopt.passes.graphopt_ops import run_ort
from graphopt.core.verify import verify

RNG = np.random.default_rng(0)


def model_from_text(text: str, **initializers: np.ndarray) -> ir.Model:
    """An IR model from ONNX text, with numpy initializers added, shapes inferred."""
    proto = onnx.parser.parse_model(text)
    for name, array in initializers.items():
        proto.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    return ir.serde.deserialize_model(proto)


def ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph))


def random_feeds(model: ir.Model, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in model.graph.inputs:
        if v.name in model.graph.initializers:
            continue
        shape = [d if isinstance(d, int) else 1 for d in v.shape.dims]
        dtype = v.dtype.numpy()
        feeds[v.name] = (rng.standard_normal(shape) * 3).astype(dtype)
    return feeds


def apply_and_compare(pass_obj, model: ir.Model, *, rtol: float = 1e-5, atol: float = 1e-5,
                      feeds: dict | None = None):
    """Run the pass; check the graph, the output names and the numerics against ORT on the original."""
    feeds = feeds or random_feeds(model)
    names = [v.name for v in model.graph.outputs]
    before = run_ort(model, feeds)
    result = pass_obj(model)
    verify(result.model)
    assert [v.name for v in result.model.graph.outputs] == names
    after = run_ort(result.model, feeds)
    for a, b in zip(after, before):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
    return result
