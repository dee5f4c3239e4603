"""A KServe v2 (Open Inference Protocol) HTTP/REST server for compiled bundles.

Endpoints: ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2``,
``GET /v2/models/{name}``, ``GET /v2/models/{name}/ready``, ``POST /v2/models/{name}/infer``
(JSON tensors: ``{"inputs": [{"name", "shape", "datatype", "data"}], "outputs": [{"name"}]}``).
Requests are served by a thread pool; inference calls are serialized per model because the TVM
VM is not re-entrant, and each call already uses every core it was given.
"""

from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

import graphopt

# KServe v2 datatypes <-> numpy dtypes
V2_TO_NP = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}
NP_TO_V2 = {v: k for k, v in V2_TO_NP.items()}
MAX_BODY_BYTES = 256 << 20


class RequestError(Exception):
    """A bad request: answered with HTTP 400 and ``{"error": message}``."""


class ModelEndpoint:
    """One served model: its metadata and a lock around its VM."""

    def __init__(self, name: str, module, version: str = "1") -> None:
        self.name, self.module, self.version = name, module, version
        self.lock = threading.Lock()

    def metadata(self) -> dict:
        def tensors(specs):
            return [{"name": n, "datatype": NP_TO_V2.get(str(d), str(d)), "shape": list(s)} for n, s, d in specs]

        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "graphopt_tvm",
            "inputs": tensors(self.module.inputs),
            "outputs": tensors(self.module.outputs),
        }

    def infer(self, request: dict) -> dict:
        if not isinstance(request.get("inputs"), list):
            raise RequestError("request needs an 'inputs' list")
        specs = {n: (tuple(s), d) for n, s, d in self.module.inputs}
        arrays = {}
        for item in request["inputs"]:
            name = item.get("name")
            if name not in specs:
                raise RequestError(f"unknown input {name!r} (model inputs: {', '.join(specs)})")
            dtype = V2_TO_NP.get(item.get("datatype", ""))
            if dtype is None:
                raise RequestError(f"input {name!r}: unsupported datatype {item.get('datatype')!r}")
            try:
                arr = np.asarray(item.get("data"), dtype=dtype).reshape(item.get("shape"))
            except (ValueError, TypeError) as e:
                raise RequestError(f"input {name!r}: data does not fit shape {item.get('shape')}: {e}") from None
            arrays[name] = arr
        missing = [n for n in specs if n not in arrays]
        if missing:
            raise RequestError(f"missing inputs: {', '.join(missing)}")
        try:
            with self.lock:
                outputs = self.module(**arrays)
        except graphopt.GraphoptError as e:
            raise RequestError(str(e)) from None
        wanted = [o.get("name") for o in request.get("outputs") or []] or list(outputs)
        unknown = [w for w in wanted if w not in outputs]
        if unknown:
            raise RequestError(f"unknown outputs requested: {', '.join(map(str, unknown))}")
        return {
            "model_name": self.name,
            "model_version": self.version,
            "id": request.get("id", ""),
            "outputs": [
                {
                    "name": n,
                    "datatype": NP_TO_V2.get(str(outputs[n].dtype), str(outputs[n].dtype)),
                    "shape": list(outputs[n].shape),
                    "data": outputs[n].ravel().tolist(),
                }
                for n in wanted
            ],
        }


def make_handler(models: dict[str, ModelEndpoint]):
    class Handler(BaseHTTPRequestHandler):
        server_version = f"graphopt/{graphopt.__version__}"
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet by default; errors still answered as JSON
            pass

        def _send(self, status: int, body: dict | None = None) -> None:
            data = json.dumps(body if body is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _model(self, parts: list[str]) -> ModelEndpoint | None:
            m = models.get(parts[2]) if len(parts) > 2 else None
            if m is None:
                self._send(HTTPStatus.NOT_FOUND, {"error": f"no model named {parts[2] if len(parts) > 2 else ''!r}"})
            return m

        def do_GET(self) -> None:  # noqa: N802
            parts = [p for p in self.path.split("?")[0].split("/") if p]
            if parts in (["v2", "health", "live"], ["v2", "health", "ready"]):
                return self._send(HTTPStatus.OK, {"live": True} if parts[2] == "live" else {"ready": True})
            if parts == ["v2"]:
                return self._send(HTTPStatus.OK, {"name": "graphopt", "version": graphopt.__version__, "extensions": []})
            if len(parts) >= 3 and parts[:2] == ["v2", "models"]:
                m = self._model(parts)
                if m is None:
                    return None
                if parts[3:] == ["ready"]:
                    return self._send(HTTPStatus.OK, {"name": m.name, "ready": True})
                if not parts[3:]:
                    return self._send(HTTPStatus.OK, m.metadata())
            return self._send(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            parts = [p for p in self.path.split("?")[0].split("/") if p]
            if not (len(parts) == 4 and parts[:2] == ["v2", "models"] and parts[3] == "infer"):
                return self._send(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})
            m = self._model(parts)
            if m is None:
                return None
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_BODY_BYTES:
                return self._send(HTTPStatus.BAD_REQUEST, {"error": f"body length {length} out of range"})
            try:
                request = json.loads(self.rfile.read(length))
                return self._send(HTTPStatus.OK, m.infer(request))
            except json.JSONDecodeError as e:
                return self._send(HTTPStatus.BAD_REQUEST, {"error": f"body is not JSON: {e}"})
            except RequestError as e:
                return self._send(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            except Exception as e:  # a bug: answer 500, keep serving
                return self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"})

    return Handler


def make_server(models: dict[str, ModelEndpoint], host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(models))
    server.daemon_threads = True
    return server
