"""Serving compiled bundles over the KServe v2 (Open Inference Protocol) REST API."""

from graphopt.serve.server import ModelEndpoint, RequestError, make_server

__all__ = ["ModelEndpoint", "RequestError", "make_server"]
