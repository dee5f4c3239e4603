"""The Open Inference Protocol over HTTP as a Starlette (ASGI) app; inference runs on the models'
worker threads, never on the event loop, so health and metadata answer while a model runs.

Routes: ``GET /v2/health/live|ready``, ``GET /v2``, ``GET /v2/models/NAME[/versions/V][/ready]``,
``POST /v2/models/NAME[/versions/V]/infer``, ``POST /v2/repository/index``, ``GET /metrics``.
Every error is ``{"error": message}`` with a 4xx status (5xx only for a fault of the server).
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from graphopt.core.errors import GraphoptError
from graphopt.front.serve.protocol import HEADER_LENGTH, ProtocolError, decode_request, encode_response, error_body
from graphopt.front.serve.repository import Repository

OPEN_PATHS = ("/v2/health/",)


def json_response(obj, status: int = 200) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")), status, media_type="application/json")


def error_response(status: int, message: str) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return Response(error_body(message), status, headers=headers, media_type="application/json")


class BearerAuth:
    """ASGI middleware: with an API key, every path but the health routes needs ``Authorization: Bearer KEY``."""

    def __init__(self, app, repo: Repository) -> None:
        self.app, self.repo = app, repo

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not scope["path"].startswith(OPEN_PATHS):
            auth = dict(scope["headers"]).get(b"authorization")
            if not self.repo.authorized(auth):
                if scope["path"].endswith("/infer"):
                    self.repo.metrics.observe("", "http", 401, None)
                reply = error_response(401, "missing or wrong API key (send 'Authorization: Bearer KEY')")
                return await reply(scope, receive, send)
        return await self.app(scope, receive, send)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (before reading when the length is declared)."""
    over = f"over the limit of {limit} bytes (--max-body-mb)"
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(413, f"request body of {declared} bytes is {over}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(413, f"request body is {over}")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("gzip", "deflate"):
        d = zlib.decompressobj(31 if encoding == "gzip" else 15)
        try:
            body = d.decompress(body, limit + 1)
        except zlib.error as e:
            raise ProtocolError(400, f"request body is not valid {encoding} data ({e})") from None
        if len(body) > limit or d.unconsumed_tail:
            raise ProtocolError(413, f"decompressed request body is {over}")
        if not d.eof:
            raise ProtocolError(400, f"request body: {encoding} data is truncated")
    elif encoding != "identity":
        raise ProtocolError(415, f"Content-Encoding {encoding!r} is not supported (gzip, deflate or none)")
    return body


def make_app(repo: Repository, *, max_body_bytes: int) -> Starlette:
    async def live(request: Request) -> Response:
        return json_response({"live": True})

    async def ready(request: Request) -> Response:
        return json_response({"ready": True})

    async def server_metadata(request: Request) -> Response:
        return json_response(repo.server_metadata())

    async def model_metadata(request: Request) -> Response:
        p = request.path_params
        return json_response(repo.get(p["name"], p.get("version")).metadata())

    async def model_ready(request: Request) -> Response:
        p = request.path_params
        return json_response({"name": repo.get(p["name"], p.get("version")).name, "ready": True})

    async def repository_index(request: Request) -> Response:
        return json_response(repo.index())

    async def metrics(request: Request) -> Response:
        return Response(repo.metrics.render(), media_type=repo.metrics.content_type)

    async def infer(request: Request) -> Response:
        start, name, status = time.perf_counter(), "", 200
        try:
            model = repo.get(request.path_params["name"], request.path_params.get("version"))
            name = model.name
            body = await read_body(request, max_body_bytes)
            req = decode_request(body, request.headers.get(HEADER_LENGTH))
            arrays, rows = model.prepare(req)
            wanted = model.select_outputs(None if req.outputs is None else [n for n, _ in req.outputs])
            binary = dict(req.outputs) if req.outputs is not None else dict.fromkeys(wanted, req.binary_output)
            future = model.worker.submit(arrays, rows)
            try:
                out = await asyncio.wait_for(asyncio.wrap_future(future), repo.request_timeout_s)
            except asyncio.TimeoutError:
                raise ProtocolError(503, f"model '{name}' did not answer within {repo.request_timeout_s:g} s "
                                         "(server overloaded)") from None
            payload, header_length = encode_response(name, model.version, req.id,
                                                     [(n, out[n], binary[n]) for n in wanted])
            if header_length is None:
                return Response(payload, media_type="application/json")
            return Response(payload, media_type="application/octet-stream",
                            headers={HEADER_LENGTH: str(header_length)})
        except ProtocolError as e:
            status = e.status
            return error_response(e.status, str(e))
        except GraphoptError as e:
            status = 400
            return error_response(400, str(e))
        except Exception as e:  # a fault of the server: answered, counted, never crashing it
            status = 500
            return error_response(500, f"internal error: {type(e).__name__}: {e}")
        finally:
            repo.metrics.observe(name, "http", status, time.perf_counter() - start if status == 200 else None)

    async def protocol_error(request: Request, exc: Exception) -> Response:
        return error_response(exc.status, str(exc))

    async def http_error(request: Request, exc: HTTPException) -> Response:
        what = "no route" if exc.status_code == 404 else exc.detail
        return error_response(exc.status_code, f"{what}: {request.method} {request.url.path}")

    model_paths = ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")
    routes = [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        *(Route(p, model_metadata, methods=["GET"]) for p in model_paths),
        *(Route(p + "/ready", model_ready, methods=["GET"]) for p in model_paths),
        *(Route(p + "/infer", infer, methods=["POST"]) for p in model_paths),
    ]
    app = Starlette(routes=routes, exception_handlers={ProtocolError: protocol_error, HTTPException: http_error})
    return BearerAuth(app, repo)
