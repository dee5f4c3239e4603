"""Helpers shared by the tests/test_serve*.py files (no tests here): a small two-input model, a
server on a background thread, raw HTTP calls."""

from __future__ import annotations

import http.client
import json

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from graphopt.front.serve.cache import compiled_buckets, compiled_bundle
from graphopt.front.serve.metrics import Metrics
from graphopt.front.serve.model import ServedModel
from graphopt.front.serve.repository import Repository
from graphopt.front.serve.server import Server

W = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)


def two_input_model(path) -> str:
    """y = relu(x @ W) + float(k), s = sigmoid(x); x: FP32 [n, 4], k: INT64 [n, 1]."""
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["r"]),
         helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT), helper.make_node("Add", ["r", "kf"], ["y"]),
         helper.make_node("Sigmoid", ["x"], ["s"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("k", TensorProto.INT64, ["n", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 3], W.ravel())],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def inputs(rows: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((rows, 4)).astype(np.float32),
            "k": rng.integers(-3, 4, (rows, 1)).astype(np.int64)}


def ort_run(path, feeds: dict) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def served(name: str, source, cache, metrics: Metrics, *, rows: int = 2, max_batch: int = 0,
           timeout_s: float = 0.0) -> ServedModel:
    """A served two_input_model: fixed ``rows``, or batched up to ``max_batch`` (every bucket compiled)."""
    if max_batch:
        buckets = compiled_buckets(str(source), max_batch=max_batch, cache_dir=cache, log=lambda s: None)
        return ServedModel(name, buckets[max_batch], max_batch=max_batch, batch_timeout_s=timeout_s,
                           metrics=metrics, buckets=buckets)
    module = compiled_bundle(str(source), input_shapes=[f"x:{rows},4", f"k:{rows},1"], cache_dir=cache,
                             log=lambda s: None)
    return ServedModel(name, module, metrics=metrics)


def start(models: list[ServedModel], metrics: Metrics, **kw) -> Server:
    repo_kw = {k: kw.pop(k) for k in ("api_key", "request_timeout_s") if k in kw}
    repo = Repository(models, metrics=metrics, **repo_kw)
    return Server(repo, host="127.0.0.1", port=0, **kw).start()


def call(server: Server, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None):
    """(status, headers with lower-case names, body bytes) of one request on a fresh connection."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def json_infer(arrays: dict[str, np.ndarray], **extra) -> dict:
    dt = {"float32": "FP32", "int64": "INT64"}
    return {"inputs": [{"name": n, "shape": list(a.shape), "datatype": dt[a.dtype.name], "data": a.ravel().tolist()}
                       for n, a in arrays.items()], **extra}


def binary_infer(arrays: dict[str, np.ndarray], outputs=None, **params) -> tuple[bytes, dict]:
    """A binary-tensor request body and its headers (tensor bytes after the JSON header)."""
    dt = {"float32": "FP32", "int64": "INT64"}
    items = [{"name": n, "shape": list(a.shape), "datatype": dt[a.dtype.name],
              "parameters": {"binary_data_size": a.nbytes}} for n, a in arrays.items()]
    obj = {"inputs": items, "parameters": params}
    if outputs is not None:
        obj["outputs"] = outputs
    header = json.dumps(obj).encode()
    return header + b"".join(a.tobytes() for a in arrays.values()), {"Inference-Header-Content-Length": str(len(header))}


def decode_reply(headers: dict, body: bytes) -> dict[str, np.ndarray]:
    """Output arrays of an infer reply, JSON or binary."""
    n = int(headers.get("inference-header-content-length") or len(body))
    header = json.loads(body[:n])
    out, offset = {}, n
    np_type = {"FP32": np.float32, "INT64": np.int64}
    for t in header["outputs"]:
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is None:
            out[t["name"]] = np.asarray(t["data"], dtype=np_type[t["datatype"]]).reshape(t["shape"])
        else:
            out[t["name"]] = np.frombuffer(body[offset:offset + size], np_type[t["datatype"]]).reshape(t["shape"])
            offset += size
    assert offset == len(body)
    return out
