"""Shard planning: execution order and the two ways of splitting, checked as properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orion_cli.shard.plan import (
    GROUP_EMBEDDINGS, GROUP_FINAL, GROUP_HEAD, GROUP_LAYERS, execution_order, layer_index, split_by_limit,
    split_into, tensor_group,
)


def test_llama_names_follow_the_forward_pass():
    stored = [  # as save_pretrained stores them: sorted by name
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.10.self_attn.q_proj.weight",
        "model.layers.2.input_layernorm.weight",
        "model.layers.9.mlp.down_proj.weight",
        "model.norm.weight",
    ]
    assert execution_order(stored) == [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.2.input_layernorm.weight",
        "model.layers.9.mlp.down_proj.weight",
        "model.layers.10.self_attn.q_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]


def test_gpt2_and_onnx_spellings():
    assert [tensor_group(n) for n in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.11.attn.c_attn.bias",
                                      "transformer.ln_f.weight", "lm_head.weight")] == \
        [GROUP_EMBEDDINGS, GROUP_EMBEDDINGS, GROUP_LAYERS, GROUP_FINAL, GROUP_HEAD]
    assert layer_index("transformer.h.11.attn.c_attn.bias") == 11
    assert layer_index("/model/layers.12/self_attn/q_proj/MatMul") == 12
    assert layer_index("model.layers.3.block_sparse_moe.experts.7.w1.weight") == 3
    assert layer_index("model.embed_tokens.weight") is None
    assert tensor_group("/lm_head/MatMul") == GROUP_HEAD


sizes_lists = st.lists(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=60)


def _covers_in_order(runs: list[range], count: int) -> bool:
    flat = [i for run in runs for i in run]
    return flat == list(range(count)) and all(len(run) > 0 for run in runs)


@given(sizes=sizes_lists, data=st.data())
def test_split_into_gives_exactly_n_balanced_contiguous_shards(sizes, data):
    count = data.draw(st.integers(min_value=1, max_value=len(sizes)))
    runs = split_into(sizes, count)
    assert len(runs) == count
    assert _covers_in_order(runs, len(sizes))
    largest_shard = max(sum(sizes[i] for i in run) for run in runs)
    # No plan can beat max(total/N, largest tensor); this one is within one tensor of an even split.
    assert largest_shard <= sum(sizes) / count + max(sizes)


def test_split_into_equal_tensors_is_even():
    runs = split_into([10] * 12, 4)
    assert [len(run) for run in runs] == [3, 3, 3, 3]


@pytest.mark.parametrize("count", [0, 4])
def test_split_into_rejects_impossible_counts(count):
    with pytest.raises(ValueError):
        split_into([1, 2, 3], count)


@given(costs=sizes_lists, limit=st.integers(min_value=1, max_value=12_000), fixed=st.integers(min_value=0, max_value=500))
def test_split_by_limit_never_exceeds_the_limit_except_alone(costs, limit, fixed):
    split = split_by_limit(costs, limit, fixed)
    assert _covers_in_order(split.runs, len(costs))
    assert split.oversized == [i for i, cost in enumerate(costs) if fixed + cost > limit]
    for position, run in enumerate(split.runs):
        used = fixed + sum(costs[i] for i in run)
        if len(run) == 1 and run[0] in split.oversized:
            continue
        assert used <= limit
        following = split.runs[position + 1] if position + 1 < len(split.runs) else None
        if following is not None and following[0] not in split.oversized:
            # greedy: a shard closes only when the next tensor would not fit
            assert used + costs[following[0]] > limit
