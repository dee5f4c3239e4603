"""graphopt serve over gRPC: stock tritonclient.grpc (raw binary tensors) against the KServe v2 service,
outputs compared with ONNX Runtime; bad messages get the protocol's codes and the next call succeeds."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.utils import InferenceServerException

from graphopt.front.serve.grpc_proto import SERVICE, message
from graphopt.front.serve.metrics import Metrics
from tests.test_serve_support import inputs, ort_run, served, start, two_input_model


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpc")
    src = two_input_model(d / "m.onnx")
    metrics = Metrics()
    server = start([served("m", src, d / "cache", metrics)], metrics, grpc_port=0, max_body_bytes=1 << 20)
    client = tg.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield server, src, client
    client.close()
    server.stop()


def _infer(client, feeds, model="m", outputs=None, headers=None):
    items = []
    for name, a in feeds.items():
        i = tg.InferInput(name, list(a.shape), {"float32": "FP32", "int64": "INT64", "float64": "FP64"}[a.dtype.name])
        i.set_data_from_numpy(a)
        items.append(i)
    wanted = [tg.InferRequestedOutput(n) for n in outputs] if outputs else None
    return client.infer(model, items, outputs=wanted, headers=headers)


def _good(client, src, seed=5):
    x = inputs(2, seed=seed)
    r, want = _infer(client, x), ort_run(src, x)
    for name in ("y", "s"):
        np.testing.assert_allclose(r.as_numpy(name), want[name], rtol=1e-5, atol=1e-6)


def test_tritonclient_grpc_metadata_and_infer(env):
    _, src, client = env
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("m")
    assert client.get_server_metadata().name == "graphopt"
    meta = client.get_model_metadata("m")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [2, 4]), ("k", "INT64", [2, 1])]
    assert [m.name for m in client.get_model_repository_index().models] == ["m"]
    _good(client, src)
    r = _infer(client, inputs(2), outputs=["s"])
    assert r.as_numpy("y") is None and r.as_numpy("s").shape == (2, 4)


def _raw_call(server, request_bytes: bytes, metadata=None):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        fn = ch.unary_unary(f"/{SERVICE}/ModelInfer", request_serializer=lambda b: b,
                            response_deserializer=message("ModelInferResponse").FromString)
        return fn(request_bytes, metadata=metadata, timeout=30)


def _request(x_bytes=None, k_bytes=None, model="m", x_type="FP32", x_shape=(2, 4), drop_raw=False, contents=None):
    req = message("ModelInferRequest")(model_name=model)
    req.inputs.add(name="x", datatype=x_type, shape=list(x_shape))
    req.inputs.add(name="k", datatype="INT64", shape=[2, 1])
    if contents is not None:
        req.inputs[0].contents.fp32_contents.extend(contents)
        req.inputs[1].contents.int64_contents.extend([1, 2])
    elif not drop_raw:
        req.raw_input_contents.append(np.zeros((2, 4), np.float32).tobytes() if x_bytes is None else x_bytes)
        req.raw_input_contents.append(np.zeros((2, 1), np.int64).tobytes() if k_bytes is None else k_bytes)
    return req.SerializeToString()


BAD = [
    ("unknown model", _request(model="nope"), grpc.StatusCode.NOT_FOUND, "no model named 'nope'"),
    ("wrong shape", _request(x_shape=(4, 2)), grpc.StatusCode.INVALID_ARGUMENT, "model 'm' takes [2, 4]"),
    ("wrong datatype", _request(x_type="FP64", x_bytes=np.zeros((2, 4)).tobytes()), grpc.StatusCode.INVALID_ARGUMENT,
     "datatype FP64"),
    ("bytes", _request(x_type="BYTES"), grpc.StatusCode.INVALID_ARGUMENT, "BYTES"),
    ("raw size vs shape", _request(x_bytes=b"\0" * 12), grpc.StatusCode.INVALID_ARGUMENT, "12 bytes of data"),
    ("raw count", _request()[:-18], grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents for 2 inputs"),
    ("contents count", _request(contents=[1.0] * 5), grpc.StatusCode.INVALID_ARGUMENT, "contents.fp32_contents has 5 elements"),
    ("no data", _request(drop_raw=True), grpc.StatusCode.INVALID_ARGUMENT, "contents.fp32_contents has 0 elements"),
    ("not protobuf", b"\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, "not a valid ModelInferRequest"),
    ("over the limit", _request(x_bytes=b"\0" * (2 << 20)), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
]


@pytest.mark.parametrize("body, code, fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_grpc_requests_get_codes_then_a_good_one_succeeds(env, body, code, fragment):
    server, src, client = env
    with pytest.raises(grpc.RpcError) as e:
        _raw_call(server, body)
    assert e.value.code() == code and fragment in e.value.details()
    _good(client, src)


def test_typed_contents_are_accepted(env):
    server, src, _ = env
    x = inputs(2)
    req = message("ModelInferRequest")(model_name="m", id="c1")
    req.inputs.add(name="x", datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend(x["x"].ravel().tolist())
    req.inputs.add(name="k", datatype="INT64", shape=[2, 1]).contents.int64_contents.extend(x["k"].ravel().tolist())
    resp = _raw_call(server, req.SerializeToString())
    assert resp.id == "c1" and [o.name for o in resp.outputs] == ["y", "s"]
    y = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(list(resp.outputs[0].shape))
    np.testing.assert_allclose(y, ort_run(src, x)["y"], rtol=1e-5, atol=1e-6)


def test_grpc_api_key(env):
    server, src, _ = env
    from graphopt.front.serve.model import ServedModel

    metrics = Metrics()
    module = server.repo.models["m"].module
    guarded = start([ServedModel("m", module, metrics=metrics)], metrics, grpc_port=0, api_key="k3y")
    client = tg.InferenceServerClient(f"127.0.0.1:{guarded.grpc_port}")
    try:
        assert client.is_server_live()
        with pytest.raises(InferenceServerException, match="API key"):
            _infer(client, inputs(2))
        with pytest.raises(InferenceServerException, match="API key"):
            client.get_model_metadata("m")
        r = _infer(client, inputs(2), headers={"authorization": "Bearer k3y"})
        np.testing.assert_allclose(r.as_numpy("y"), ort_run(src, inputs(2))["y"], rtol=1e-5, atol=1e-6)
    finally:
        client.close()
        guarded.stop()
