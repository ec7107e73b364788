"""The onnxruntime engine over a graph whose attention is GroupQueryAttention (onnx_attention.py): a static KV cache.

Each past input is one buffer [slots, kv_heads, capacity, head_dim], bound
through IO binding as both the past and the present of every step, so
GroupQueryAttention writes the new positions in place. Rows are slots: a
decode step binds rows 0..n-1 (the scheduler keeps running requests in the
lowest slots) with each row's own length in `seqlens_k`, so no row is padded
and nothing is copied. A prefill binds its slot's row alone (onnxruntime's
GroupQueryAttention continues a prompt after a cached prefix only at batch
1), after copying in what the prefix cache holds. The capacity grows as the
torch engine's slot cache does (attention.grown_capacity), up to
--max-model-len.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..onnx_decoder import OnnxDecoder
from .attention import CACHE_GROWTH_START, grown_capacity
from .onnx_attention import SEQLENS, TOTAL
from .onnx_engine import OnnxRunner


class StaticCacheRunner(OnnxRunner):
    def __init__(self, decoder: OnnxDecoder, *, slots: int, max_len: int, kv_heads: int, head_dim: int,
                 prefix_cache_bytes: int = 0, recompute_at: int | None = None):
        super().__init__(decoder, prefix_cache_bytes, recompute_at)
        import onnxruntime as ort

        self.ort = ort
        self.max_len = max_len
        self.capacity = min(CACHE_GROWTH_START, max_len)
        self.lengths: dict[int, int] = {}  # slot -> positions cached
        self.buffers = [np.zeros((slots, kv_heads, self.capacity, head_dim), dtype=decoder.past_dtype)
                        for _ in decoder.past_names]
        self._bound: dict[tuple[int, int], list] = {}  # (first row, rows) -> OrtValues over those rows
        self._decode_steps: dict[int, _DecodeStep] = {}  # rows -> that step's binding
        self.attention = "GroupQueryAttention, static KV cache"

    def probe(self) -> None:
        """One two-token prefill into slot 0 (whatever it leaves there, the slot's next prefill overwrites)."""
        self._step(np.array([[0, 0]], dtype=np.int64), [0], 0, 1)

    def _move(self, source: int, target: int) -> None:
        length = self.lengths.pop(source)
        for buffer in self.buffers:
            buffer[target, :, :length] = buffer[source, :, :length]
        self.lengths[target] = length

    def _prefill(self, slot: int, tokens: list[int], every_position: bool) -> tuple[np.ndarray, int]:
        self._reserve(len(tokens))
        cached, past = self._reuse(tokens, every_position)
        for buffer, array in zip(self.buffers, past or []):
            buffer[slot, :, :cached] = array[0]
        logits = self._step(np.array([tokens[cached:]], dtype=np.int64), [cached], slot, 1)
        self.lengths[slot] = len(tokens)
        self._remember(tokens, lambda: [buffer[slot:slot + 1, :, :len(tokens)].copy() for buffer in self.buffers])
        return (logits[0] if every_position else logits[0, -1:]).astype(np.float32), cached

    def _decode(self, tokens: list[list[int]], starts: list[int]) -> np.ndarray:
        self._reserve(max(starts) + 1)
        if self.decoder.vocab_size is not None:  # a decode step is one token per row (the scheduler's plan)
            logits = self._decode_bound(tokens, starts)
        else:  # logits of a width the graph does not declare
            logits = self._step(np.array(tokens, dtype=np.int64), starts, 0, len(starts))
        for row, start in enumerate(starts):
            self.lengths[row] = start + 1
        return logits[:, -1].astype(np.float32)

    def _decode_bound(self, tokens: list[list[int]], starts: list[int]) -> np.ndarray:
        step = self._decode_step(len(starts))
        step.ids[:, 0] = [row[0] for row in tokens]
        step.positions[:, 0] = starts
        step.seqlens[:] = starts
        step.total[()] = max(starts) + 1
        self.decoder.session.run_with_iobinding(step.binding)
        return step.logits

    def _decode_step(self, rows: int) -> _DecodeStep:
        """The IO binding of a one-token step over slots 0..rows-1, made once per row count: its inputs and the
        logits are arrays bound in place, so a step writes four small arrays and runs, and no OrtValue is
        wrapped or unwrapped per step (a server spent a tenth of its engine thread's time there)."""
        if rows not in self._decode_steps:
            self._decode_steps[rows] = _DecodeStep(self, rows)
        return self._decode_steps[rows]

    def _step(self, ids: np.ndarray, starts: list[int], first: int, rows: int) -> np.ndarray:
        """Logits of `ids` [rows, width] for slots first..first+rows-1, each row's positions after its `starts`."""
        width = ids.shape[1]
        binding = self.decoder.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        if "position_ids" in self.decoder.input_names:  # not once the rotary embedding is folded into attention
            binding.bind_cpu_input("position_ids", np.array(starts, dtype=np.int64)[:, None] + np.arange(width))
        binding.bind_cpu_input(SEQLENS, np.array(starts, dtype=np.int32) + (width - 1))
        binding.bind_cpu_input(TOTAL, np.array(max(starts) + width, dtype=np.int32))
        binding.bind_output("logits", "cpu")
        self._bind_cache(binding, first, rows)
        self.decoder.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def _bind_cache(self, binding, first: int, rows: int) -> None:
        """Slots first..first+rows-1 of every layer's buffer, bound as both its past and its present."""
        for past, present, value in zip(self.decoder.past_names, self.decoder.present_names, self._rows(first, rows)):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)

    def _rows(self, first: int, rows: int) -> list:
        key = (first, rows)
        if key not in self._bound:
            self._bound[key] = [self.ort.OrtValue.ortvalue_from_numpy(buffer[first:first + rows])
                                for buffer in self.buffers]
        return self._bound[key]

    def _reserve(self, length: int) -> None:
        if length <= self.capacity:
            return
        capacity = grown_capacity(self.capacity, length, self.max_len)
        grown = []
        for buffer in self.buffers:
            bigger = np.zeros(buffer.shape[:2] + (capacity,) + buffer.shape[3:], dtype=buffer.dtype)
            bigger[:, :, :self.capacity] = buffer
            grown.append(bigger)
        self.buffers, self.capacity = grown, capacity
        self._forget_bindings()

    def shutdown(self) -> None:
        super().shutdown()
        self._forget_bindings()

    def _forget_bindings(self) -> None:
        """Drop what is bound over the buffers (they were replaced, or are going)."""
        self._bound.clear()
        self._decode_steps.clear()

    def stats(self) -> dict[str, Any]:
        figures = super().stats()
        figures["kv_cache_bytes"] += sum(buffer.nbytes for buffer in self.buffers)
        return figures


