"""serve/prefix_cache.py: which cached prompt a new one reuses, and what is dropped when."""

from __future__ import annotations

import numpy as np

from orion_cli.serve.prefix_cache import PrefixCache


def arrays(length: int, fill: float = 0.0, layers: int = 2) -> list[np.ndarray]:
    """One [1, heads=2, length, head_dim=4] float32 array per past input: 32 bytes a position each."""
    return [np.full((1, 2, length, 4), fill, dtype=np.float32) for _ in range(layers)]


def test_the_longest_shared_start_is_reused_and_a_token_is_always_left_to_run():
    cache = PrefixCache(max_bytes=10_000)
    cache.add([1, 2, 3], arrays(3, 1.0))
    cache.add([1, 2, 9, 9, 9], arrays(5, 2.0))
    shared, past = cache.reuse([1, 2, 9, 9, 7])
    assert shared == 4 and past[0].shape == (1, 2, 4, 4) and (past[0] == 2.0).all()
    assert past[0].flags["C_CONTIGUOUS"]  # onnxruntime's inputs
    assert cache.reuse([1, 2, 3])[0] == 2  # the whole prompt is cached: its last token still runs
    assert cache.reuse([5, 6]) == (0, None)
    assert cache.reuse([1]) == (0, None)


def test_an_entry_that_starts_a_newer_one_is_dropped():
    cache = PrefixCache(max_bytes=10_000)
    cache.add([1, 2], arrays(2))
    cache.add([1, 2, 3, 4], arrays(4))
    assert len(cache) == 1 and cache.nbytes == sum(a.nbytes for a in arrays(4))


def test_the_least_recently_used_entries_go_first_past_the_budget():
    per_position = 2 * 2 * 4 * 4  # layers * heads * head_dim * float32
    cache = PrefixCache(max_bytes=10 * per_position)
    cache.add([1, 1, 1, 1], arrays(4))
    cache.add([2, 2, 2, 2], arrays(4))
    cache.reuse([1, 1, 1, 1, 5])  # entry 1 used: entry 2 is now the oldest
    cache.add([3, 3, 3, 3], arrays(4))
    assert cache.reuse([2, 2, 2, 2, 5]) == (0, None)
    assert cache.reuse([1, 1, 1, 1, 5])[0] == 4 and cache.reuse([3, 3, 3, 3, 5])[0] == 4
    assert cache.nbytes == 8 * per_position


def test_a_prompt_larger_than_the_whole_budget_is_not_kept():
    cache = PrefixCache(max_bytes=100)
    cache.add([1, 2, 3, 4, 5], arrays(5))
    assert len(cache) == 0 and cache.nbytes == 0


def test_a_prompt_past_the_longest_served_is_neither_kept_nor_reused():
    """Phi-3's longrope computes such a prompt with other factors than the shorter ones sharing its start."""
    cache = PrefixCache(max_bytes=10_000, longest=4)
    cache.add([1, 2, 3, 4, 5], arrays(5))
    assert len(cache) == 0
    cache.add([1, 2, 3, 4], arrays(4))
    assert cache.reuse([1, 2, 3, 4, 5]) == (0, None) and cache.reuse([1, 2, 3, 9])[0] == 3
