"""Prometheus metrics of one server (`GET /metrics`): requests, tokens, forward passes, queue, latency.

Each app gets its own CollectorRegistry so several apps (tests, `unmask bench serve`) can live in one process.
"""

from __future__ import annotations

import threading
from typing import Callable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

prometheus_client.disable_created_metrics()  # the *_created series only add noise to a scrape

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], float], active: Callable[[], float]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("unmask_requests", "HTTP API requests by endpoint and outcome",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("unmask_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("unmask_completion_tokens", "tokens generated for clients", registry=r)
        self.nfe = Counter("unmask_nfe", "network forward passes (function evaluations)", registry=r)
        self.steps = Counter("unmask_denoising_steps", "denoising steps of finished requests", registry=r)
        self.latency = Histogram("unmask_request_latency_seconds", "time from request to last byte",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        Gauge("unmask_queue_depth", "requests waiting for a batch slot (and queued edits)",
              registry=r).set_function(queue_depth)
        Gauge("unmask_active_requests", "requests being denoised in the current batch",
              registry=r).set_function(active)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, open fds, CPU seconds (Linux)

    def watch_prefix_store(self, store) -> None:
        """Gauges over a PrefixStore (decoding/prefix.py): blocks held, blocks reused and computed so far."""
        r = self.registry
        Gauge("unmask_prefix_cache_blocks", "prompt model blocks whose K/V are kept for reuse",
              registry=r).set_function(lambda: len(store))
        Gauge("unmask_prefix_cache_reused_blocks", "prompt model blocks taken from the store instead of computed",
              registry=r).set_function(lambda: store.reused)
        Gauge("unmask_prefix_cache_computed_blocks", "prompt model blocks computed and stored",
              registry=r).set_function(lambda: store.computed)

    def finished(self, endpoint: str, seconds: float, prompt_tokens: int, completion_tokens: int, nfe: int,
                 steps: int, status: str = "200") -> None:
        self.requests.labels(endpoint, status).inc()
        self.latency.labels(endpoint).observe(seconds)
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)
        self.nfe.inc(nfe)
        self.steps.inc(steps)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def resident_mib() -> float:
    """This process's resident memory (VmRSS) in MiB; 0 where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return 0.0


class RssSampler:
    """`with RssSampler() as rss: ...`: resident memory at the start, its peak (sampled every `every` s) and
    at the end, in MiB."""

    def __init__(self, every: float = 0.25):
        self.every, self.start, self.peak, self.end = every, 0.0, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, resident_mib())

    def __enter__(self) -> "RssSampler":
        self.start = self.peak = resident_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.end = resident_mib()
        self.peak = max(self.peak, self.end)
