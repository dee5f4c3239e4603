"""The KServe v2 ``GRPCInferenceService`` on a grpcio server, sharing the HTTP side's models and workers.

Tensors come in as ``raw_input_contents`` (what tritonclient sends) or typed ``contents``; outputs go
back as ``raw_output_contents``. Errors carry the HTTP side's message with the matching gRPC code.
"""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import numpy as np

from graphopt.core.errors import GraphoptError
from graphopt.front.serve.grpc_proto import METHODS, SERVICE, message
from graphopt.front.serve.protocol import (
    InferInput,
    InferRequest,
    ProtocolError,
    bad,
    check_shape,
    from_bytes,
    from_list,
    numpy_dtype,
    v2_datatype,
)
from graphopt.front.serve.repository import Repository

CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
         503: grpc.StatusCode.UNAVAILABLE}
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents"}
OPEN_METHODS = ("ServerLive", "ServerReady")


def decode_infer(req) -> InferRequest:
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise bad(f"request: {len(raw)} raw_input_contents for {len(req.inputs)} inputs")
    if not req.inputs:
        raise bad("request: 'inputs' must be a non-empty list of tensors")
    inputs, seen = [], set()
    for i, t in enumerate(req.inputs):
        where = f"input '{t.name}'"
        if t.name in seen:
            raise bad(f"{where} is given twice")
        seen.add(t.name)
        dtype = numpy_dtype(t.datatype, where)
        shape = check_shape(list(t.shape), where)
        if raw:
            arr = from_bytes(raw[i], dtype, shape, where)
        elif t.datatype in CONTENTS:
            field = CONTENTS[t.datatype]
            arr = from_list(list(getattr(t.contents, field)), dtype, shape, where, f"contents.{field}")
        else:
            raise bad(f"{where}: {t.datatype} tensors must be sent in raw_input_contents")
        inputs.append(InferInput(t.name, t.datatype, arr))
    for key in ("classification",):
        if any(key in o.parameters for o in req.outputs):
            raise bad(f"the {key} extension is not supported")
    outputs = [(o.name, True) for o in req.outputs] or None
    return InferRequest(req.id, inputs, outputs, True)


class InferenceService:
    """One method per rpc; each takes the raw request bytes (a malformed message is INVALID_ARGUMENT)."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo

    def _call(self, rpc: str, fn):
        request_type = message(METHODS[rpc][0])

        def handler(data: bytes, context: grpc.ServicerContext):
            start, status, model = time.perf_counter(), 200, [""]
            try:
                if rpc not in OPEN_METHODS:
                    auth = dict(context.invocation_metadata()).get("authorization")
                    if not self.repo.authorized(auth):
                        raise ProtocolError(401, "missing or wrong API key (send 'authorization: Bearer KEY')")
                try:
                    req = request_type.FromString(data)
                except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
                    raise bad(f"request is not a valid {request_type.DESCRIPTOR.name} message ({e})") from None
                return fn(req, model)
            except ProtocolError as e:
                status = e.status
                context.abort(CODES.get(e.status, grpc.StatusCode.INVALID_ARGUMENT), str(e))
            except GraphoptError as e:
                status = 400
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            finally:
                if rpc == "ModelInfer":
                    took = time.perf_counter() - start if status == 200 else None
                    self.repo.metrics.observe(model[0], "grpc", status, took)

        return handler

    def ServerLive(self, req, model):  # noqa: N802 - rpc names
        return message("ServerLiveResponse")(live=True)

    def ServerReady(self, req, model):  # noqa: N802
        return message("ServerReadyResponse")(ready=True)

    def ModelReady(self, req, model):  # noqa: N802
        self.repo.get(req.name, req.version)
        return message("ModelReadyResponse")(ready=True)

    def ServerMetadata(self, req, model):  # noqa: N802
        return message("ServerMetadataResponse")(**self.repo.server_metadata())

    def ModelMetadata(self, req, model):  # noqa: N802
        meta = self.repo.get(req.name, req.version).metadata()
        meta.pop("parameters", None)
        return message("ModelMetadataResponse")(**meta)

    def RepositoryIndex(self, req, model):  # noqa: N802
        return message("RepositoryIndexResponse")(models=self.repo.index())

    def ModelInfer(self, req, model):  # noqa: N802
        served = self.repo.get(req.model_name, req.model_version)
        model[0] = served.name
        decoded = decode_infer(req)
        arrays, rows = served.prepare(decoded)
        wanted = served.select_outputs(None if decoded.outputs is None else [n for n, _ in decoded.outputs])
        try:
            out = served.worker.submit(arrays, rows).result(self.repo.request_timeout_s)
        except concurrent.futures.TimeoutError:
            raise ProtocolError(503, f"model '{served.name}' did not answer within "
                                     f"{self.repo.request_timeout_s:g} s (server overloaded)") from None
        resp = message("ModelInferResponse")(model_name=served.name, model_version=served.version, id=req.id)
        for n in wanted:
            a = out[n]
            resp.outputs.add(name=n, datatype=v2_datatype(a.dtype.name), shape=list(a.shape))
            resp.raw_output_contents.append(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes())
        return resp

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {rpc: grpc.unary_unary_rpc_method_handler(
            self._call(rpc, getattr(self, rpc)), response_serializer=lambda m: m.SerializeToString())
            for rpc in METHODS}
        return grpc.method_handlers_generic_handler(SERVICE, methods)


def make_grpc_server(repo: Repository, address: str, *, max_message_bytes: int, workers: int = 64):
    """A started-later grpcio server bound to ``address``; OSError when it cannot listen there."""
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="graphopt-grpc"),
        handlers=[InferenceService(repo).handler()],
        options=[("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)],
    )
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(str(e)) from None
    if not port:
        raise OSError(f"cannot listen on {address}")
    return server, port
