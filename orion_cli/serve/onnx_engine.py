"""ONNX models in onnxruntime with the exported graph's own attention: the runner for graphs onnx_attention.py
does not rewrite (onnx_static.py runs the others; onnx_serving.py picks).

The model runs through orion's one ONNX runner (onnx_decoder.OnnxDecoder,
sharded external data included), which reads the cache's shape from the graph. The scheduler
is the same as for torch ranks: each running request owns a slot holding its
past keys and values; a decode step left-pads every slot's past to the longest
and masks the padding, so requests of different lengths share one session
run. Tensor and pipeline parallelism do not apply: there is one process.

The batch stays assembled between decode steps (_LiveBatch): the presents a
step returns, left-padded [rows, heads, width, head_dim] OrtValues bound
through IO binding, are the next step's past as they are, with one more mask
column. Only a change of the batch (a prefill, a finished request, a slot
move) splits it back into slots, and the next step pads once. Padding every
step instead cost 36% of a single stream's time at 600 tokens on the 88M
model of benchmarks/serve_peer.py.

A prefill first looks in the prefix cache (prefix_cache.py) for the
longest already computed start of its prompt, and runs only the rest.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from ..errors import UsageError
from ..onnx_decoder import OnnxDecoder
from .prefix_cache import PrefixCache
from .protocol import StepPlan
from .sampling import Sampler


class OnnxRunner:
    """The scheduler's StepRunner over one OnnxDecoder."""

    def __init__(self, decoder: OnnxDecoder, prefix_cache_bytes: int = 0, recompute_at: int | None = None):
        import torch

        self.torch = torch
        self.decoder = decoder
        if not decoder.past_names:
            raise UsageError("MODEL_DIR: the ONNX model has no key/value cache inputs; export it with task "
                             "text-generation-with-past")
        self.slots: dict[int, list[np.ndarray]] = {}  # slot -> past arrays, in past_names order
        self.live: _LiveBatch | None = None  # slots 0..rows-1 after the last decode step, not yet split
        self.sampler = Sampler()
        self.weight_bytes = 0
        self.attention = "exported"  # what runs each layer's attention, for /v1/models and the log
        self.fused_projections = 0  # groups of quantized projections run as one product (onnx_fusion.py)
        self.prefix_cache = PrefixCache(prefix_cache_bytes, longest=recompute_at) if prefix_cache_bytes else None

    def run(self, plan: StepPlan) -> Any:
        if self.live is not None and not self.live.continues(plan):
            self._split_live()
        for source, target in plan.moves:
            self._move(source, target)
        self.sampler.release(plan.release)
        self.sampler.admit(plan.admit)
        if plan.kind == "stats":
            return [self.stats()]
        if plan.kind == "prefill":
            wanted = self.sampler.wants_prompt_logprobs(plan.request_ids)
            every, cached = zip(*[self._prefill(plan.first_slot + row, tokens, want)
                                  for row, (tokens, want) in enumerate(zip(plan.tokens, wanted))])
            last = self.torch.from_numpy(np.stack([logits[-1] for logits in every]))
            scored = [self.torch.from_numpy(logits) if want else None for logits, want in zip(every, wanted)]
            results = self.sampler.sample(last, plan.request_ids, plan.tokens, scored)
            for result, reused in zip(results, cached):
                result.cached_prompt_tokens = reused
            return results
        if plan.kind == "decode":
            logits = self._decode(plan.tokens, plan.starts)
            return self.sampler.sample(self.torch.from_numpy(logits), plan.request_ids)
        return None

    def _move(self, source: int, target: int) -> None:
        self.slots[target] = self.slots.pop(source)

    def shutdown(self) -> None:
        self.slots.clear()
        self.live = None

    def _prefill(self, slot: int, tokens: list[int], every_position: bool) -> tuple[np.ndarray, int]:
        """([positions, vocab] logits: every position when scoring the prompt, else the last only; how many
        prompt positions came from the prefix cache)."""
        cached, past = self._reuse(tokens, every_position)
        logits, presents = self.decoder.run(np.array([tokens[cached:]], dtype=np.int64), None, None, past)
        self.slots[slot] = presents
        self._remember(tokens, lambda: presents)
        return (logits[0] if every_position else logits[0, -1:]).astype(np.float32), cached

    def _reuse(self, tokens: list[int], every_position: bool) -> tuple[int, list[np.ndarray] | None]:
        """What the prefix cache holds of `tokens`' start; nothing for a prompt scored at every position."""
        if self.prefix_cache is None or every_position:
            return 0, None
        return self.prefix_cache.reuse(tokens)

    def _remember(self, tokens: list[int], arrays: Callable[[], list[np.ndarray]]) -> None:
        """Keep a prefilled prompt's cache (`arrays` called only when the prefix cache will keep it)."""
        if self.prefix_cache is not None and self.prefix_cache.keeps(tokens):
            self.prefix_cache.add(tokens, arrays())

    def _decode(self, tokens: list[list[int]], starts: list[int]) -> np.ndarray:
        ids = np.array(tokens, dtype=np.int64)
        positions = np.array(starts, dtype=np.int64)[:, None]
        if self.live is not None:  # the same rows as the last step, one token further
            mask = np.concatenate([self.live.mask, np.ones((len(starts), 1), dtype=np.int64)], axis=1)
            past = self.live.presents
        else:
            mask, past = self._pad(starts)
        logits, presents = self.decoder.run_bound(ids, mask, positions, past)
        self.live = _LiveBatch([start + 1 for start in starts], mask, presents)
        return logits[:, -1].astype(np.float32)

    def _pad(self, starts: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Slots 0..rows-1 left-padded to the longest past, and the mask hiding the padding."""
        rows, longest = len(starts), max(starts)
        mask = np.zeros((rows, longest + 1), dtype=np.int64)
        # each past padded in its own shape: values may have a head size of their own (multi-head latent attention)
        past = [np.zeros((rows, own.shape[1], longest, own.shape[3]), dtype=own.dtype) for own in self.slots[0]]
        for row, start in enumerate(starts):
            mask[row, longest - start:] = 1
            for padded, own in zip(past, self.slots[row]):
                padded[row, :, longest - start:] = own[0, :, :start]
        return mask, past

    def _split_live(self) -> None:
        """Each row of the live batch back into its slot (unpadded views of one copy out of onnxruntime)."""
        live, self.live = self.live, None
        arrays = [value.numpy() for value in live.presents]
        width = live.mask.shape[1]
        for row, start in enumerate(live.starts):
            self.slots[row] = [array[row:row + 1, :, width - start:] for array in arrays]

    def stats(self) -> dict[str, Any]:
        import psutil

        held = [a for arrays in self.slots.values() for a in arrays]
        held += self.prefix_cache.arrays() if self.prefix_cache is not None else []
        cache = sum({id(a): a.nbytes for a in held}.values())  # a prefilled slot and its cache entry share arrays
        if self.live is not None:
            itemsize = np.dtype(self.decoder.past_dtype).itemsize
            cache += sum(int(np.prod(value.shape())) * itemsize for value in self.live.presents)
        return {"rank": 0, "global_rank": 0, "node": 0, "stage": 0, "tp_rank": 0, "pid": os.getpid(),
                "weight_bytes": self.weight_bytes, "kv_cache_bytes": cache,
                "resident_bytes": psutil.Process().memory_info().rss}


class _LiveBatch:
    """The last decode step's rows: their lengths after it, its mask, and its presents (onnxruntime's memory)."""

    def __init__(self, starts: list[int], mask: np.ndarray, presents: list):
        self.starts, self.mask, self.presents = starts, mask, presents

    def continues(self, plan: StepPlan) -> bool:
        """Whether `plan` leaves these rows as they are: the next decode step of exactly them, or no work."""
        if plan.moves or plan.kind == "prefill":
            return False
        return plan.kind != "decode" or list(plan.starts) == self.starts
