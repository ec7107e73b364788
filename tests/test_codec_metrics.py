"""Codec metrics: counts per codec, thread safety, and the Prometheus exposition `orion serve` serves."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from orion_cli.codec import (METRICS, CodecError, CodecMetrics, CodecMetricsCollector, decode, decode_chunks, encode,
                             encode_chunks)

from test_codec import activation


def test_snapshot_counts_frames_bytes_and_time_per_codec():
    metrics = CodecMetrics()
    x = activation(16, 4096)
    frames = [encode(x, "int8+zstd", metrics=metrics) for _ in range(3)]
    for frame in frames:
        decode(frame, metrics=metrics)
    encode(np.arange(10), "fp16", metrics=metrics)  # integers: carried raw, counted as raw

    snapshot = metrics.snapshot()
    assert set(snapshot["codecs"]) == {"int8+zstd", "raw"}
    encoded = snapshot["codecs"]["int8+zstd"]["encode"]
    assert encoded["frames"] == 3
    assert encoded["tensor_bytes"] == 3 * x.numel() * 4
    assert encoded["frame_bytes"] == sum(map(len, frames))
    assert encoded["ratio"] == pytest.approx(len(frames[0]) / (x.numel() * 4), abs=1e-6)
    assert encoded["seconds"] > 0 and encoded["gb_per_s"] > 0
    assert snapshot["codecs"]["int8+zstd"]["decode"]["frame_bytes"] == encoded["frame_bytes"]
    assert snapshot["codecs"]["raw"]["encode"]["tensor_bytes"] == 80
    assert snapshot["total"]["encode"]["frames"] == 4 and snapshot["total"]["decode"]["frames"] == 3
    assert snapshot["errors"] == {}


def test_rejected_frames_are_counted_by_error():
    metrics = CodecMetrics()
    frame = encode(torch.ones(4), "raw", metrics=metrics)
    for broken in (frame[:-1], b"GIF89a", frame[:20] + b"\xff" + frame[21:]):
        with pytest.raises(CodecError):
            decode(broken, metrics=metrics)
    with pytest.raises(CodecError):
        decode_chunks(list(encode_chunks(torch.ones(100), "raw", 40, metrics=metrics))[:-1], metrics=metrics)
    assert metrics.snapshot()["errors"] == {"TruncatedFrameError": 2, "ForeignFrameError": 1, "CorruptFrameError": 1}


def test_module_metrics_are_the_default():
    before = METRICS.snapshot()["total"]["encode"]["frames"]
    decode(encode(torch.ones(3)))
    after = METRICS.snapshot()["total"]
    assert after["encode"]["frames"] == before + 1


def test_counters_stay_exact_under_concurrent_threads():
    metrics = CodecMetrics()
    tensors = [activation(2, 256, seed=i) for i in range(8)]
    barrier = threading.Barrier(len(tensors))

    def work(tensor):
        barrier.wait()
        for _ in range(50):
            decode(encode(tensor, "bf16+zstd", metrics=metrics), metrics=metrics)

    threads = [threading.Thread(target=work, args=(t,)) for t in tensors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counts = metrics.snapshot()["codecs"]["bf16+zstd"]
    assert counts["encode"]["frames"] == counts["decode"]["frames"] == 400
    assert counts["encode"]["tensor_bytes"] == counts["decode"]["tensor_bytes"] == 400 * 2 * 256 * 4
    assert counts["encode"]["frame_bytes"] == counts["decode"]["frame_bytes"]


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_collector_exposes_the_counters_in_prometheus_format():
    metrics = CodecMetrics()
    frame = encode(activation(4, 1024), "fp16+zstd", metrics=metrics)
    decode(frame, metrics=metrics)
    with pytest.raises(CodecError):
        decode(frame[:10], metrics=metrics)
    registry = CollectorRegistry()
    registry.register(CodecMetricsCollector(metrics))

    samples = _samples(generate_latest(registry).decode())
    labels = (("codec", "fp16+zstd"), ("direction", "encode"))
    assert samples[("orion_codec_frames_total", labels)] == 1
    assert samples[("orion_codec_tensor_bytes_total", labels)] == 4 * 1024 * 4
    assert samples[("orion_codec_frame_bytes_total", labels)] == len(frame)
    assert samples[("orion_codec_seconds_total", labels)] > 0
    assert samples[("orion_codec_ratio", (("codec", "fp16+zstd"),))] == pytest.approx(len(frame) / (4 * 1024 * 4))
    assert samples[("orion_codec_frames_total", (("codec", "fp16+zstd"), ("direction", "decode")))] == 1
    assert samples[("orion_codec_errors_total", (("error", "TruncatedFrameError"),))] == 1


def test_metrics_are_served_over_http():
    metrics = CodecMetrics()
    registry = CollectorRegistry()
    registry.register(CodecMetricsCollector(metrics))
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        assert "orion_codec_frames_total{" not in httpx.get(url, timeout=10).text
        encode(torch.zeros(300), "zstd", metrics=metrics)
        samples = _samples(httpx.get(url, timeout=10).text)
        assert samples[("orion_codec_frames_total", (("codec", "zstd"), ("direction", "encode")))] == 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
