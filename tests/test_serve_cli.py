"""`graphopt serve` and `graphopt loadtest` as commands: ONNX compiled at start-up into the cache (the
second start loads it), SIGTERM drains requests in flight, usage errors exit 2, the lean install names
the extra to install."""

from __future__ import annotations

import concurrent.futures
import functools
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graphopt.front.cli import main as _main
from graphopt.front.serve.cache import cache_key, compiled_buckets, compiled_bundle
from graphopt.front.serve.metrics import Metrics
from tests.test_serve_support import call, inputs, json_infer, served, start, two_input_model


def main(argv) -> int:
    """graphopt's exit code (argparse's usage errors included)."""
    try:
        return _main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


class Serving:
    """A `graphopt serve` subprocess; its URL from the line it prints once it listens."""

    def __init__(self, *args):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "graphopt.front.cli", "serve", *map(str, args), "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/v2", line)
        if not m:
            self.proc.kill()
            raise AssertionError(f"no serving line: {line!r} {self.proc.stderr.read()}")
        self.port = int(m.group(1))

    def post(self, path, body):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        c.request("POST", path, body=json.dumps(body).encode())
        r = c.getresponse()
        return r.status, r.read()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        return code, self.proc.stderr.read()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The model, and a cache already holding its [2, ...] and batch-4 builds (what later starts load)."""
    d = tmp_path_factory.mktemp("cli")
    src, cache = two_input_model(d / "m.onnx"), d / "cache"
    compiled_bundle(src, input_shapes=["x:2,4", "k:2,1"], cache_dir=cache, log=lambda s: None)
    compiled_buckets(src, max_batch=4, cache_dir=cache, log=lambda s: None)
    return src, cache


def test_onnx_is_compiled_once_then_loaded_from_the_cache(model):
    src, cache = model
    before = set(cache.iterdir())
    for expect in ("compiling for x86", "from the cache"):
        s = Serving(src, "--input-shape", "x:3,4", "--input-shape", "k:3,1", "--cache-dir", cache)
        status, body = s.post("/v2/models/m/infer", json_infer(inputs(3)))
        assert status == 200, body
        code, err = s.stop()
        assert code == 0 and expect in err
    assert len(set(cache.iterdir()) - before) == 1
    key = functools.partial(cache_key, Path(src), target="x86", input_shapes=["x:3,4"], max_batch=0)
    assert len({key(opt_level=2), key(opt_level=1), key(opt_level=2, target="aarch64"),
                key(opt_level=2, max_batch=4), key(opt_level=2, input_shapes=["x:5,4"])}) == 5


def test_a_bundle_is_served_as_it_is_with_its_digest_pinned(model):
    from graphopt.backends.bundle import bundle_digest

    src, cache = model
    bundle = compiled_bundle(src, input_shapes=["x:2,4", "k:2,1"], cache_dir=cache, log=lambda s: None).directory
    s = Serving(bundle, "--name", "b", "--expect-digest", bundle_digest(bundle), "--grpc-port", "0")
    status, body = s.post("/v2/models/b/infer", json_infer(inputs(2)))
    code, err = s.stop()
    assert status == 200 and code == 0 and "compiling" not in err, body


def test_sigterm_drains_requests_in_flight(model):
    src, cache = model
    s = Serving(src, "--cache-dir", cache, "--max-batch", "4", "--batch-timeout-ms", "1500")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(s.post, "/v2/models/m/infer", json_infer(inputs(3)))
        time.sleep(0.4)  # the request waits for its batch to fill
        s.proc.send_signal(signal.SIGTERM)
        status, body = pending.result(30)
    assert status == 200 and [o["shape"] for o in json.loads(body)["outputs"]] == [[3, 3], [3, 4]]
    assert s.proc.wait(30) == 0
    with pytest.raises(OSError):
        s.post("/v2/health/live", {})


@pytest.mark.parametrize("extra, fragment", [
    (["--max-batch", "0"], "--max-batch must be > 0"),
    (["--max-body-mb", "nan"], "--max-body-mb must be > 0"),
    (["--expect-digest", "sha256:" + "0" * 64], "is not a bundle directory"),
    (["--cache-dir", "/proc/forbidden"], "--cache-dir /proc/forbidden"),
])
def test_usage_errors_exit_2(model, capsys, extra, fragment):
    src, _ = model
    assert main(["serve", src, *extra]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1


def test_missing_extra_names_the_install(model, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["serve", model[0]]) == 2
    assert "pip install 'graphopt[serve]'" in capsys.readouterr().err


def test_bundle_without_batch_axis_refuses_max_batch(model, capsys):
    src, cache = model
    bundle = compiled_bundle(src, input_shapes=["x:2,4", "k:2,1"], cache_dir=cache, log=lambda s: None).directory
    assert main(["serve", bundle, "--max-batch", "4"]) == 2
    assert "input 'x' has shape [2, 4], --max-batch 4 needs axis 0" in capsys.readouterr().err


def test_loadtest_reports_throughput_and_percentiles(model, capsys):
    src, cache = model
    metrics = Metrics()
    server = start([served("m", src, cache, metrics)], metrics)
    try:
        url = f"http://127.0.0.1:{server.port}"
        assert main(["loadtest", url, "--model", "m", "--concurrency", "4", "--duration", "1", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["errors"] == {} and report["ok"] == report["requests"] > 0
        assert 0 < report["p50_ms"] <= report["p90_ms"] <= report["p99_ms"]
        text = call(server, "GET", "/metrics")[2].decode()
        assert f'graphopt_inference_requests_total{{model="m",protocol="http",status="200"}} {report["ok"]}.0' in text
        assert main(["loadtest", url, "--model", "m", "--requests", "5", "--concurrency", "2"]) == 0
        assert "5 requests, 5 ok, errors none" in capsys.readouterr().out
        for argv, fragment in [
            ([url, "--model", "nope"], "404"),
            (["http://192.0.2.1:80", "--model", "m"], "loopback addresses only"),
            ([url, "--model", "m", "--concurrency", "1000"], "--concurrency must be 1..256"),
            ([url, "--model", "m", "--duration", "3600"], "--duration must be"),
        ]:
            assert main(["loadtest", *argv]) == 2
            assert fragment in capsys.readouterr().err
    finally:
        server.stop()
