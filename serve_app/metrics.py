"""Per-stage Prometheus metrics, recorded by the ingress around every stage call.

Exported by Ray's metrics agent with the `ray_` prefix and Serve's deployment/replica/application
tags, e.g. `ray_lance_stage_requests_in_flight{stage="dit"}`.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

from ray.serve import metrics

_LATENCY_BOUNDS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]


class StageMetrics:
    def __init__(self):
        self.in_flight = metrics.Gauge(
            "lance_stage_requests_in_flight",
            description="Requests sent by this ingress replica to a stage and not finished yet "
                        "(the stage's queue depth plus the requests it is running).",
            tag_keys=("stage",))
        self.prefill_latency = metrics.Histogram(
            "lance_prefill_latency_s",
            description="Thinker time to the context handoff (images) or first token (text).",
            boundaries=_LATENCY_BOUNDS_S, tag_keys=("task",))
        self.denoise_latency = metrics.Histogram(
            "lance_denoise_latency_s",
            description="DiT time from handoff to the decoded PNG.",
            boundaries=_LATENCY_BOUNDS_S, tag_keys=("task",))
        self.kv_bytes = metrics.Counter(
            "lance_kv_bytes_moved",
            description="Bytes of context KV cache handed from the thinker to the DiT.")
        self.requests = metrics.Counter(
            "lance_requests", description="Finished HTTP requests by route and status code.",
            tag_keys=("route", "status"))
        self.retries = metrics.Counter(
            "lance_stage_retries",
            description="Stage calls run again because a stage replica died or was unreachable.",
            tag_keys=("stage",))
        self._counts = {"thinker": 0, "dit": 0}

    @contextmanager
    def stage_call(self, stage: str):
        self._counts[stage] += 1
        self.in_flight.set(self._counts[stage], tags={"stage": stage})
        try:
            yield
        finally:
            self._counts[stage] -= 1
            self.in_flight.set(self._counts[stage], tags={"stage": stage})

    @contextmanager
    def timed(self, histogram, task: str):
        start = time.perf_counter()
        yield
        histogram.observe(time.perf_counter() - start, tags={"task": task})
