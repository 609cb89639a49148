"""Prometheus metrics of one app: requests by route and status, latency, the model served."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ServiceMetrics"]

# milliseconds matter here: the target is a p99 under 20 ms
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServiceMetrics:
    """A registry of its own (two apps in one process do not share counts) and an ASGI wrapper."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "recscale_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "recscale_request_seconds",
            "Time from request to the end of the response, by route template",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.model = Gauge(
            "recscale_model_info",
            "The model being served (value 1), by version, model name and index",
            ["version", "model", "index"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "recscale_model_reloads",
            "Model reloads, by result",
            ["result"],
            registry=self.registry,
        )

    def serving(self, version: str, model: str, index: str) -> None:
        self.model.clear()
        self.model.labels(version, model, index).set(1)

    def middleware(self, app: Any) -> Any:
        """``app`` wrapped so that every HTTP request is counted and timed (a pure ASGI layer)."""
        requests, latency = self.requests, self.latency

        async def measured(scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            start = time.perf_counter()
            status = 500

            async def send_status(message: dict) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await app(scope, receive, send_status)
            finally:
                route = scope.get("route")
                # the template, not the path: one series per route, not per user id
                name = getattr(route, "path", None) or "unmatched"
                requests.labels(name, scope["method"], str(status)).inc()
                latency.labels(name).observe(time.perf_counter() - start)

        return measured
