"""Prometheus metrics of one worker, in their own registry (so several workers can live in one process)."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from inference.engine import StepStats

THROUGHPUT_WINDOW_S = 10.0  # tokens/s is averaged over this window


class WorkerMetrics:
    def __init__(self, kv_cache_bytes: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.waiting = Gauge(
            "tollgate_worker_queue_depth", "Requests waiting for admission", registry=self.registry
        )
        self.running = Gauge(
            "tollgate_worker_running", "Sequences in the running batch", registry=self.registry
        )
        self.batch_size = Histogram(
            "tollgate_worker_batch_size",
            "Sequences per engine step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.batch_tokens = Histogram(
            "tollgate_worker_batch_tokens",
            "Tokens per engine step (prefill chunks + decodes)",
            buckets=(1, 8, 32, 64, 128, 256, 512, 1024, 2048),
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "tollgate_worker_generated_tokens", "Completion tokens generated", registry=self.registry
        )
        self.tokens_per_second = Gauge(
            "tollgate_worker_tokens_per_second",
            f"Completion tokens per second over the last {THROUGHPUT_WINDOW_S:.0f} s",
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "tollgate_worker_time_to_first_token_seconds",
            "From request arrival to its first completion token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.requests_finished = Counter(
            "tollgate_worker_requests_finished",
            "Finished requests",
            ["finish_reason"],
            registry=self.registry,
        )
        self.overloaded = Counter(
            "tollgate_worker_overloaded",
            "Requests refused because the queue was full",
            registry=self.registry,
        )
        self.usage_emit_failures = Counter(
            "tollgate_worker_usage_emit_failures",
            "UsageRecorded events that could not be published",
            registry=self.registry,
        )
        self.usage_emit_seconds = Histogram(
            "tollgate_worker_usage_emit_seconds",
            "From a request's end to its UsageRecorded being durably accepted (the done line waits for it)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=self.registry,
        )
        self.delivery_failures = Counter(
            "tollgate_worker_delivery_failures",
            "Engine outputs that could not be delivered to their request (a bug; the others still were)",
            registry=self.registry,
        )
        self.engine_restarts = Counter(
            "tollgate_worker_engine_restarts",
            "Times the engine loop died and was rebuilt",
            registry=self.registry,
        )
        self.kv_cache_bytes = Gauge(
            "tollgate_worker_kv_cache_bytes", "Preallocated KV cache", registry=self.registry
        )
        self.kv_cache_bytes.set(kv_cache_bytes)
        self.kv_cache_usage_perc = Gauge(
            "tollgate_worker_kv_cache_usage_perc",
            "Fraction of paged KV cache blocks in use, 0..1 (vLLM's kv_cache_usage_perc)",
            registry=self.registry,
        )
        self.preemptions = Counter(
            "tollgate_worker_preemptions",
            "Running requests preempted for lack of KV blocks (recomputed later, never billed twice)",
            registry=self.registry,
        )
        self._lock = threading.Lock()
        self._recent_tokens: deque[tuple[float, int]] = deque()  # (monotonic s, tokens) of recent steps
        self._window_tokens = 0  # sum of the tokens in _recent_tokens

    def observe_step(self, stats: StepStats) -> None:
        self.waiting.set(stats.waiting)
        self.running.set(stats.running)
        self.kv_cache_usage_perc.set(stats.kv_cache_usage)
        self.preemptions.inc(stats.preempted)
        if stats.scheduled_sequences:
            self.batch_size.observe(stats.scheduled_sequences)
            self.batch_tokens.observe(stats.scheduled_tokens)
        self.generated_tokens.inc(stats.generated_tokens)
        with self._lock:
            self._recent_tokens.append((time.monotonic(), stats.generated_tokens))
            self._window_tokens += stats.generated_tokens
        self.refresh_throughput()

    def refresh_throughput(self) -> None:
        """Recompute tokens/s over the window (also at scrape time, so an idle worker reads 0)."""
        now = time.monotonic()
        with self._lock:
            while self._recent_tokens and self._recent_tokens[0][0] < now - THROUGHPUT_WINDOW_S:
                self._window_tokens -= self._recent_tokens.popleft()[1]
            total = self._window_tokens
        self.tokens_per_second.set(total / THROUGHPUT_WINDOW_S)
