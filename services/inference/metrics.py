"""The inference service's own Prometheus metrics (beside the chassis' gRPC metrics)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

WorkerCounts = Mapping[tuple[str, str], int]


class _WorkerStates(Collector):
    """``inference_workers``, counted when scraped: no cost per state change (two per inference)."""

    def __init__(self) -> None:
        self.source: Callable[[], WorkerCounts] = dict

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("inference_workers", "Workers by model and state.", labels=["model", "state"])
        for (model, state), count in sorted(self.source().items()):
            family.add_metric([model, state], count)
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("inference_workers", "Workers by model and state.", labels=["model", "state"])


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class InferenceMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            "inference_requests_total",
            "Inference requests by model, version and outcome (ok, invalid, timeout, unavailable, error, rejected, cancelled).",
            ["model", "version", "outcome"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "inference_request_seconds",
            "Time from dispatch to answer of one inference, queueing included.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "inference_queue_depth", "Requests waiting for a free worker.", ["model"], registry=registry
        )
        self.workers = _WorkerStates()  # its source is set by the model manager
        registry.register(self.workers)
        self.restarts = Counter(
            "inference_worker_restarts_total",
            "Workers replaced, by reason (crashed, unresponsive, timeout, cancelled, admin, load_failed).",
            ["model", "reason"],
            registry=registry,
        )
        self.scaling = Counter(
            "inference_scaling_events_total",
            "Worker pool size changes by the autoscaler, by direction (up, down).",
            ["model", "direction"],
            registry=registry,
        )
        self.reloads = Counter(
            "inference_model_reloads_total",
            "Model (re)loads by outcome (ok, failed).",
            ["model", "outcome"],
            registry=registry,
        )
        self.abandoned = Counter(
            "inference_abandoned_total",
            "Inferences whose caller gave up (deadline or cancellation) while a worker ran them, by what became of"
            " the worker (finished: it answered within the grace and serves on; killed: it did not).",
            ["model", "outcome"],
            registry=registry,
        )
        self.batch_rows = Histogram(
            "inference_batch_rows",
            "Rows per worker call that carried more than one request (dynamic batching).",
            ["model"],
            buckets=(2, 4, 8, 16, 32, 64, 128, 256),
            registry=registry,
        )
        self.timeouts = Counter(
            "inference_timeouts_total", "Inferences that ran past their deadline.", ["model"], registry=registry
        )
