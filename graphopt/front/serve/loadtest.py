"""A bounded load generator for a server speaking the Open Inference Protocol over HTTP.

Loopback only (it is a measuring tool, not a way to flood someone else's server), at most
``MAX_CONCURRENCY`` clients, ``MAX_DURATION_S`` seconds and ``max_requests`` requests. Each client is
a thread with one keep-alive connection sending the same binary-tensor request (random inputs of the
model's shapes, from its metadata) back to back; latency is measured per request, send to last byte.
Standard library and numpy only: it runs without the ``serve`` extra.
"""

from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import json
import socket
import threading
import time
import urllib.parse

import numpy as np

from graphopt.core.errors import UsageError
from graphopt.front.serve.protocol import HEADER_LENGTH, V2_TO_NP

MAX_CONCURRENCY = 256
MAX_DURATION_S = 600.0


@dataclasses.dataclass
class LoadResult:
    requests: int
    seconds: float
    latencies_s: list[float]
    errors: dict[str, int]

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1e3) if self.latencies_s else float("nan")

    def report(self) -> dict:
        return {"requests": self.requests, "ok": self.ok, "errors": dict(self.errors),
                "seconds": round(self.seconds, 3), "throughput_per_s": round(self.throughput, 2),
                **{f"p{q}_ms": round(self.percentile_ms(q), 3) for q in (50, 90, 99)}}


def loopback_address(url: str) -> tuple[str, int]:
    """(host, port) of an ``http://`` URL whose host resolves to loopback addresses only."""
    u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    if u.scheme != "http" or not u.hostname:
        raise UsageError(f"URL {url!r}: expected http://HOST:PORT")
    try:
        port = u.port or 80
        addresses = {a[4][0] for a in socket.getaddrinfo(u.hostname, port, type=socket.SOCK_STREAM)}
    except (ValueError, OSError) as e:
        raise UsageError(f"URL {url!r}: {e}") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise UsageError(f"URL {url!r}: loadtest runs against loopback addresses only, {u.hostname} is "
                         f"{', '.join(sorted(addresses))}")
    return u.hostname, port


def _request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None, headers: dict):
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    return resp.status, resp.read(), resp


def build_request(metadata: dict, batch: int, seed: int = 0) -> tuple[bytes, int]:
    """A binary-tensor infer request with random inputs for the model's shapes (-1 dims: ``batch``)."""
    rng = np.random.default_rng(seed)
    inputs, blobs = [], []
    for t in metadata["inputs"]:
        shape = [batch if d < 0 else d for d in t["shape"]]
        dtype = V2_TO_NP.get(t["datatype"])
        if dtype is None:
            raise UsageError(f"input '{t['name']}': datatype {t['datatype']} is not supported by loadtest")
        if dtype.kind == "f":
            a = rng.standard_normal(shape).astype(dtype)
        else:
            a = rng.integers(0, 2, shape).astype(dtype)
        raw = a.tobytes()
        inputs.append({"name": t["name"], "shape": shape, "datatype": t["datatype"],
                       "parameters": {"binary_data_size": len(raw)}})
        blobs.append(raw)
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    return header + b"".join(blobs), len(header)


def run_load(url: str, model: str, *, concurrency: int = 1, duration_s: float = 10.0,
             max_requests: int = 1_000_000, batch: int = 1, api_key: str | None = None,
             timeout_s: float = 30.0) -> LoadResult:
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise UsageError(f"--concurrency must be 1..{MAX_CONCURRENCY}, got {concurrency}")
    if not 0 < duration_s <= MAX_DURATION_S:
        raise UsageError(f"--duration must be > 0 and <= {MAX_DURATION_S:g} s, got {duration_s:g}")
    if max_requests < 1 or batch < 1:
        raise UsageError("--requests and --batch must be >= 1")
    host, port = loopback_address(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    path = f"/v2/models/{urllib.parse.quote(model, safe='')}"
    try:
        conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
        status, data, _ = _request(conn, "GET", path, None, headers)
        conn.close()
    except OSError as e:
        raise UsageError(f"{url}: cannot reach the server ({e})") from None
    if status != 200:
        raise UsageError(f"{url}: model '{model}': {status} {data[:200].decode(errors='replace')}")
    body, header_length = build_request(json.loads(data), batch)
    infer_headers = {**headers, "Content-Type": "application/octet-stream", HEADER_LENGTH: str(header_length)}

    lock, latencies, errors = threading.Lock(), [], {}
    counter = iter(range(max_requests))
    start = time.perf_counter()
    deadline = start + duration_s

    def client() -> None:
        c = http.client.HTTPConnection(host, port, timeout=timeout_s)
        mine, failed = [], {}
        while time.perf_counter() < deadline:
            with lock:
                if next(counter, None) is None:
                    break
            t0 = time.perf_counter()
            try:
                status, _, resp = _request(c, "POST", path + "/infer", body, infer_headers)
                if resp.will_close:
                    c.close()
            except (OSError, http.client.HTTPException) as e:
                status = type(e).__name__
                c.close()
            if status == 200:
                mine.append(time.perf_counter() - t0)
            else:
                failed[str(status)] = failed.get(str(status), 0) + 1
        c.close()
        with lock:
            latencies.extend(mine)
            for k, v in failed.items():
                errors[k] = errors.get(k, 0) + v

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return LoadResult(len(latencies) + sum(errors.values()), seconds, latencies, errors)
