"""Models as ONNX Runtime's transformer optimizer writes them (com.microsoft SkipLayerNormalization,
BiasGelu, ...) compile with graphopt and match ONNX Runtime on the same file."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphopt import models
from graphopt.front import api


SENTENCES = ("A man is playing a guitar on the stage.", "The new movie is awesome",
             "Stocks fell sharply after the central bank raised interest rates again this year.")


@pytest.mark.slow
def test_minilm_after_ort_transformer_optimizer_matches_ort(tmp_path):
    from onnxruntime.transformers import optimizer

    from graphopt.models import minilm

    path = tmp_path / "minilm_ort.onnx"
    optimizer.optimize_model(str(models.model_path("minilm:l6")), model_type="bert", num_heads=12,
                             hidden_size=384, opt_level=0).save_model_to_file(str(path))
    ops = collections.Counter((n.domain, n.op_type) for n in onnx.load(path).graph.node)
    assert ops[("com.microsoft", "SkipLayerNormalization")] == 12 and ops[("com.microsoft", "BiasGelu")] == 6
    compiled = api.compile(path, input_shapes=["input_ids:1,24", "attention_mask:1,24"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tok = minilm.tokenizer()
    for text in SENTENCES:
        ids, mask = tok.batch([text], length=24)
        feeds = {"input_ids": ids, "attention_mask": mask}
        want = sess.run(None, feeds)[0]
        got = compiled(**feeds)["sentence_embedding"]
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
