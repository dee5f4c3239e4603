"""graphopt serve over HTTP: the Open Inference Protocol (JSON and binary tensors) against a real compiled
bundle on loopback, outputs compared with ONNX Runtime; every bad request gets a 4xx naming the problem
and the next good request still succeeds."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from graphopt.front.serve.metrics import Metrics
from tests.test_serve_support import (
    binary_infer,
    call,
    decode_reply,
    inputs,
    json_infer,
    ort_run,
    served,
    start,
    two_input_model,
)

INFER = "/v2/models/m/infer"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    src = two_input_model(d / "m.onnx")
    metrics = Metrics()
    model = served("m", src, d / "cache", metrics)
    server = start([model], metrics, max_body_bytes=1 << 20)
    yield server, src, model
    server.stop()


def _good(server, src):
    x = inputs(2, seed=7)
    status, headers, body = call(server, "POST", INFER, json_infer(x, id="req-7"))
    assert status == 200, body
    assert json.loads(body)["id"] == "req-7"
    want = ort_run(src, x)
    got = decode_reply(headers, body)
    for name in ("y", "s"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_health_metadata_and_index(env):
    server, _, _ = env
    assert call(server, "GET", "/v2/health/live")[::2] == (200, b'{"live":true}')
    assert call(server, "GET", "/v2/health/ready")[0] == 200
    meta = json.loads(call(server, "GET", "/v2")[2])
    assert meta["name"] == "graphopt" and "binary_tensor_data" in meta["extensions"]
    for path in ("/v2/models/m", "/v2/models/m/versions/1"):
        status, _, body = call(server, "GET", path)
        m = json.loads(body)
        assert status == 200 and m["versions"] == ["1"]
        assert m["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [2, 4]},
                               {"name": "k", "datatype": "INT64", "shape": [2, 1]}]
        assert [o["name"] for o in m["outputs"]] == ["y", "s"]
    assert json.loads(call(server, "GET", "/v2/models/m/ready")[2]) == {"name": "m", "ready": True}
    assert json.loads(call(server, "POST", "/v2/repository/index", b"{}")[2]) == [
        {"name": "m", "version": "1", "state": "READY"}]
    status, headers, body = call(server, "GET", "/v2/models/m/versions/2")
    assert status == 404 and "no version '2'" in json.loads(body)["error"]
    status, headers, body = call(server, "GET", "/v3/nothing")
    assert status == 404 and headers["content-type"] == "application/json" and "no route" in json.loads(body)["error"]


def test_json_infer_matches_onnxruntime_and_selects_outputs(env):
    server, src, _ = env
    _good(server, src)
    x = inputs(2, seed=3)
    status, headers, body = call(server, "POST", "/v2/models/m/versions/1/infer",
                                 json_infer(x, outputs=[{"name": "s"}]))
    assert status == 200
    reply = json.loads(body)
    assert [o["name"] for o in reply["outputs"]] == ["s"] and "id" not in reply
    np.testing.assert_allclose(decode_reply(headers, body)["s"], ort_run(src, x)["s"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["all-binary", "mixed", "gzip"])
def test_binary_tensor_extension_both_ways(env, mode):
    server, src, _ = env
    x = inputs(2, seed=11)
    if mode == "mixed":  # y in binary, s as JSON
        body, headers = binary_infer(x, outputs=[{"name": "y", "parameters": {"binary_data": True}}, {"name": "s"}])
    else:
        body, headers = binary_infer(x, binary_data_output=True)
    if mode == "gzip":
        body, headers = gzip.compress(body), {**headers, "Content-Encoding": "gzip"}
    status, reply_headers, reply = call(server, "POST", INFER, body, headers)
    assert status == 200, reply
    header_len = int(reply_headers["inference-header-content-length"])
    outputs = json.loads(reply[:header_len])["outputs"]
    binary = {o["name"] for o in outputs if "binary_data_size" in o.get("parameters", {})}
    assert binary == ({"y"} if mode == "mixed" else {"y", "s"})
    got, want = decode_reply(reply_headers, reply), ort_run(src, x)
    for name in ("y", "s"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def _binary_body(header: dict, data: bytes) -> tuple[bytes, dict]:
    h = json.dumps(header).encode()
    return h + data, {"Inference-Header-Content-Length": str(len(h))}


X8 = np.zeros((2, 4), np.float32).tobytes()
K2 = np.zeros((2, 1), np.int64).tobytes()
BIN = [{"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": 32}},
       {"name": "k", "shape": [2, 1], "datatype": "INT64", "parameters": {"binary_data_size": 16}}]
K_OK = {"name": "k", "shape": [2, 1], "datatype": "INT64", "data": [1, 2]}


def _x(**kw):
    return {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [0.5] * 8, **kw}


BAD = [  # (id, path, body, headers, status, fragment)
    ("unknown model", "/v2/models/nope/infer", {"inputs": [_x(), K_OK]}, None, 404, "no model named 'nope'"),
    ("unknown version", "/v2/models/m/versions/9/infer", {"inputs": [_x(), K_OK]}, None, 404, "no version '9'"),
    ("unknown input", INFER, {"inputs": [_x(name="z"), K_OK]}, None, 400, "no input 'z'"),
    ("missing input", INFER, {"inputs": [_x()]}, None, 400, "missing input 'k'"),
    ("wrong datatype", INFER, {"inputs": [_x(datatype="FP64"), K_OK]}, None, 400, "datatype FP64"),
    ("unknown datatype", INFER, {"inputs": [_x(datatype="FLOAT"), K_OK]}, None, 400, "unknown datatype 'FLOAT'"),
    ("bytes", INFER, {"inputs": [_x(datatype="BYTES", data=["a"] * 8), K_OK]}, None, 400, "BYTES"),
    ("wrong shape", INFER, {"inputs": [_x(shape=[4, 2]), K_OK]}, None, 400, "shape [4, 2], model 'm' takes [2, 4]"),
    ("negative dim", INFER, {"inputs": [_x(shape=[-2, 4]), K_OK]}, None, 400, "non-negative"),
    ("data vs shape", INFER, {"inputs": [_x(data=[1.0] * 5), K_OK]}, None, 400, "'data' has 5 elements"),
    ("ragged data", INFER, {"inputs": [_x(data=[[1.0], [1.0, 2.0]]), K_OK]}, None, 400, "not a regular list"),
    ("strings as numbers", INFER, {"inputs": [_x(data=["1"] * 8), K_OK]}, None, 400, "numbers"),
    ("fraction for int", INFER, {"inputs": [_x(), {**K_OK, "data": [1.5, 2]}]}, None, 400, "fractional"),
    ("no inputs", INFER, {"outputs": []}, None, 400, "'inputs'"),
    ("unknown output", INFER, {"inputs": [_x(), K_OK], "outputs": [{"name": "q"}]}, None, 400, "no output 'q'"),
    ("not an object", INFER, b"[1, 2]", None, 400, "JSON object"),
    ("malformed json", INFER, b'{"inputs": [{"name": "x", "shape": [2,', None, 400, "not valid JSON"),
    ("binary without header", INFER, X8 + b'{"x"}', None, 400, "Inference-Header-Content-Length"),
    ("header length past body", INFER, b"{}", {"Inference-Header-Content-Length": "999"}, 400, "does not fit"),
    ("header length not a number", INFER, b"{}", {"Inference-Header-Content-Length": "ten"}, 400, "not a number"),
    ("truncated json header", INFER, *_binary_body({"inputs": BIN}, X8 + K2)[:1], {"Inference-Header-Content-Length": "40"},
     400, "not valid JSON"),
    ("truncated binary", INFER, *_binary_body({"inputs": BIN}, X8 + K2[:8]), 400, "only 8 bytes of binary data remain"),
    ("binary size vs shape", INFER, *_binary_body({"inputs": [{**BIN[0], "parameters": {"binary_data_size": 28}}, BIN[1]]},
                                                  X8[:28] + K2), 400, "28 bytes of data"),
    ("trailing bytes", INFER, *_binary_body({"inputs": BIN}, X8 + K2 + b"xx"), 400, "2 bytes of binary data after"),
    ("unknown encoding", INFER, b"{}", {"Content-Encoding": "br"}, 415, "Content-Encoding 'br'"),
    ("bad gzip", INFER, b"not gzip", {"Content-Encoding": "gzip"}, 400, "not valid gzip"),
    ("over the limit", INFER, b" " * ((1 << 20) + 1), None, 413, "over the limit of 1048576 bytes"),
    ("gzip bomb", INFER, gzip.compress(b" " * (4 << 20)), {"Content-Encoding": "gzip"}, 413, "over the limit"),
]


@pytest.mark.parametrize("path, body, headers, status, fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request_gets_4xx_naming_it_then_a_good_one_succeeds(env, path, body, headers, status, fragment):
    server, src, _ = env
    got, reply_headers, reply = call(server, "POST", path, body, headers)
    assert got == status, reply
    assert reply_headers["content-type"] == "application/json"
    assert fragment in json.loads(reply)["error"]
    _good(server, src)


def test_metrics_count_requests_errors_and_latency(env):
    server, src, _ = env
    _good(server, src)
    call(server, "POST", INFER, b"[]")
    status, headers, body = call(server, "GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")

    def value(line_start):
        return float(next(ln for ln in text.splitlines() if ln.startswith(line_start)).rsplit(" ", 1)[1])

    ok = value('graphopt_inference_requests_total{model="m",protocol="http",status="200"}')
    assert ok >= 2
    assert value('graphopt_inference_requests_total{model="m",protocol="http",status="400"}') >= 1
    assert value('graphopt_inference_latency_seconds_count{model="m",protocol="http"}') == ok
    assert value('graphopt_batch_size_count{model="m"}') == ok
    assert value('graphopt_queue_depth{model="m"}') == 0


def test_api_key_guards_everything_but_health(env):
    server, src, model = env
    from graphopt.front.serve.model import ServedModel

    metrics = Metrics()
    guarded = start([ServedModel("m", model.module, metrics=metrics)], metrics, api_key="s3cret")
    try:
        assert call(guarded, "GET", "/v2/health/ready")[0] == 200
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, reply_headers, body = call(guarded, "POST", INFER, json_infer(inputs(2)), headers)
            assert status == 401 and "API key" in json.loads(body)["error"]
            assert reply_headers["www-authenticate"] == "Bearer"
            assert call(guarded, "GET", "/v2/models/m", None, headers)[0] == 401
            assert call(guarded, "GET", "/metrics", None, headers)[0] == 401
        ok = {"Authorization": "Bearer s3cret"}
        status, reply_headers, body = call(guarded, "POST", INFER, json_infer(inputs(2)), ok)
        assert status == 200
        np.testing.assert_allclose(decode_reply(reply_headers, body)["y"], ort_run(src, inputs(2))["y"], rtol=1e-5, atol=1e-6)
    finally:
        guarded.stop()


def test_mutated_requests_never_get_a_5xx(env):
    """200 seeded mutations of a valid binary request (bytes flipped, cut, header length moved): each is
    answered 200 or 4xx, never 5xx, and the server keeps serving."""
    server, src, _ = env
    body, headers = binary_infer(inputs(2), binary_data_output=True)
    n = int(headers["Inference-Header-Content-Length"])
    rng = np.random.default_rng(0)
    statuses = set()
    for _ in range(200):
        b, h = bytearray(body), dict(headers)
        kind = rng.integers(4)
        if kind == 0:
            for pos in rng.integers(0, len(b), rng.integers(1, 4)):
                b[pos] = int(rng.integers(256))
        elif kind == 1:
            b = b[:rng.integers(0, len(b))]
        elif kind == 2:
            h["Inference-Header-Content-Length"] = str(n + int(rng.integers(-20, 20)))
        else:
            pos = int(rng.integers(0, n))
            b[pos:pos] = bytes(rng.choice(list(b'{}[]",:0-e.'), 3))
        status, _, reply = call(server, "POST", INFER, bytes(b), h)
        assert status == 200 or 400 <= status < 500, reply
        if status != 200:
            assert json.loads(reply)["error"]
        statuses.add(status)
    assert statuses - {200}  # most mutations are refused
    _good(server, src)
