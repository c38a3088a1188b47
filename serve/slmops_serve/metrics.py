"""Prometheus metrics of one server, in a private registry served on ``--metrics-port``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BASE_LABEL = "base"  # adapter label of requests without adapter
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 150, 200, 300, 500, 1000, 2500)


class ServeMetrics:
    """Every metric the server exports; ``registry`` is what ``/metrics`` serves."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("slmops_requests", "Finished RPCs by method and gRPC status code",
                                ["method", "code"], registry=r)
        self.adapter_requests = Counter("slmops_adapter_requests", "Generation requests by adapter name",
                                        ["adapter"], registry=r)
        self.generated_tokens = Counter("slmops_generated_tokens", "Tokens generated, by adapter", ["adapter"], registry=r)
        self.ttft = Histogram("slmops_time_to_first_token_seconds", "Request arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("slmops_generation_seconds", "Request arrival to last token",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_per_second = Histogram("slmops_decode_tokens_per_second", "Decode speed of one request",
                                           buckets=RATE_BUCKETS, registry=r)
        self.queue_depth = Gauge("slmops_queue_depth", "Admitted requests waiting for a batch row", registry=r)
        self.active = Gauge("slmops_active_generations", "Generations in the batch now (decoding or in prefill)", registry=r)
        self.queue_seconds = Histogram("slmops_queue_wait_seconds", "Request arrival to joining the batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("slmops_batch_size", "Rows in each decode step", buckets=BATCH_BUCKETS, registry=r)
        self.adapters_loaded = Gauge("slmops_adapters_loaded", "Adapters loaded (public names)", registry=r)
        self.adapter_info = Gauge("slmops_adapter_loaded", "1 for each loaded adapter name and sha256",
                                  ["adapter", "sha256"], registry=r)
        self.adapter_load_seconds = Histogram("slmops_adapter_load_seconds", "Adapter validation + load time",
                                              buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_load_failures = Counter("slmops_adapter_load_failures", "Refused adapter loads by status code",
                                             ["code"], registry=r)
        self.adapter_unload_failures = Counter("slmops_adapter_unload_failures", "Failed attempts to free an "
                                               "unloaded or replaced adapter version (each is retried)",
                                               ["adapter"], registry=r)
        self.adapter_unloads_pending = Gauge("slmops_adapter_unloads_pending", "Unloaded or replaced adapter versions "
                                             "still in memory because freeing them failed (retrying or given up)",
                                             registry=r)
        self.ready = Gauge("slmops_model_ready", "1 once the model is loaded and warm, 0 while loading or draining",
                           registry=r)
        self.adapter_memory = Gauge("slmops_adapter_memory_bytes", "Bytes of adapter tensors held (loaded versions, "
                                    "and replaced ones still in use)", registry=r)
        self.adapter_memory_budget = Gauge("slmops_adapter_memory_budget_bytes", "--adapter-memory in bytes "
                                           "(0 = unbounded)", registry=r)
        self.adapter_evictions = Counter("slmops_adapter_evictions", "Idle adapters evicted to stay within "
                                         "--adapter-memory (loaded again on their next request)", registry=r)
        self.adapter_lazy_loads = Counter("slmops_adapter_lazy_loads", "Adapters loaded by the first request that "
                                          "named them (not loaded, or evicted)", registry=r)
        self.lora_feeds_bytes = Gauge("slmops_lora_feeds_cache_bytes", "Bytes of LoRA feed arrays a cache holds "
                                      "(bank: concatenated mixes; runner: bound OrtValues; engine: per-batch feeds)",
                                      ["cache"], registry=r)
        self.spec_drafted_tokens = Counter("slmops_spec_drafted_tokens", "Draft tokens verified by speculative "
                                           "decoding, by source (ngram: prompt lookup; grammar: forced by the "
                                           "structured-output grammar, jump-forward)", ["source"], registry=r)
        self.spec_accepted_tokens = Counter("slmops_spec_accepted_tokens", "Draft tokens accepted (equal to the "
                                            "token the row selected)", ["source"], registry=r)
        self.spec_steps = Counter("slmops_spec_steps", "Decode steps that verified draft tokens (one graph call "
                                  "for all rows)", registry=r)
        self.spec_row_steps = Counter("slmops_spec_row_steps", "Rows stepped in speculative steps", registry=r)
        self.spec_emitted_tokens = Counter("slmops_spec_emitted_tokens", "Tokens emitted by rows in speculative "
                                           "steps (tokens per row-step = this / slmops_spec_row_steps_total)",
                                           registry=r)
        self.spec_max_draft = Gauge("slmops_spec_max_draft", "--max-draft: draft tokens per row and step "
                                    "(0 = --speculation off)", registry=r)
        self.kv_cache_bytes = Gauge("slmops_kv_cache_bytes", "Bytes of the KV cache buffers as allocated "
                                    "(grows with the longest row, shrinks after a burst)", registry=r)