class _DecodeStep:
    """A one-token step over slots 0..rows-1, bound once: the cache rows, the inputs and the logits."""

    def __init__(self, runner: StaticCacheRunner, rows: int):
        decoder, ort = runner.decoder, runner.ort
        self.ids = np.zeros((rows, 1), dtype=np.int64)
        self.positions = np.zeros((rows, 1), dtype=np.int64)
        self.seqlens = np.zeros(rows, dtype=np.int32)  # each row's length before this step = its new length - 1
        self.total = np.zeros((), dtype=np.int32)
        self.logits = np.zeros((rows, 1, decoder.vocab_size), dtype=decoder.logits_dtype)
        self.binding = decoder.session.io_binding()
        # the OrtValues share the arrays' memory on the CPU; kept here so the arrays outlive the binding
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in
                       (("input_ids", self.ids), ("position_ids", self.positions), (SEQLENS, self.seqlens),
                        (TOTAL, self.total))}
        for name, value in self.values.items():
            if name in decoder.input_names:
                self.binding.bind_ortvalue_input(name, value)
        self.values["logits"] = ort.OrtValue.ortvalue_from_numpy(self.logits)
        self.binding.bind_ortvalue_output("logits", self.values["logits"])
        runner._bind_cache(self.binding, 0, rows)
