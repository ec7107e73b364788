"""The server's Prometheus figures: requests, tokens, latencies, and every rank's memory and codec bytes.

Latencies are measured on rank 0, where requests live. Per-rank figures
(weights, KV cache, resident memory, activation bytes sent between pipeline
stages) are reported by every rank to rank 0 every few seconds and exposed as
gauges labelled by rank, so one scrape of rank 0 sees the whole world.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

RANK_LABELS = ("rank", "node", "stage", "tp_rank")


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.running = Gauge("orion_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("orion_requests_waiting", "Requests waiting for a slot.", registry=r)
        self.prompt_tokens = Counter("orion_prompt_tokens", "Prompt tokens received.", registry=r)
        self.generation_tokens = Counter("orion_generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("orion_requests", "Requests answered, by finish reason or HTTP error.",
                                ["outcome"], registry=r)
        self.time_to_first_token = Histogram("orion_time_to_first_token_seconds",
                                             "From arrival to the first generated token.",
                                             buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("orion_inter_token_latency_seconds",
                                             "Between consecutive tokens of a request.",
                                             buckets=ITL_BUCKETS, registry=r)
        self.e2e_latency = Histogram("orion_e2e_request_latency_seconds", "From arrival to the last token.",
                                     buckets=E2E_BUCKETS, registry=r)
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
