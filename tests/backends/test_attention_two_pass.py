"""Which fused-attention kernel a static key count takes (``flash_attention.two_pass_kernel`` up to
``TWO_PASS_KEYS`` keys, the online-softmax ``attention_kernel`` past it), both against ONNX Runtime."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tvm
from graphopt.backends.lowering import flash_attention

sys.path.insert(0, str(Path(__file__).parent))
from test_flash_attention import _compile, _feeds, _ort, attention_model  # noqa: E402


def _kernel_text(model) -> str:
    """The lowered module's fused-attention PrimFunc(s) as TVMScript."""
    import onnx_ir as ir
    from graphopt.backends.compile import _front_end, _Stages

    lowered, _ = _front_end(ir.serde.deserialize_model(model), _Stages(), 2)
    return "\n".join(f.script() for gv, f in lowered.mod.functions_items()
                     if gv.name_hint.startswith("flash_attention") and isinstance(f, tvm.tirx.PrimFunc))


@pytest.mark.parametrize("limit, online, head", [(flash_attention.TWO_PASS_KEYS, False, 64), (64, True, 52)])
def test_static_keys_choose_the_kernel_and_match_ort(monkeypatch, limit, online, head):
    """ViT-S's head shape (197 keys, not a vector multiple) with a BERT-style padding mask: all scores of
    a row tile in one buffer (two-pass), or, with the limit lowered under 197, the online softmax (with
    a head dim of 52: three vectors and a 4-lane tail, V read with its 197 keys)."""
    monkeypatch.setattr(flash_attention, "TWO_PASS_KEYS", limit)
    q_shape, kv_len, mask_shape = (1, 3, 23, head), 197, (1, 1, 1, 197)
    model = attention_model(list(q_shape), kv_len, None, list(mask_shape))
    text = _kernel_text(model)
    assert ("alpha" in text) == online  # the online kernel's rescale factor exp(m_old - m_new)
    feeds = _feeds({"q": q_shape, "k": (1, 3, kv_len, head), "v": (1, 3, kv_len, head)},
                   np.random.default_rng(4), mask_shape)
    got = np.asarray(_compile(model)(**feeds)["y"])
    np.testing.assert_allclose(got, _ort(model, feeds), rtol=1e-3, atol=1e-4)


def test_two_pass_scores_are_exact_for_large_logits():
    """Scores up to ~±200 (no running max to carry): the row max is taken over all keys first."""
    q_shape, kv_len = (1, 2, 7, 32), 90
    model = attention_model(list(q_shape), kv_len, 48, None, scale=1.0)
    rng = np.random.default_rng(5)
    feeds = {"q": (rng.standard_normal(q_shape) * 3).astype(np.float32),
             "k": (rng.standard_normal((1, 2, kv_len, 32)) * 3).astype(np.float32),
             "v": rng.standard_normal((1, 2, kv_len, 48)).astype(np.float32)}
    assert "alpha" not in _kernel_text(model)
    got = np.asarray(_compile(model)(**feeds)["y"])
    np.testing.assert_allclose(got, _ort(model, feeds), rtol=1e-3, atol=1e-4)
