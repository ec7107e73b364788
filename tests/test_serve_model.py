"""The sharded decoder against transformers, for every architecture, and its pure-Python parts.

tp=1 runs in this process; tp=2 runs in two real gloo processes, also with
one key/value head (replicated on both ranks). Each decodes three prompts together,
prefill batched with padding and decode steps batched, and must reproduce
transformers' greedy generate() token for token.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from orion_cli.errors import UnsupportedModelError, UsageError
from orion_cli.serve.architectures import check_tensor_parallel, model_shape, split_layers
from orion_cli.serve.stage_link import pack_rows, unpack_rows
from orion_cli.serve.protocol import SamplingSpec
from orion_cli.serve.sampling import Sampler
from orion_cli.serve.text import TextStream
from tiny_models import CORE as ARCHITECTURES

from serve_testing import free_port, hf_greedy, hf_tokenizer, tokenize

PROMPTS = ["def main():\n    return", "import os", "class Foo(object):\n  x = 1"]
NEW_TOKENS = 10


def greedy_batch(model_dir: str, tp_rank: int = 0, tp_size: int = 1, group=None) -> list[list[int]]:
    """Decode PROMPTS together through a StageModel holding every layer, as rank `tp_rank` of `tp_size`."""
    from transformers import AutoConfig

    from orion_cli.checkpoint import CheckpointReader
    from orion_cli.serve.model import StageModel, make_batch
    from orion_cli.serve.tp import TPGroup, WeightLoader

    config = AutoConfig.from_pretrained(model_dir)
    shape = model_shape(config)
    with CheckpointReader(model_dir) as reader:
        stage = StageModel(shape, config, range(shape.num_layers), True, True, TPGroup(tp_rank, tp_size, group),
                           WeightLoader(reader, torch.float32, torch.device("cpu")), len(PROMPTS), 128)
    ids = [tokenize(model_dir, p) for p in PROMPTS]
    lengths = [len(x) for x in ids]
    width = max(lengths)
    with torch.inference_mode():
        batch = stage.prepare(make_batch(True, 0, lengths, [0] * len(ids), shape.sliding_window, stage.device),
                              torch.float32)
        tokens = torch.tensor([x + [0] * (width - len(x)) for x in ids])
        next_tokens = stage.logits(stage(stage.embed_tokens(tokens, batch), batch), batch).argmax(-1)
        out = [[int(t)] for t in next_tokens]
        starts = list(lengths)
        for _ in range(NEW_TOKENS - 1):
            batch = stage.prepare(make_batch(False, 0, [1] * len(ids), starts, shape.sliding_window, stage.device),
                                  torch.float32)
            hidden = stage(stage.embed_tokens(next_tokens.view(-1, 1), batch), batch)
            next_tokens = stage.logits(hidden, batch).argmax(-1)
            for row, token in zip(out, next_tokens):
                row.append(int(token))
            starts = [s + 1 for s in starts]
    return out


def expected(model_dir: str) -> list[list[int]]:
    return [hf_greedy(model_dir, tokenize(model_dir, p), NEW_TOKENS) for p in PROMPTS]


def same_until_eos(got: list[list[int]], want: list[list[int]]) -> bool:
    """generate() stops at eos; the batch decodes on, so compare what generate() produced."""
    return all(g[:len(w)] == w for g, w in zip(got, want))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_stage_model_reproduces_transformers_at_tp1(tiny_models, arch):
    path = str(tiny_models[arch])
    assert same_until_eos(greedy_batch(path), expected(path))


def one_kv_head_copy(model_dir: Path, output: Path) -> str:
    """The tiny model's architecture with a single key/value head (multi-query attention), random init."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.num_key_value_heads = 1
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(output)
    hf_tokenizer(str(model_dir)).save_pretrained(output)
    return str(output)


