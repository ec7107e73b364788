"""The server's Prometheus figures: requests, tokens, latencies, and every rank's memory and codec bytes.

Request figures carry vLLM's names and its `model_name` label, so dashboards
and alerts built for vLLM work unchanged (vllm:num_requests_running,
vllm:kv_cache_usage_perc as a fraction, the latency histograms...). Figures
vLLM has no name for keep orion's: HTTP outcomes, decode batch sizes, and
per-rank weights, KV cache, resident memory and activation-codec bytes, which
every rank reports to rank 0 every few seconds, labelled by rank, so one
scrape of rank 0 sees the whole world.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)

RANK_LABELS = ("rank", "node", "stage", "tp_rank")


class _PerModel:
    """A labelled metric with model_name already filled in."""

    def __init__(self, metric: Any, model_name: str):
        self.metric, self.model_name = metric, model_name

    def labels(self, **labels: str) -> Any:
        return self.metric.labels(model_name=self.model_name, **labels)


class ServeMetrics:
    def __init__(self, model_name: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        model = ["model_name"]

        def per_model(metric: Any) -> Any:
            return metric.labels(model_name=model_name)

        self.running = per_model(Gauge("vllm:num_requests_running", "Requests in the running batch.", model,
                                       registry=r))
        self.waiting = per_model(Gauge("vllm:num_requests_waiting", "Requests waiting for a slot.", model,
                                       registry=r))
        self.kv_cache_usage = per_model(Gauge("vllm:kv_cache_usage_perc", "Fraction of the KV cache's positions in "
                                              "use (1 means full).", model, registry=r))
        self.prompt_tokens = per_model(Counter("vllm:prompt_tokens", "Prompt tokens prefilled.", model, registry=r))
        self.generation_tokens = per_model(Counter("vllm:generation_tokens", "Tokens generated.", model, registry=r))
        self.prefix_cache_queries = per_model(Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in "
                                                      "the prefix cache.", model, registry=r))
        self.prefix_cache_hits = per_model(Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix "
                                                   "cache (not computed again).", model, registry=r))
        self.request_success = _PerModel(Counter("vllm:request_success", "Requests finished, by reason.",
                                                 model + ["finished_reason"], registry=r), model_name)

        def histogram(name: str, text: str, buckets: tuple[float, ...]) -> Any:
            return per_model(Histogram(name, text, model, buckets=buckets, registry=r))

        self.time_to_first_token = histogram("vllm:time_to_first_token_seconds",
                                             "From arrival to the first generated token.", TTFT_BUCKETS)
        self.inter_token_latency = histogram("vllm:inter_token_latency_seconds",
                                             "Between consecutive tokens of a request.", ITL_BUCKETS)
        self.e2e_latency = histogram("vllm:e2e_request_latency_seconds", "From arrival to the last token.",
                                     REQUEST_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds", "From arrival to admission into the batch.",
                                    REQUEST_BUCKETS)
        self.prefill_time = histogram("vllm:request_prefill_time_seconds", "The prefill step of a request.",
                                      REQUEST_BUCKETS)
        self.decode_time = histogram("vllm:request_decode_time_seconds", "From the first token to the last.",
                                     REQUEST_BUCKETS)
        self.requests = Counter("orion_requests", "HTTP requests answered with an error, by status.",
                                ["outcome"], registry=r)
        self.decode_batch_size = Histogram("orion_decode_batch_size", "Requests sharing each decode step.",
                                           buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128), registry=r)
        self.ranks: list[dict[str, Any]] = []
        r.register(_RankCollector(self))

    def update_ranks(self, stats: list[dict[str, Any]]) -> None:
        self.ranks = sorted(stats, key=lambda s: s["rank"])

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RankCollector:
    """Per-rank figures as last reported; codec figures per (sending rank, codec)."""

    def __init__(self, metrics: ServeMetrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        weights = GaugeMetricFamily("orion_rank_weight_bytes", "Model weights held by a rank.", labels=RANK_LABELS)
        cache = GaugeMetricFamily("orion_rank_kv_cache_bytes", "KV cache allocated by a rank.", labels=RANK_LABELS)
        resident = GaugeMetricFamily("orion_rank_resident_memory_bytes", "Resident set size of a rank's process.",
                                     labels=RANK_LABELS)
        codec_labels = ("rank", "stage", "codec", "direction")
        frames = CounterMetricFamily("orion_codec_frames", "Hidden-state frames sent (encode) or received (decode) "
                                     "between pipeline stages.", labels=codec_labels)
        tensor_bytes = CounterMetricFamily("orion_codec_tensor_bytes", "Hidden-state bytes before encoding / after "
                                           "decoding.", labels=codec_labels)
        frame_bytes = CounterMetricFamily("orion_codec_frame_bytes", "Bytes on the wire between pipeline stages.",
                                          labels=codec_labels)
        ratio = GaugeMetricFamily("orion_codec_ratio", "Frame bytes over tensor bytes of the frames a rank sent "
                                  "(lower is smaller).", labels=("rank", "stage", "codec"))
        tokens = CounterMetricFamily("orion_activation_tokens", "Token positions whose hidden states a rank sent "
                                     "to the next stage.", labels=("rank", "stage"))
        for stat in self.metrics.ranks:
            labels = [str(stat["rank"]), str(stat["node"]), str(stat["stage"]), str(stat["tp_rank"])]
            weights.add_metric(labels, stat["weight_bytes"])
            cache.add_metric(labels, stat["kv_cache_bytes"])
            resident.add_metric(labels, stat["resident_bytes"])
            where = [str(stat["rank"]), str(stat["stage"])]
            if stat.get("activation_tokens"):
                tokens.add_metric(where, stat["activation_tokens"])
            for codec, directions in (stat.get("codecs") or {}).items():
                for direction, counts in directions.items():
                    frames.add_metric(where + [codec, direction], counts["frames"])
                    tensor_bytes.add_metric(where + [codec, direction], counts["tensor_bytes"])
                    frame_bytes.add_metric(where + [codec, direction], counts["frame_bytes"])
                    if direction == "encode" and counts.get("ratio") is not None:
                        ratio.add_metric(where + [codec], counts["ratio"])
        yield from (weights, cache, resident, frames, tensor_bytes, frame_bytes, ratio, tokens)
