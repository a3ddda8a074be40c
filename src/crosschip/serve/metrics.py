"""Prometheus metrics of the server: requests, tokens, latencies, queue depth and cache use."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    """One registry per server, so tests and several apps in one process never collide."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "crosschip_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("crosschip_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("crosschip_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "crosschip_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "crosschip_inter_token_latency_seconds",
            "Time between streamed token deltas",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "crosschip_request_latency_seconds",
            "Request latency, arrival to last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("crosschip_queue_depth", "Sequences waiting for admission", registry=r)
        self.running = Gauge("crosschip_running_sequences", "Sequences in the running batch", registry=r)
        self.cache_blocks_used = Gauge("crosschip_cache_blocks_used", "Latent cache blocks in use", registry=r)
        self.cache_blocks_total = Gauge("crosschip_cache_blocks_total", "Latent cache blocks in the pool", registry=r)
        self.cache_bytes_used = Gauge("crosschip_cache_bytes_used", "Latent cache bytes in use", registry=r)
        self.engine_steps = Gauge("crosschip_engine_steps", "Batched forward steps run since start", registry=r)
        self.prefix_queries = Gauge(
            "crosschip_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache since start", registry=r
        )
        self.prefix_hits = Gauge(
            "crosschip_prefix_cache_hit_tokens", "Prompt tokens read from the prefix cache since start", registry=r
        )
        self.cache_bytes_per_token_per_layer = Gauge(
            "crosschip_cache_bytes_per_token_per_layer",
            "Latent cache bytes per token per layer: (kv_lora_rank + qk_rope_head_dim) x dtype size",
            registry=r,
        )
        self.cache_usage_ratio = Gauge(
            "crosschip_cache_usage_ratio", "Fraction of latent cache blocks in use", registry=r
        )

    def bind(self, engine) -> None:
        """Read queue and cache gauges from the engine at scrape time."""
        self.queue_depth.set_function(engine.queue_depth)
        self.running.set_function(lambda: len(engine.running))
        self.engine_steps.set_function(lambda: engine.steps)
        self.prefix_queries.set_function(lambda: engine.prefix_query_tokens)
        self.prefix_hits.set_function(lambda: engine.prefix_hit_tokens)
        usage = engine.executor.cache_usage
        self.cache_blocks_used.set_function(lambda: usage()["blocks_used"])
        self.cache_blocks_total.set_function(lambda: usage()["blocks_total"])
        self.cache_bytes_used.set_function(lambda: usage()["bytes_used"])
        self.cache_bytes_per_token_per_layer.set(engine.executor.cache_bytes_per_token_per_layer)
        self.cache_usage_ratio.set_function(lambda: usage()["blocks_used"] / max(1, usage()["blocks_total"]))

    def render(self) -> bytes:
        return generate_latest(self.registry)
