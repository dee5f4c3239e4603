"""A served model: its metadata, the checks a request must pass, and its worker thread."""

from __future__ import annotations

import numpy as np

from graphopt.core.errors import UsageError
from graphopt.front.serve.batching import ModelWorker
from graphopt.front.serve.protocol import InferRequest, ProtocolError, bad, v2_datatype


class ServedModel:
    """``module`` is a loaded bundle (``inputs``/``outputs`` as ``[(name, shape, dtype)]``, callable by name).

    With ``max_batch`` > 0, axis 0 of every input and output is the batch: the module must have been
    compiled for exactly ``max_batch`` rows, and a request may send 1..max_batch rows; ``buckets``
    (rows -> module) adds builds for smaller batches, so a small batch is not padded to the largest.
    """

    platform = "graphopt_tvm"

    def __init__(self, name: str, module, *, version: str = "1", max_batch: int = 0,
                 batch_timeout_s: float = 0.0, metrics=None, buckets: dict | None = None) -> None:
        self.name, self.module, self.version, self.max_batch = name, module, version, max_batch
        self.inputs = [(n, tuple(s), str(d)) for n, s, d in module.inputs]
        self.outputs = [(n, None if s is None else tuple(s), str(d)) for n, s, d in module.outputs]
        self.buckets = {**(buckets or {}), max_batch: module} if max_batch else {}
        for size, m in self.buckets.items():
            self._check_batch_dims(m, size)
        hooks = metrics.model_hooks(name) if metrics is not None else {}
        self.worker = ModelWorker(name, module, max_batch=max_batch, timeout_s=batch_timeout_s,
                                  buckets=self.buckets, **hooks)

    def _check_batch_dims(self, module, size: int) -> None:
        for kind, rows in (("input", module.inputs), ("output", module.outputs)):
            for n, s, _ in rows:
                if not s or s[0] != size or tuple(s[1:]) != self._rest(kind, n):
                    raise UsageError(
                        f"model '{self.name}': {kind} '{n}' has shape {list(s) if s else s}, --max-batch "
                        f"{self.max_batch} needs axis 0 of every input and output to be {size} "
                        "(serve the .onnx model, or compile the bundle for that batch)")

    def _rest(self, kind: str, name: str) -> tuple | None:
        """The dims after the batch of the largest build's input or output ``name``."""
        rows = self.inputs if kind == "input" else self.outputs
        return next((tuple(s[1:]) if s else () for n, s, _ in rows if n == name), None)

    def _shape_text(self, shape) -> list:
        return [-1, *shape[1:]] if self.max_batch else list(shape)

    def metadata(self) -> dict:
        def rows(items):
            return [{"name": n, "datatype": v2_datatype(d), "shape": self._shape_text(s) if s else []}
                    for n, s, d in items]

        meta = {"name": self.name, "versions": [self.version], "platform": self.platform,
                "inputs": rows(self.inputs), "outputs": rows(self.outputs)}
        if self.max_batch:
            meta["parameters"] = {"max_batch_size": self.max_batch}
        return meta

    def check_version(self, version: str | None) -> None:
        if version and version != self.version:
            raise ProtocolError(404, f"model '{self.name}' has no version '{version}' (versions: {self.version})")

    def prepare(self, request: InferRequest) -> tuple[dict[str, np.ndarray], int]:
        """The request's arrays by input name and its batch rows, checked against the model."""
        specs = {n: (s, d) for n, s, d in self.inputs}
        arrays, rows = {}, 1
        for item in request.inputs:
            if item.name not in specs:
                raise bad(f"model '{self.name}' has no input '{item.name}' (inputs: {', '.join(specs)})")
            shape, dtype = specs[item.name]
            a = item.array
            if a.dtype.name != np.dtype(dtype).name:
                raise bad(f"input '{item.name}': datatype {item.datatype}, model '{self.name}' takes "
                          f"{v2_datatype(dtype)}")
            if self.max_batch:
                ok = a.ndim == len(shape) and 1 <= a.shape[0] <= self.max_batch and a.shape[1:] == shape[1:]
                want = f"{self._shape_text(shape)} with 1..{self.max_batch} rows"
            else:
                ok, want = a.shape == shape, str(list(shape))
            if not ok:
                raise bad(f"input '{item.name}': shape {list(a.shape)}, model '{self.name}' takes {want}")
            arrays[item.name] = a
        missing = [n for n in specs if n not in arrays]
        if missing:
            raise bad(f"model '{self.name}': missing input '{missing[0]}' (inputs: {', '.join(specs)})")
        if self.max_batch:
            counts = {a.shape[0] for a in arrays.values()}
            if len(counts) > 1:
                raise bad(f"model '{self.name}': inputs have different batch sizes {sorted(counts)}")
            rows = counts.pop()
        return arrays, rows

    def select_outputs(self, wanted: list[str] | None) -> list[str]:
        names = [n for n, _, _ in self.outputs]
        if wanted is None:
            return names
        for w in wanted:
            if w not in names:
                raise bad(f"model '{self.name}' has no output '{w}' (outputs: {', '.join(names)})")
        return list(wanted)

    def close(self) -> None:
        self.worker.close()
