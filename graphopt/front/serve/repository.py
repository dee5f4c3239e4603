"""What the HTTP and gRPC front ends share: the served models, the API key, metrics, time limits."""

from __future__ import annotations

import hmac

import graphopt
from graphopt.front.serve.metrics import Metrics
from graphopt.front.serve.model import ServedModel
from graphopt.front.serve.protocol import ProtocolError

EXTENSIONS = ["binary_tensor_data", "model_repository"]


class Repository:
    """The served models by name. ``api_key``: required as ``Authorization: Bearer KEY`` everywhere
    except the health routes. ``request_timeout_s``: longest wait for a model's answer (queue included)."""

    def __init__(self, models: list[ServedModel], *, metrics: Metrics, api_key: str | None = None,
                 request_timeout_s: float = 60.0) -> None:
        self.models = {m.name: m for m in models}
        self.metrics, self.request_timeout_s = metrics, request_timeout_s
        self._key = ("Bearer " + api_key).encode() if api_key else None

    def get(self, name: str, version: str | None = None) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise ProtocolError(404, f"no model named '{name}' (serving: {', '.join(self.models)})")
        model.check_version(version)
        return model

    def authorized(self, header: bytes | str | None) -> bool:
        if self._key is None:
            return True
        if isinstance(header, str):
            header = header.encode("latin-1", "replace")
        return hmac.compare_digest(header or b"", self._key)

    def server_metadata(self) -> dict:
        return {"name": "graphopt", "version": graphopt.__version__, "extensions": EXTENSIONS}

    def index(self) -> list[dict]:
        return [{"name": m.name, "version": m.version, "state": "READY"} for m in self.models.values()]

    def close(self) -> None:
        for m in self.models.values():
            m.close()
