"""`GET /metrics` in Prometheus' text format (prometheus-client): queue depth, batch sizes, images, latency and
rejections. Each app has its own registry, so several apps (tests) never share counters.
"""
from __future__ import annotations

import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# Why a request was refused, by status (the body says more).
REASONS = {401: "unauthorized", 403: "cross_origin", 404: "unknown_name", 413: "too_large", 415: "media_type",
           422: "invalid", 429: "queue_full", 500: "server_error", 503: "unavailable", 504: "timeout"}
ENDPOINTS = ("/v1/generate", "/v1/jobs", "/v1/extract", "/v1/models", "/health", "/metrics", "/")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def endpoint(path: str) -> str:
    """A bounded label for a path: the route, `/v1/jobs/{id}`, `/static` or `other`."""
    if path.startswith("/v1/jobs/"):
        return "/v1/jobs/{id}"
    if path.startswith("/static/"):
        return "/static"
    return path if path in ENDPOINTS else "other"


class Metrics:
    """The server's metrics; the worker reports batches and finished jobs, the middleware every response."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, worker: Any = None) -> None:
        self.registry = r = CollectorRegistry()
        self.queue = Gauge("t2iadapter_queue_depth", "generations waiting for a worker", registry=r)
        self.running = Gauge("t2iadapter_running_jobs", "generations running on the workers", registry=r)
        self.workers_up = Gauge("t2iadapter_workers_up", "model workers taking jobs", registry=r)
        self.batch_jobs = Histogram("t2iadapter_batch_jobs", "requests per UNet batch", registry=r,
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
        self.batch_images = Histogram("t2iadapter_batch_images", "images per UNet batch", registry=r,
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
        self.images = Counter("t2iadapter_images", "images generated (rate() of it is images/s)", registry=r)
        self.jobs = Counter("t2iadapter_jobs", "generation jobs finished, by outcome", ["status"], registry=r)
        self.images_per_second = Gauge("t2iadapter_images_per_second",
                                       "images/s over the last minute (rate(t2iadapter_images_total) in PromQL)",
                                       registry=r)
        self.latency = Histogram("t2iadapter_request_seconds", "HTTP request latency by endpoint and method",
                                 ["endpoint", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("t2iadapter_rejected_requests", "requests refused, by reason", ["reason"], registry=r)
        self._recent: list[tuple[float, int]] = []  # (time, images) of jobs finished in the last minute
        self._lock = threading.Lock()  # workers append, the scrape reads
        if worker is not None:
            self.watch(worker)

    def watch(self, worker: Any) -> None:
        """Read the queue and the workers when scraped."""
        self.queue.set_function(lambda: worker.stats()["waiting"])
        self.running.set_function(lambda: worker.stats()["running"])
        self.workers_up.set_function(lambda: sum(w["status"] == "up" for w in worker.workers()))
        self.images_per_second.set_function(self._rate)

    # the worker's observer
    def batch(self, jobs: int, images: int) -> None:
        self.batch_jobs.observe(jobs)
        self.batch_images.observe(images)

    def finished(self, job: Any) -> None:
        status = job.status
        self.jobs.labels(status).inc()
        if status == "done":
            self.images.inc(job.images)
            with self._lock:
                self._recent.append((time.monotonic(), job.images))
                self._forget()

    def _forget(self, window: float = 60.0) -> None:
        now = time.monotonic()
        self._recent = [(t, n) for t, n in self._recent if now - t <= window]

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._forget()
            if not self._recent:
                return 0.0
            return sum(n for _, n in self._recent) / max(now - self._recent[0][0], 1.0)

    # the middleware's
    def response(self, path: str, method: str, status: int, seconds: float) -> None:
        self.latency.labels(endpoint(path), method).observe(seconds)
        if status in REASONS:
            self.rejected.labels(REASONS[status]).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Times every HTTP response and counts refusals (outermost: it sees the 401/403/413/415 of the guards too)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.monotonic(), [500]

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            self.metrics.response(scope.get("path", ""), scope.get("method", ""), status[0], time.monotonic() - start)
