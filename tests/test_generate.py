"""``graphopt generate`` and KV-cache decoding: a small GPT-2 (2 layers, hidden 64) built by
models/generated.py, compiled once with symbolic ``seq`` and ``past``, decodes greedily exactly as ONNX
Runtime does (tokens, and logits at every step); bad requests and bad caches are refused with one line."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest

from graphopt.core.errors import GraphoptError, UsageError
from graphopt.front import api
from graphopt.front import generate as gen
from graphopt.models.generated import Config, build_gpt2

TINY = Config("gpt2", layers=2, hidden=64, heads=4, ffn=256, vocab=1000, positions=128, seed=5)
BOUNDS = {"seq": 16, "past": 64}
PROMPT = [17, 250, 3, 999, 42]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(onnx path, bundle dir): the tiny decoder compiled with seq <= 16, past <= 64."""
    d = tmp_path_factory.mktemp("gen")
    path = d / "tiny_gpt2.onnx"
    onnx.save(build_gpt2(TINY), str(path))
    api.compile(str(path), dim_bounds=BOUNDS, output=d / "bundle")
    return path, d / "bundle"


def _cli(capsys, *args):
    from graphopt.front.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bundle_decodes_like_onnxruntime_step_by_step(tiny):
    path, bundle = tiny
    result = api.generate(bundle, PROMPT, 16, against="ort", keep_logits=True, warmup=False)
    go, ref = result["graphopt"], result["ort"]
    assert result["source"] == str(path)
    assert go.tokens == ref.tokens and len(go.tokens) == 16
    assert len(set(ref.tokens)) > 3, f"degenerate reference decoding: {ref.tokens}"
    for i, (a, b) in enumerate(zip(go.logits, ref.logits)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4, err_msg=f"logits of step {i}")
    assert go.first_s > 0 and len(go.steps_s) == 15 and all(t > 0 for t in go.steps_s)


def test_one_bundle_serves_prefill_and_decode_shapes(tiny):
    """Prefill (past = 0, seq = n) and a decode step (seq = 1) through the bundle's checked call, against ORT."""
    path, bundle = tiny
    module = api.load_bundle(bundle)
    step, _ = gen.ort_decoder(str(path))
    rng = np.random.default_rng(0)
    for seq, past in ((5, 0), (1, 0), (1, 63), (16, 48)):
        feeds = {"input_ids": rng.integers(0, TINY.vocab, (1, seq)).astype(np.int64)}
        feeds.update({f"past_key_values.{i}.{kv}": rng.standard_normal((1, 4, past, 16)).astype(np.float32)
                      for i in range(2) for kv in ("key", "value")})
        got, want = module(**feeds), step(feeds)
        for name in ("logits", "present.1.value"):
            assert got[name].shape == want[name].shape
            np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-4, err_msg=f"{name} seq={seq} past={past}")


def test_cli_generate_against_ort(tiny, tmp_path, capsys):
    _, bundle = tiny
    out = tmp_path / "g.json"
    code, stdout, stderr = _cli(capsys, "generate", bundle, "--prompt-ids", ",".join(map(str, PROMPT)),
                                "--max-new-tokens", 8, "--against", "ort", "--json", out)
    assert code == 0, stderr
    assert "tokens match ONNX Runtime: yes" in stdout and "TTFT ms" in stdout
    data = json.loads(out.read_text())
    assert data["tokens_match"] is True and len(data["graphopt"]["tokens"]) == 8
    assert data["graphopt"]["token_ms_median"] > 0 and data["ratio_token_median"] > 0


@pytest.mark.parametrize("args, message", [
    (("--prompt-ids", "1,2", "--max-new-tokens", "66"), "needs a cache of 66, the bundle serves past up to 64"),
    (("--prompt-ids", ",".join(["1"] * 17), "--max-new-tokens", "2"), "the bundle serves seq up to 16"),
    (("--prompt-ids", "1,1000"), "token id 1000 is outside the vocabulary [0, 1000)"),
    (("--prompt-ids", "1,x"), "--prompt-ids '1,x': expected comma-separated integer token ids"),
    (("--prompt-ids", "1", "--max-new-tokens", "0"), "--max-new-tokens 0: must be a positive integer"),
])
def test_cli_refuses_bad_requests_with_one_line(tiny, args, message, capsys):
    _, bundle = tiny
    code, _, stderr = _cli(capsys, "generate", bundle, *args)
    assert code == 2, stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_bad_caches_are_refused_naming_the_input(tiny):
    _, bundle = tiny
    module = api.load_bundle(bundle)
    ids = np.array([[1]], np.int64)

    def cache(past=3, dim=16, dtype=np.float32):
        return {f"past_key_values.{i}.{kv}": np.zeros((1, 4, past, dim), dtype) for i in range(2) for kv in ("key", "value")}

    for feeds, message in (
        ({**cache(), "past_key_values.1.key": np.zeros((1, 4, 3, 32), np.float32)},
         "input 'past_key_values.1.key': shape (1, 4, 3, 32), expected (1, 4, past, 16)"),
        ({**cache(), "past_key_values.0.value": np.zeros((1, 4, 3, 16), np.float64)},
         "input 'past_key_values.0.value': dtype float64, expected float32"),
        ({**cache(), "past_key_values.1.value": np.zeros((1, 4, 2, 16), np.float32)},
         "input 'past_key_values.1.value': dim 2 (past) is 2, but input 'past_key_values.0.key' has past=3"),
        (cache(past=65), "input 'past_key_values.0.key': dim 2 (past) is 65, the bundle serves past from 0 to 64"),
    ):
        with pytest.raises(GraphoptError) as info:
            module(input_ids=ids, **feeds)
        assert message in str(info.value)


