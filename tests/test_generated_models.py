"""models/generated.py: the generated transformers (gen:bert-base, gen:gpt2, gen:gpt2-large) and their
KV-cache contract, checked in ONNX Runtime on small configs built by the same code; the full-size
models against ONNX Runtime through the compiler under ``-m slow``."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphopt import models
from graphopt.core.errors import UsageError
from graphopt.front import api
from graphopt.front import generate as gen
from graphopt.models import generated
from graphopt.models.generated import CONFIGS, Config, build_gpt2

TINY = Config("gpt2", layers=2, hidden=64, heads=4, ffn=256, vocab=1000, positions=128, seed=7)


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(sess, ids, past):
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"input_ids": np.asarray([ids], np.int64), **past})))


def _empty(cfg):
    return {f"past_key_values.{i}.{kv}": np.zeros((1, cfg.heads, 0, cfg.head_dim), np.float32)
            for i in range(cfg.layers) for kv in ("key", "value")}


def test_catalog_shapes_and_parameter_counts():
    assert CONFIGS["gen:gpt2"].parameters() == pytest.approx(124.4e6, rel=0.01)
    assert CONFIGS["gen:gpt2-large"].parameters() == pytest.approx(774e6, rel=0.01)
    assert CONFIGS["gen:bert-base"].parameters() == pytest.approx(109.5e6, rel=0.01)
    shapes = models.default_input_shapes("gen:gpt2")
    assert shapes[0] == "input_ids:1,1" and "past_key_values.11.value:1,12,127,64" in shapes and len(shapes) == 25
    assert models.default_input_shapes("gen:bert-base") == ["input_ids:1,128", "attention_mask:1,128"]
    assert not any(n.startswith("gen:") for n in models.available())  # the real models' list
    with pytest.raises(UsageError, match="gen:gpt2-large"):
        models.entry("gen:nosuch")
    assert models.reference_data("gen:gpt2") is None


def test_prefill_equals_decoding_one_token_at_a_time(tmp_path):
    """The causal mask and positions: a prompt in one call (past = 0) gives the logits and the cache
    that feeding it token by token gives; a later step after a prefill continues the same sequence."""
    path = tmp_path / "tiny.onnx"
    onnx.save(build_gpt2(TINY), str(path))
    sess = _session(path)
    ids = [5, 77, 3, 999, 0, 412]
    full = _run(sess, ids, _empty(TINY))
    assert full["logits"].shape == (1, 6, TINY.vocab) and full["present.1.key"].shape == (1, 4, 6, 16)
    past, rows = _empty(TINY), []
    for t in ids:
        out = _run(sess, [t], past)
        rows.append(out["logits"][0, 0])
        past = {f"past_key_values.{k[len('present.'):]}": v for k, v in out.items() if k.startswith("present.")}
    np.testing.assert_allclose(np.stack(rows), full["logits"][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(past["past_key_values.1.value"], full["present.1.value"], rtol=1e-4, atol=1e-5)
    split = _run(sess, ids[4:], {f"past_key_values.{k[len('present.'):]}": v[:, :, :4]
                                 for k, v in _run(sess, ids[:4], _empty(TINY)).items() if k.startswith("present.")})
    np.testing.assert_allclose(split["logits"][0], full["logits"][0, 4:], rtol=1e-4, atol=1e-5)
    assert 0.05 < float(full["logits"].std()) < 5  # activations in a trained model's range


def test_weights_are_deterministic_and_external_data_is_the_same_model(tmp_path, monkeypatch):
    inline = build_gpt2(TINY)
    again = build_gpt2(TINY)
    w = {t.name: onnx.numpy_helper.to_array(t) for t in inline.graph.initializer}
    assert all(np.array_equal(w[t.name], onnx.numpy_helper.to_array(t)) for t in again.graph.initializer)
    other = {t.name: onnx.numpy_helper.to_array(t) for t in build_gpt2(dataclasses.replace(TINY, seed=8)).graph.initializer}
    assert not np.array_equal(w["wte"], other["wte"])
    assert abs(float(w["wte"].std()) - 0.02) < 0.002 and abs(float(w["ln_f.weight"].mean()) - 1) < 0.01

    monkeypatch.setattr(generated, "EXTERNAL_BYTES", 0)  # the gpt2-large path on a small config
    ext = tmp_path / "ext" / "tiny.onnx"
    ext.parent.mkdir()
    generated.build(TINY, ext)
    data = ext.with_name("tiny.onnx.data")
    assert data.stat().st_size > 0.9 * TINY.parameters() * 4 and ext.stat().st_size < 64 * 1024
    proto = onnx.load(str(ext), load_external_data=False)
    offsets = [int(e.value) for t in proto.graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % 4096 == 0 for o in offsets)
    inl = tmp_path / "inline.onnx"
    onnx.save(inline, str(inl))
    a, b = (_run(_session(p), [1, 2, 3], _empty(TINY)) for p in (inl, ext))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_generated_models_are_cached_once(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(CONFIGS, "gen:gpt2", TINY)  # resolve builds the small config under the real name
    path = models.resolve("gen:gpt2")
    assert path.parent == tmp_path / "generated" and path.name == generated.file_name("gen:gpt2", TINY)
    mtime = path.stat().st_mtime_ns
    assert models.resolve("gen:gpt2") == path and path.stat().st_mtime_ns == mtime
    assert not list((tmp_path / "generated").glob(".*building"))


@pytest.mark.slow
@pytest.mark.parametrize("form", ["decode", "prefill"])
def test_gen_gpt2_decodes_128_tokens_like_onnxruntime(tmp_path, form):
    """A decode bundle (input_ids fixed at one token) and a prefill + decode bundle (seq symbolic)."""
    bundle = tmp_path / "gpt2"
    shapes = ["input_ids:1,1"] if form == "decode" else None
    bounds = {"past": 160} if form == "decode" else {"seq": 8, "past": 160}
    api.compile("gen:gpt2", input_shapes=shapes, dim_bounds=bounds, output=bundle)
    result = api.generate(bundle, [464, 3290, 318, 257, 1180], 128, against="ort", keep_logits=True, warmup=False)
    go, ref = result["graphopt"], result["ort"]
    assert go.tokens == ref.tokens and len(set(ref.tokens)) > 10
    for i, (a, b) in enumerate(zip(go.logits, ref.logits)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4, err_msg=f"logits of step {i}")


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 8])
def test_gen_bert_base_matches_onnxruntime(batch):
    shapes = [f"input_ids:{batch},128", f"attention_mask:{batch},128"]
    compiled = api.compile("gen:bert-base", input_shapes=shapes)
    feeds = models.random_inputs("gen:bert-base", input_shapes=shapes)
    feeds["attention_mask"][:, 100:] = 0  # padded tail
    want = _session(models.resolve("gen:bert-base")).run(None, feeds)[0]
    got = compiled(**feeds)["sentence_embedding"]
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() > 0.9999
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_decoder_layout_refuses_other_models():
    rows = [("input_ids", (1, "seq"), "int64"), ("past_key_values.0.key", (1, 4, "past", 16), "float32")]
    with pytest.raises(Exception, match="has no output 'present.0.key'"):
        gen.decoder_layout(rows, ["logits"], "m.onnx")
    with pytest.raises(Exception, match="input 'mask' is neither input_ids nor"):
        gen.decoder_layout([*rows, ("mask", (1, "seq"), "int64")], ["logits", "present.0.key"], "m.onnx")
    lay = gen.decoder_layout(rows, ["logits", "present.0.key"], "m.onnx")
    assert lay.cache == (("past_key_values.0.key", "present.0.key"),) and lay.seq_dim == "seq" and lay.past_dim == "past"
    gen.check_request(dataclasses.replace(lay, seq_dim=1), [1, 2, 3], 4, {"past": 5}, "b")  # a decode bundle
    with pytest.raises(UsageError, match="input dim fixed at 8: generate needs a symbolic cache dim"):
        gen.check_request(dataclasses.replace(lay, seq_dim=8), [1, 2, 3], 4, {"past": 5}, "b")
    with pytest.raises(UsageError, match="the prompt has 3 tokens, the bundle serves seq up to 2"):
        gen.check_request(lay, [1, 2, 3], 1, {"seq": 2, "past": 5}, "b")
