"""Serving compiled models over the Open Inference Protocol (KServe v2): HTTP (Starlette on uvicorn)
and gRPC, with dynamic batching and Prometheus metrics. See docs/serving.md.

Modules: ``protocol`` (the HTTP codec and datatypes), ``model`` (a served model's checks), ``batching``
(its worker thread), ``repository`` (what both front ends share), ``app`` (HTTP routes), ``grpc_proto``
and ``grpc_service`` (gRPC), ``metrics``, ``server`` (running it all), ``cache`` (compiling ONNX at
start-up), ``loadtest`` (a bounded load generator). Only ``protocol``, ``cache`` and ``loadtest`` work
without the ``serve`` extra.
"""

from __future__ import annotations

import importlib.util

from graphopt.core.errors import UsageError

EXTRA = {"starlette": "starlette", "uvicorn": "uvicorn", "prometheus_client": "prometheus_client", "grpc": "grpcio",
         "google.protobuf": "protobuf"}


def require_extra() -> None:
    """Refuse with the install line when a package of the ``serve`` extra is missing."""
    missing = []
    for module, package in EXTRA.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(package)
    if missing:
        raise UsageError(f"graphopt serve needs {', '.join(missing)}: pip install 'graphopt[serve]'")
