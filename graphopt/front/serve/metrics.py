"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Requests by model, protocol and status; latency per model; rows per batch run; queue depth."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("graphopt_inference_requests", "Inference requests answered",
                                ["model", "protocol", "status"], registry=r)
        self.latency = Histogram("graphopt_inference_latency_seconds", "Inference request latency, received to answered",
                                 ["model", "protocol"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("graphopt_batch_size", "Rows run together in one model call",
                               ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.queue = Gauge("graphopt_queue_depth", "Requests waiting for their model's worker", ["model"], registry=r)

    def model_hooks(self, model: str) -> dict:
        batch, queue = self.batch.labels(model), self.queue.labels(model)
        return {"on_batch": batch.observe, "on_queue": queue.inc}

    def observe(self, model: str, protocol: str, status: int, seconds: float | None) -> None:
        """One answered request; ``model`` is '' when the request named no served model."""
        self.requests.labels(model, protocol, str(status)).inc()
        if seconds is not None and model:
            self.latency.labels(model, protocol).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
