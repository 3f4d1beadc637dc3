"""The engine's Prometheus metrics (prometheus_client), in a registry of their own so that several engines
(tests, benchmarks) live in one process: requests by finish reason, queue length, running slots, prompt
and generated tokens, time to first token, inter-token latency and request latency histograms, and the
process's XLA compilations (counted from jax.monitoring's compile events). The server's /metrics exposes
`render()`."""

from __future__ import annotations

import jax
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_compiled = [0]  # XLA compilations in this process since the import


def _count_compile(event: str, duration: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _compiled[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compilations() -> int:
    """XLA compilations in this process so far (to show a steady load compiles nothing)."""
    return _compiled[0]


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EngineMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        # a steady load compiles nothing: this stays at its post-warm-up value
        Gauge("jamba_xla_compilations", "XLA compilations in the server process so far",
              registry=r).set_function(compilations)
        self.requests = Counter("jamba_requests", "Requests finished, by finish reason", ["finish_reason"],
                                registry=r)
        self.rejected = Counter("jamba_requests_rejected", "Requests refused because the queue was full",
                                registry=r)
        self.waiting = Gauge("jamba_queue_length", "Requests waiting for a slot", registry=r)
        self.running = Gauge("jamba_running_slots", "Slots holding a request (in prefill or decoding)", registry=r)
        self.prompt_tokens = Counter("jamba_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("jamba_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("jamba_time_to_first_token_seconds", "Arrival to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("jamba_inter_token_latency_seconds", "Time between a request's tokens", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.latency = Histogram("jamba_request_latency_seconds", "Arrival to the last token", registry=r,
                                 buckets=LATENCY_BUCKETS)

    def finished(self, request) -> None:
        self.requests.labels(request.finish_reason).inc()
        if request.time_to_first_token is not None:
            self.ttft.observe(request.time_to_first_token)
            self.latency.observe(request.token_times[-1] - request.arrival)
        for gap in request.inter_token_latencies:
            self.itl.observe(gap)

    def render(self) -> bytes:
        return generate_latest(self.registry)