def _tensor_parallel_worker(rank: int, port: int, models: dict, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {name: greedy_batch(path, rank, 2, dist.group.WORLD) for name, path in models.items()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_tensor_parallel_ranks_reproduce_transformers(tiny_models, tmp_path):
    """tp=2 for every architecture, and for Llama and Phi-3 with one key/value head (replicated on both ranks)."""
    import torch.multiprocessing as mp

    models = {arch: str(tiny_models[arch]) for arch in ARCHITECTURES}
    for arch in ("llama", "phi3"):
        models[f"{arch}-one-kv-head"] = one_kv_head_copy(tiny_models[arch], tmp_path / f"{arch}-mqa")
    mp.spawn(_tensor_parallel_worker, args=(free_port(), models, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name, path in models.items():
        assert same_until_eos(ranks[0][name], expected(path)), name
        assert ranks[1][name] == ranks[0][name], name  # both ranks gathered the same logits


# -- shapes and layouts -----------------------------------------------------------------


def test_tensor_parallel_degree_is_checked_against_the_heads(tiny_models):
    from transformers import AutoConfig

    shape = model_shape(AutoConfig.from_pretrained(tiny_models["llama"]))  # 4 heads, 2 key/value heads
    for tp in (1, 2, 4):
        check_tensor_parallel(shape, tp)
    with pytest.raises(UsageError, match=r"--tp 3: does not divide the model's 4 attention heads; choose one of 1, 2, 4"):
        check_tensor_parallel(shape, 3)
    with pytest.raises(UsageError, match="--tp 8"):
        check_tensor_parallel(shape, 8)


def test_unsupported_architectures_are_named(tmp_path):
    from transformers import BertConfig

    with pytest.raises(UnsupportedModelError, match="'BertForMaskedLM'.*supported: gpt2, llama, mistral, phi3, qwen2"):
        model_shape(BertConfig(architectures=["BertForMaskedLM"]))


def test_layer_split_even_or_as_asked():
    assert split_layers(24, 2, None) == [range(0, 12), range(12, 24)]
    assert split_layers(5, 3, None) == [range(0, 2), range(2, 4), range(4, 5)]
    assert split_layers(24, 2, "10,14") == [range(0, 10), range(10, 24)]
    for split, message in (("10,10", "sums to 20 layers but the model has 24"), ("24", "gives 1 stages but --pp is 2"),
                           ("a,b", "expected comma-separated"), ("0,24", "at least one layer")):
        with pytest.raises(UsageError, match=message):
            split_layers(24, 2, split)
    with pytest.raises(UsageError, match="--pp 30: the model has only 24 layers"):
        split_layers(24, 30, None)


def test_padding_is_not_sent_between_stages():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    packed = pack_rows(hidden, [4, 2])
    assert packed.shape == (6, 3)
    restored = unpack_rows(packed, [4, 2])
    assert torch.equal(restored[0], hidden[0]) and torch.equal(restored[1, :2], hidden[1, :2])
    assert torch.equal(unpack_rows(pack_rows(hidden, [4, 4]), [4, 4]), hidden)


# -- sampling and text ----------------------------------------------------------------------


def test_sampling_depends_only_on_the_requests_seed():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    spec = SamplingSpec(temperature=1.0, top_p=0.9, seed=42)

    def draw(rows: list[int]) -> list[int]:
        sampler = Sampler()
        sampler.admit({7: spec, 8: SamplingSpec(temperature=1.0, seed=1), 9: SamplingSpec()})
        return [sampler.sample(logits[rows], [7, 8, 9][: len(rows)])[0] for _ in range(5)]

    assert draw([0]) == draw([0, 1, 2])  # other requests in the batch change nothing
    greedy = Sampler()
    assert greedy.sample(logits, [1, 2, 3]) == logits.argmax(-1).tolist()


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    sampler = Sampler()
    sampler.admit({1: SamplingSpec(temperature=1.0, top_p=0.7, seed=3)})
    drawn = {sampler.sample(logits.view(1, -1), [1])[0] for _ in range(200)}
    assert drawn == {0, 1}


def test_text_stream_holds_back_possible_stop_strings(tiny_llama):
    tokenizer = hf_tokenizer(str(tiny_llama))
    text = "def main():\n    return 42\n"
    ids = tokenizer(text)["input_ids"]

    def run(stop):
        stream, pieces, stopped = TextStream(tokenizer, stop), [], False
        for token in ids:
            piece, stopped = stream.push(token)
            pieces.append(piece)
            if stopped:
                break
        if not stopped:
            pieces.append(stream.flush())
        return "".join(pieces), stopped, pieces

    assert run(None)[:2] == (text, False)
    joined, stopped, pieces = run(["return"])
    assert (joined, stopped) == ("def main():\n    ", True)
    assert not any("ret" in p for p in pieces)
    assert run(["zzz"])[:2] == (text, False)