def test_generate_compiles_an_onnx_decoder_with_a_one_call_prefill(tiny):
    """From an ONNX file without bounds: the sequence dim bounded by the prompt (the prompt in one call),
    past by the request; tokens and logits are ORT's."""
    path, _ = tiny
    layout = gen.decoder_layout([("input_ids", [1, "seq"], "int64"),
                                 ("past_key_values.0.key", [1, 4, "past", 16], "float32")],
                                ["logits", "present.0.key"], str(path))
    assert gen.compile_plan(layout, PROMPT, 6, None, str(path)) == (None, {"seq": 5, "past": 10})
    assert gen.compile_plan(layout, PROMPT, 6, {"past": 12}, str(path)) == (["input_ids:1,1"], {"past": 12})
    unnamed = dataclasses.replace(layout, seq_dim=None)  # no name for the sequence dim: a decode bundle
    assert gen.compile_plan(unnamed, PROMPT, 6, None, str(path)) == (["input_ids:1,1"], {"past": 10})
    result = api.generate(path, PROMPT, 6, against="ort", keep_logits=True, warmup=False)
    go, ref = result["graphopt"], result["ort"]
    assert result["compile_s"] > 0 and go.tokens == ref.tokens
    for i, (a, b) in enumerate(zip(go.logits, ref.logits)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4, err_msg=f"logits of step {i}")


def test_generate_compiles_a_decode_bundle_when_only_past_is_bounded(tiny):
    """``dim_bounds`` naming only the cache dim: input_ids fixed at one token, the prompt one token per
    call; ORT's tokens and logits (ORT prefilled in one call)."""
    path, _ = tiny
    result = api.generate(path, PROMPT, 5, dim_bounds={"past": 12}, against="ort", keep_logits=True, warmup=False)
    go, ref = result["graphopt"], result["ort"]
    assert go.tokens == ref.tokens
    for i, (a, b) in enumerate(zip(go.logits, ref.logits)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4, err_msg=f"logits of step {i}")
    with pytest.raises(UsageError, match=r"needs a cache of 10, the bundle serves past up to 9 "):
        api.generate(path, PROMPT, 7, dim_bounds={"past": 9}, warmup=False)


def test_prompt_in_one_call_and_caches_kept_on_the_device(tiny):
    """``device_step``: the prompt goes in one call, each later call takes the previous call's caches
    as the library returned them (TVM tensors, no numpy round trip) and gives the tokens and logits of
    the checked numpy call; a first call with a bad cache is refused naming the input."""
    import tvm

    _, bundle = tiny
    module = api.load_bundle(bundle)
    layout = gen.decoder_layout(module.inputs, module.output_names, str(bundle))
    inner = gen.device_step(module.runner, lambda a: tvm.runtime.tensor(a))
    calls = []

    def step(feeds):
        calls.append({n: (isinstance(v, np.ndarray), tuple(v.shape)) for n, v in feeds.items()})
        return inner(feeds)

    got = gen.greedy(step, layout, PROMPT, 6, keep_logits=True)
    want = gen.greedy(lambda feeds: module(**feeds), layout, PROMPT, 6, keep_logits=True)
    assert got.tokens == want.tokens
    for a, b in zip(got.logits, want.logits):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert len(calls) == 6 and calls[0]["input_ids"] == (True, (1, 5))
    assert all(not c["past_key_values.1.value"][0] and c["past_key_values.1.value"][1] == (1, 4, 4 + i, 16)
               for i, c in enumerate(calls[1:], start=1))
    bad = {n: np.zeros((1, 4, 0, 16), np.float32) for n in layout.cache_dims}
    bad["past_key_values.0.value"] = np.zeros((1, 4, 0, 8), np.float32)
    with pytest.raises(GraphoptError, match="input 'past_key_values.0.value': shape"):
        inner({"input_ids": np.array([[1]], np.int64), **bad})


def test_a_model_that_is_not_a_kv_cache_decoder_is_refused(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])],
                              [helper.make_tensor_value_info("logits", TensorProto.INT64, [1, "seq"])])
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(GraphoptError, match="not a decoder with a KV cache: no past_key_values"):
        api.generate(path, [1], 2)
    with pytest.raises(UsageError, match="at least one token"):
        gen.parse_ids(",")


def test_pooled_buffers_released_while_decoding_keep_the_caches(tiny, monkeypatch):
    """The runtime's pool keeps each freed buffer for a later one of the same size, and the caches grow
    a row a step: the runner (``note_call``, which ``device_step`` calls too) releases the pool every
    ``RELEASE_EVERY`` calls. Released every second step here, the caches in use survive it: tokens and
    logits as without releases."""
    import sys

    import tvm

    _, bundle = tiny
    module = api.load_bundle(bundle)
    layout = gen.decoder_layout(module.inputs, module.output_names, str(bundle))
    loader = sys.modules[type(module.runner).__module__]
    release, releases = loader._release_pooled_buffers, []
    monkeypatch.setattr(loader, "RELEASE_EVERY", 2)
    monkeypatch.setattr(loader, "_release_pooled_buffers", lambda: (releases.append(1), release()))
    step = gen.device_step(module.runner, lambda a: tvm.runtime.tensor(a))
    got = gen.greedy(step, layout, PROMPT, 20, keep_logits=True)
    assert len(releases) == 10
    want = gen.greedy(lambda feeds: module(**feeds), layout, PROMPT, 20, keep_logits=True)
    assert len(releases) == 20 and got.tokens == want.tokens  # the runner's own calls release it too
    for a, b in zip(got.logits, want.logits):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
