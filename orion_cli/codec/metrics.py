"""Codec counters per codec and direction, and a Prometheus collector that exposes them.

encode() and decode() record into a CodecMetrics (the module-level METRICS
unless given another). Codecs are counted by the codec a frame really carries,
so a `zstd` request that zstd could not shrink counts as `raw`.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import asdict, dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

DIRECTIONS = ("encode", "decode")


@dataclass
class _Counts:
    frames: int = 0
    tensor_bytes: int = 0  # bytes of the tensor (before encode, after decode)
    frame_bytes: int = 0  # bytes on the wire
    seconds: float = 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 6)
        out["ratio"] = round(self.frame_bytes / self.tensor_bytes, 6) if self.tensor_bytes else None
        out["gb_per_s"] = round(self.tensor_bytes / self.seconds / 1e9, 3) if self.seconds else None
        return out


class CodecMetrics:
    """Thread-safe counters: frames, tensor and frame bytes, seconds, per codec and direction; errors by kind."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], _Counts] = {}
        self._errors: Counter[str] = Counter()

    def record(self, direction: str, codec: str, tensor_bytes: int, frame_bytes: int, seconds: float) -> None:
        with self._lock:
            counts = self._counts.get((codec, direction))
            if counts is None:
                counts = self._counts[(codec, direction)] = _Counts()
            counts.frames += 1
            counts.tensor_bytes += tensor_bytes
            counts.frame_bytes += frame_bytes
            counts.seconds += seconds

    def record_error(self, error: BaseException) -> None:
        with self._lock:
            self._errors[type(error).__name__] += 1

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self._errors.clear()

    def snapshot(self) -> dict:
        """{"codecs": {codec: {"encode": {...}, "decode": {...}}}, "total": {...}, "errors": {kind: n}}.

        Each direction holds frames, tensor_bytes, frame_bytes, seconds, ratio
        (frame/tensor bytes) and gb_per_s (tensor bytes per second).
        """
        with self._lock:
            counts = {key: _Counts(**asdict(value)) for key, value in self._counts.items()}
            errors = dict(self._errors)
        codecs: dict[str, dict] = {}
        totals = {direction: _Counts() for direction in DIRECTIONS}
        for (codec, direction), value in sorted(counts.items()):
            codecs.setdefault(codec, {})[direction] = value.as_dict()
            total = totals[direction]
            total.frames += value.frames
            total.tensor_bytes += value.tensor_bytes
            total.frame_bytes += value.frame_bytes
            total.seconds += value.seconds
        return {
            "codecs": codecs,
            "total": {direction: value.as_dict() for direction, value in totals.items()},
            "errors": errors,
        }


METRICS = CodecMetrics()


class CodecMetricsCollector(Collector):
    """Exposes a CodecMetrics on a prometheus_client registry (for `orion serve`'s /metrics).

        registry.register(CodecMetricsCollector(METRICS))
    """

    def __init__(self, metrics: CodecMetrics = METRICS, prefix: str = "orion_codec") -> None:
        self.metrics = metrics
        self.prefix = prefix

    def describe(self):
        return []  # nothing to declare ahead: families depend on which codecs have run

    def collect(self):
        snapshot = self.metrics.snapshot()
        p = self.prefix
        families = {
            "frames": CounterMetricFamily(f"{p}_frames", "Frames encoded or decoded", labels=["codec", "direction"]),
            "tensor_bytes": CounterMetricFamily(f"{p}_tensor_bytes", "Tensor bytes before encoding / after decoding",
                                                labels=["codec", "direction"]),
            "frame_bytes": CounterMetricFamily(f"{p}_frame_bytes", "Frame bytes after encoding / before decoding",
                                               labels=["codec", "direction"]),
            "seconds": CounterMetricFamily(f"{p}_seconds", "Time spent encoding or decoding",
                                           labels=["codec", "direction"]),
        }
        ratio = GaugeMetricFamily(f"{p}_ratio", "Frame bytes over tensor bytes of all frames encoded",
                                  labels=["codec"])
        for codec, directions in snapshot["codecs"].items():
            for direction, values in directions.items():
                for key, family in families.items():
                    family.add_metric([codec, direction], values[key])
            encoded = directions.get("encode")
            if encoded and encoded["ratio"] is not None:
                ratio.add_metric([codec], encoded["ratio"])
        errors = CounterMetricFamily(f"{p}_errors", "Frames rejected on decode, by error", labels=["error"])
        for kind, count in sorted(snapshot["errors"].items()):
            errors.add_metric([kind], count)
        yield from families.values()
        yield ratio
        yield errors
