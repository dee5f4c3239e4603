"""graphopt serve: the KServe v2 REST protocol against a real compiled bundle, on loopback."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.serve import ModelEndpoint, make_server


def _model(path):
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], rng.standard_normal((4, 3)).astype(np.float32).ravel())
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [w],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    src = _model(str(d / "m.onnx"))
    graphopt.compile(src, target="x86", output=d / "bundle")
    srv = make_server({"mm": ModelEndpoint("mm", graphopt.load_bundle(d / "bundle"))}, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", src
    srv.shutdown()
    srv.server_close()


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, json.loads(r.read())


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_and_metadata(server):
    base, _ = server
    assert _get(base + "/v2/health/ready") == (200, {"ready": True})
    assert _get(base + "/v2/health/live")[0] == 200
    status, meta = _get(base + "/v2/models/mm")
    assert status == 200
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [2, 4]}]
    assert meta["outputs"][0]["name"] == "y" and meta["outputs"][0]["shape"] == [2, 3]


def test_infer_matches_onnxruntime(server):
    base, src = server
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    status, body = _post(base + "/v2/models/mm/infer",
                         {"id": "r1", "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}]})
    assert status == 200 and body["id"] == "r1"
    out = body["outputs"][0]
    got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    want = ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"inputs": [{"name": "z", "shape": [2, 4], "datatype": "FP32", "data": [0] * 8}]}, "unknown input 'z'"),
        ({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [0] * 5}]}, "does not fit shape"),
        ({"inputs": [{"name": "x", "shape": [4, 2], "datatype": "FP32", "data": [0] * 8}]}, "x"),
        ({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "STRING", "data": [0] * 8}]}, "unsupported datatype"),
        ({"nothing": 1}, "'inputs'"),
    ],
)
def test_bad_requests_get_400_with_reason(server, body, fragment):
    base, _ = server
    status, reply = _post(base + "/v2/models/mm/infer", body)
    assert status == 400
    assert fragment in reply["error"]


def test_unknown_model_is_404(server):
    base, _ = server
    status, reply = _post(base + "/v2/models/nope/infer", {"inputs": []})
    assert status == 404 and "nope" in reply["error"]
