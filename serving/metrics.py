"""The server's Prometheus metrics, in a registry of its own (one per app)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the /metrics route)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("zoo_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("zoo_request_latency_seconds", "Time from request to last byte", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("zoo_time_to_first_token_seconds", "Time from request to first generated token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("zoo_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.prompt_tokens = Counter("zoo_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.queue_depth = Gauge("zoo_queue_depth", "Requests waiting for a slot", ["model"], registry=r)
        self.busy_slots = Gauge("zoo_busy_slots", "Generation slots in use", ["model"], registry=r)
        self.occupancy = Histogram("zoo_batch_occupancy", "Fraction of slots busy per decode step", ["model"],
                                   buckets=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0), registry=r)
        self.images = Histogram("zoo_classify_batch_images", "Images per classification micro-batch", ["model"],
                                buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.cancelled = Counter("zoo_cancelled_requests", "Requests cancelled (client gone or timed out)", ["model"],
                                 registry=r)

    def step(self, model: str, busy: int, rows: int, waiting: int) -> None:
        self.busy_slots.labels(model).set(busy)
        self.queue_depth.labels(model).set(waiting)
        if busy:
            self.occupancy.labels(model).observe(busy / rows)

    def classify_batch(self, model: str, images: int) -> None:
        self.images.labels(model).observe(images)

    def render(self) -> bytes:
        return generate_latest(self.registry)
