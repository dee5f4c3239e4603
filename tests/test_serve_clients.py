"""Stock tritonclient.http and tritonclient.grpc, default settings (binary tensors on), against graphopt
serving real models: light SqueezeNet (default suite) and PP-OCRv4 rec (slow); outputs vs ONNX Runtime."""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from graphopt.models import resolve
from graphopt.front.serve.cache import compiled_bundle
from graphopt.front.serve.metrics import Metrics
from graphopt.front.serve.model import ServedModel
from tests.test_serve_support import start

RTOL, ATOL = 1e-3, 1e-4


def _serve(spec, name, tmp_path_factory):
    metrics = Metrics()
    module = compiled_bundle(spec, cache_dir=tmp_path_factory.mktemp("cache"), log=lambda s: None)
    return start([ServedModel(name, module, metrics=metrics)], metrics, grpc_port=0)


def _check(server, spec, name, shape, seeds=(0, 1)):
    sess = ort.InferenceSession(str(resolve(spec)), providers=["CPUExecutionProvider"])
    input_name, output_names = sess.get_inputs()[0].name, [o.name for o in sess.get_outputs()]
    http = th.InferenceServerClient(f"127.0.0.1:{server.port}")
    grpc = tg.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        for client, mod in ((http, th), (grpc, tg)):
            assert client.is_server_live() and client.is_model_ready(name)
            meta = client.get_model_metadata(name)
            inputs = meta["inputs"] if isinstance(meta, dict) else meta.inputs
            first = inputs[0]
            assert (first["name"] if isinstance(first, dict) else first.name) == input_name
            for seed in seeds:
                x = np.random.default_rng(seed).random(shape, dtype=np.float32)
                i = mod.InferInput(input_name, list(shape), "FP32")
                i.set_data_from_numpy(x)  # binary by default (HTTP: the binary tensor extension)
                r = client.infer(name, [i])
                for oname, want in zip(output_names, sess.run(None, {input_name: x})):
                    np.testing.assert_allclose(r.as_numpy(oname), want, rtol=RTOL, atol=ATOL,
                                               err_msg=f"{spec} {oname} over {mod.__name__}")
    finally:
        http.close()
        grpc.close()


def test_squeezenet_bad_inputs_through_tritonclient_then_good(squeezenet):
    """What a stock client shows for refused requests, over both protocols; the next call succeeds."""
    for mod, address in ((th, f"127.0.0.1:{squeezenet.port}"), (tg, f"127.0.0.1:{squeezenet.grpc_port}")):
        client = mod.InferenceServerClient(address)
        try:
            cases = [("data_0", [1, 3, 224, 200], "FP32", "shape [1, 3, 224, 200], model 'squeezenet' takes"),
                     ("data_0", [1, 3, 224, 224], "FP64", "datatype FP64"),
                     ("image", [1, 3, 224, 224], "FP32", "no input 'image'")]
            for name, shape, dtype, fragment in cases:
                i = mod.InferInput(name, shape, dtype)
                i.set_data_from_numpy(np.zeros(shape, {"FP32": np.float32, "FP64": np.float64}[dtype]))
                with pytest.raises(InferenceServerException, match=re.escape(fragment)):
                    client.infer("squeezenet", [i])
                with pytest.raises(InferenceServerException, match="no model named 'squeezenet2'"):
                    client.infer("squeezenet2", [i])
                good = mod.InferInput("data_0", [1, 3, 224, 224], "FP32")
                good.set_data_from_numpy(np.ones((1, 3, 224, 224), np.float32))
                assert client.infer("squeezenet", [good]).as_numpy("softmaxout_1").shape == (1, 1000, 1, 1)
        finally:
            client.close()


@pytest.fixture(scope="module")
def squeezenet(tmp_path_factory):
    server = _serve("light:squeezenet", "squeezenet", tmp_path_factory)
    yield server
    server.stop()


def test_squeezenet_with_stock_tritonclient_http_and_grpc(squeezenet):
    _check(squeezenet, "light:squeezenet", "squeezenet", (1, 3, 224, 224))


def test_squeezenet_concurrent_http_requests(squeezenet):
    """tritonclient's own concurrency (a pool of connections), every answer its own input's."""
    sess = ort.InferenceSession(str(resolve("light:squeezenet")), providers=["CPUExecutionProvider"])
    client = th.InferenceServerClient(f"127.0.0.1:{squeezenet.port}", concurrency=8)
    try:
        xs = [np.random.default_rng(10 + k).random((1, 3, 224, 224), dtype=np.float32) for k in range(8)]
        pending = []
        for x in xs:
            i = th.InferInput("data_0", [1, 3, 224, 224], "FP32")
            i.set_data_from_numpy(x)
            pending.append(client.async_infer("squeezenet", [i], outputs=[th.InferRequestedOutput("softmaxout_1")]))
        for x, p in zip(xs, pending):
            want = sess.run(None, {"data_0": x})[0]
            np.testing.assert_allclose(p.get_result().as_numpy("softmaxout_1"), want, rtol=RTOL, atol=ATOL)
    finally:
        client.close()


@pytest.mark.slow
def test_ppocr_rec_with_stock_tritonclient_http_and_grpc(tmp_path_factory):
    server = _serve("rapidocr:rec", "rec", tmp_path_factory)
    try:
        _check(server, "rapidocr:rec", "rec", (1, 3, 48, 320), seeds=(0,))
    finally:
        server.stop()
