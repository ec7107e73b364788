"""Prompts' key/value caches kept after their prefill, so a request that starts the same way prefills only the rest.

Chat clients send the whole conversation with every turn, and many requests
share a system prompt or few-shot examples. vLLM (automatic prefix caching)
and llama-server (each slot keeps its last prompt) both skip what they have
already computed; this is the same for orion's onnxruntime engine.

An entry is one prompt's token ids and its cache arrays ([1, heads, length,
head_dim] per past input), shared with the slot that prefilled them, never
written to afterwards. A lookup finds the entry sharing the longest prefix
with a new prompt. Entries are dropped least recently used first, past
`max_bytes`; an entry that is a prefix of a newer one is dropped at once,
since the newer one serves every prompt it would.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class _Entry:
    tokens: np.ndarray  # int64 [length]
    arrays: list[np.ndarray]  # each [1, heads, length, head_dim]
    nbytes: int


class PrefixCache:
    def __init__(self, max_bytes: int, longest: int | None = None):
        """`longest`: prompts past it are neither reused nor kept (Phi-3's longrope computes them with other
        factors than the shorter prompts that would share their start)."""
        self.max_bytes = max_bytes
        self.longest = longest
        self.nbytes = 0
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def arrays(self) -> list[np.ndarray]:
        return [a for entry in self._entries.values() for a in entry.arrays]

    def keeps(self, prompt: list[int]) -> bool:
        return self.longest is None or len(prompt) <= self.longest

    def reuse(self, prompt: list[int]) -> tuple[int, list[np.ndarray] | None]:
        """(n, the first n positions' arrays) of the entry sharing the longest prefix with `prompt`, n at most
        len(prompt) - 1 so that a step is left to produce the next token's logits; (0, None) without one."""
        if not self._entries or len(prompt) < 2 or not self.keeps(prompt):
            return 0, None
        tokens = np.asarray(prompt, dtype=np.int64)
        best_key, best = None, 0
        for key, entry in self._entries.items():
            shared = _common_prefix(entry.tokens, tokens)
            if shared > best:
                best_key, best = key, shared
        usable = min(best, len(prompt) - 1)
        if best_key is None or usable == 0:
            return 0, None
        self._entries.move_to_end(best_key)
        arrays = self._entries[best_key].arrays
        if usable == arrays[0].shape[2]:
            return usable, arrays
        return usable, [np.ascontiguousarray(a[:, :, :usable]) for a in arrays]

    def add(self, prompt: list[int], arrays: list[np.ndarray]) -> None:
        if not self.keeps(prompt):
            return
        key = tuple(prompt)
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        nbytes = sum(a.nbytes for a in arrays)
        if nbytes > self.max_bytes:
            return
        tokens = np.asarray(prompt, dtype=np.int64)
        for old_key in [k for k, e in self._entries.items()
                        if len(e.tokens) < len(tokens) and _common_prefix(e.tokens, tokens) == len(e.tokens)]:
            self._drop(old_key)
        self._entries[key] = _Entry(tokens, arrays, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[int, ...]) -> None:
        self.nbytes -= self._entries.pop(key).nbytes


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differs = np.flatnonzero(a[:n] != b[:n])
    return int(differs[0]) if len(differs) else n
