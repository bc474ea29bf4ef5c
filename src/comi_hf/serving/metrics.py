"""`comi-serve`'s Prometheus metrics (`GET /metrics`, in Prometheus' text format through
`prometheus_client`): requests, latencies, what waits, the encoded-context cache, tokens."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .cache import EncodedContextCache

__all__ = ["ServingMetrics"]

# Seconds, from a cached one-question request on a GPU to a long document's compression on a CPU.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServingMetrics:
    """The metrics of one `comi-serve` app, in a registry of their own.

    Args:
        cache: the encoded-context cache whose hits, misses, bytes and evictions are reported.
        waiting: returns `(requests, questions)` waiting for compression, read at each scrape.
    """

    def __init__(self, cache: EncodedContextCache, waiting):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "comi_requests", "Requests answered, by endpoint and HTTP status.", ["endpoint", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "comi_request_phase_seconds",
            "Seconds a request spent in each phase: queue (waiting for compression), compression, decoding, total.",
            ["phase"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "comi_time_to_first_token_seconds", "Seconds from a streamed request to its first text.",
            buckets=_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.tokens = Counter(
            "comi_tokens", "Tokens: context and question tokens in, memory vectors the decoder read, tokens out.",
            ["kind"], registry=self.registry,
        )  # fmt: skip
        self.rounds = Counter("comi_compression_rounds", "Compression rounds run.", registry=self.registry)
        self.registry.register(_Waiting(waiting))
        self.registry.register(_CacheStats(cache))

    def observe(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def phases(self, **seconds: float) -> None:
        for phase, value in seconds.items():
            self.latency.labels(phase=phase).observe(value)

    def count_tokens(self, context: int = 0, memory: int = 0, generated: int = 0) -> None:
        for kind, count in (("context", context), ("memory", memory), ("generated", generated)):
            if count:
                self.tokens.labels(kind=kind).inc(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Waiting:
    """Requests and questions waiting for compression, read when scraped."""

    def __init__(self, waiting):
        self.waiting = waiting

    def collect(self):
        requests, questions = self.waiting()
        yield GaugeMetricFamily("comi_waiting_requests", "Requests waiting for compression.", value=requests)
        yield GaugeMetricFamily("comi_waiting_questions", "Questions waiting for compression.", value=questions)


class _CacheStats:
    """The encoded-context cache's counters, read when scraped."""

    def __init__(self, cache: EncodedContextCache):
        self.cache = cache

    def collect(self):
        stats = self.cache.stats()
        for name in ("hits", "misses", "evictions"):
            yield CounterMetricFamily(f"comi_cache_{name}", f"Encoded-context cache {name}.", value=stats[name])
        yield GaugeMetricFamily("comi_cache_bytes", "Bytes the encoded-context cache holds.", value=stats["bytes"])
        yield GaugeMetricFamily(
            "comi_cache_entries", "Contexts the encoded-context cache holds.", value=stats["entries"]
        )
        yield GaugeMetricFamily("comi_cache_max_bytes", "The cache's memory budget.", value=stats["max_bytes"])
