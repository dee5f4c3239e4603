"""Dynamic batching: requests arriving together run as one padded batch and each gets its own rows back;
inference stays off the event loop (health answers while a request waits)."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import numpy as np
import pytest

from graphopt.front.serve.batching import ModelWorker
from graphopt.front.serve.metrics import Metrics
from tests.test_serve_support import call, decode_reply, inputs, json_infer, ort_run, served, start, two_input_model


class Recorder:
    """A stand-in module for the worker: y = 2x + 1, recording each call's batch."""

    def __init__(self, fail_when=None):
        self.calls, self.fail_when, self.threads = [], fail_when, set()

    def __call__(self, x):
        self.calls.append(x.copy())
        self.threads.add(threading.current_thread().name)
        if self.fail_when is not None and self.fail_when(x):
            raise RuntimeError("model failed")
        return {"y": 2 * x + 1}


def test_worker_stacks_pads_and_splits():
    module = Recorder()
    sizes = [1, 2, 3, 1, 2, 1, 3, 2, 1, 1]
    batches = []
    worker = ModelWorker("w", module, max_batch=4, timeout_s=0.2, on_batch=batches.append)
    xs = [np.full((n, 3), i, np.float32) for i, n in enumerate(sizes)]
    futures = [worker.submit({"x": x}, len(x)) for x in xs]
    results = [f.result(10) for f in futures]
    worker.close()
    for x, r in zip(xs, results):
        np.testing.assert_array_equal(r["y"], 2 * x + 1)  # each request gets exactly its own rows
    assert all(c.shape == (4, 3) for c in module.calls)  # always the compiled batch, padded
    assert sum(batches) == sum(sizes) and max(batches) <= 4
    assert len(module.calls) < len(sizes)  # requests were stacked
    assert module.threads == {"graphopt-serve-w"}


def test_worker_pads_to_the_smallest_compiled_batch():
    buckets = {1: Recorder(), 2: Recorder(), 4: Recorder()}
    worker = ModelWorker("w", buckets[4], max_batch=4, timeout_s=0.0, buckets=buckets)
    for rows in (1, 3, 2, 4):
        x = np.full((rows, 3), rows, np.float32)
        np.testing.assert_array_equal(worker.submit({"x": x}, rows).result(10)["y"], 2 * x + 1)
    worker.close()
    assert {b: [c.shape[0] for c in r.calls] for b, r in buckets.items()} == {1: [1], 2: [2], 4: [4, 4]}
    np.testing.assert_array_equal(buckets[4].calls[0][3], 0)  # the padding row


def test_worker_without_batching_runs_each_request_alone():
    module = Recorder()
    worker = ModelWorker("w", module)
    xs = [np.full((2, 3), i, np.float32) for i in range(5)]
    results = [f.result(10) for f in [worker.submit({"x": x}) for x in xs]]
    worker.close()
    assert [c.shape for c in module.calls] == [(2, 3)] * 5
    for x, r in zip(xs, results):
        np.testing.assert_array_equal(r["y"], 2 * x + 1)


def test_a_failing_batch_fails_its_requests_only():
    module = Recorder(fail_when=lambda x: bool((x == 7).any()))
    worker = ModelWorker("w", module, max_batch=2, timeout_s=0.0)
    bad = worker.submit({"x": np.full((2, 3), 7, np.float32)}, 2)
    with pytest.raises(RuntimeError, match="model failed"):
        bad.result(10)
    good = worker.submit({"x": np.ones((1, 3), np.float32)}, 1).result(10)
    np.testing.assert_array_equal(good["y"], np.full((1, 3), 3, np.float32))
    queued = [worker.submit({"x": np.ones((1, 3), np.float32)}, 1) for _ in range(5)]
    worker.close()  # what was queued still runs
    assert all(f.done() and f.exception() is None for f in queued)


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    src = two_input_model(d / "m.onnx")
    metrics = Metrics()
    fast = served("b", src, d / "cache", metrics, max_batch=4, timeout_s=0.05)
    slow = served("slow", src, d / "cache", metrics, max_batch=4, timeout_s=1.5)
    server = start([fast, slow], metrics)
    yield server, src
    server.stop()


def test_concurrent_requests_are_batched_and_match_onnxruntime(batched):
    server, src = batched
    meta = json.loads(call(server, "GET", "/v2/models/b")[2])
    assert meta["inputs"][0]["shape"] == [-1, 4] and meta["parameters"] == {"max_batch_size": 4}
    sizes = [1, 2, 3, 1, 1, 2, 4, 1, 3, 2, 1, 1]
    feeds = [inputs(n, seed=i) for i, n in enumerate(sizes)]
    with concurrent.futures.ThreadPoolExecutor(len(sizes)) as pool:
        replies = list(pool.map(lambda f: call(server, "POST", "/v2/models/b/infer", json_infer(f)), feeds))
    for f, (status, headers, body) in zip(feeds, replies):
        assert status == 200, body
        got, want = decode_reply(headers, body), ort_run(src, f)
        for name in ("y", "s"):
            assert got[name].shape == want[name].shape  # the request's own batch size is kept
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
    text = call(server, "GET", "/metrics")[2].decode()

    def value(prefix):
        return float(next(ln for ln in text.splitlines() if ln.startswith(prefix)).rsplit(" ", 1)[1])

    assert value('graphopt_batch_size_sum{model="b"}') == sum(sizes)
    assert value('graphopt_batch_size_count{model="b"}') < len(sizes)


@pytest.mark.parametrize("body, fragment", [
    (json_infer(inputs(5)), "with 1..4 rows"),
    (json_infer({"x": inputs(2)["x"], "k": inputs(3)["k"]}), "different batch sizes [2, 3]"),
    (json_infer({"x": inputs(2)["x"][:, :3], "k": inputs(2)["k"]}), "shape [2, 3], model 'b' takes [-1, 4]"),
])
def test_bad_batches_get_400_then_a_good_one_succeeds(batched, body, fragment):
    server, src = batched
    status, _, reply = call(server, "POST", "/v2/models/b/infer", body)
    assert status == 400 and fragment in json.loads(reply)["error"]
    status, headers, reply = call(server, "POST", "/v2/models/b/infer", json_infer(inputs(3)))
    assert status == 200
    np.testing.assert_allclose(decode_reply(headers, reply)["y"], ort_run(src, inputs(3))["y"], rtol=1e-5, atol=1e-6)


def test_health_metadata_and_refusals_answer_while_a_request_waits(batched):
    server, _ = batched
    pending = concurrent.futures.ThreadPoolExecutor(1).submit(
        call, server, "POST", "/v2/models/slow/infer", json_infer(inputs(1)))
    time.sleep(0.2)
    t0 = time.perf_counter()
    assert call(server, "GET", "/v2/health/ready")[0] == 200
    assert call(server, "GET", "/v2/models/slow")[0] == 200
    took = time.perf_counter() - t0
    assert not pending.done() and took < 0.5
    depth = call(server, "GET", "/metrics")[2].decode()
    assert 'graphopt_queue_depth{model="slow"} 1.0' in depth  # waiting for its batch to fill
    bad = call(server, "POST", "/v2/models/slow/infer", b'{"inputs": [')  # refused without touching it
    assert bad[0] == 400 and not pending.done()
    assert pending.result(10)[0] == 200
