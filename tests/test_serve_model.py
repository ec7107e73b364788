"""The served model against transformers, for every architecture in the table, at every parallel layout.

At tp=1 the stage model (transformers' own modules, orion's attention and KV
cache) runs in this process; tp=2, pp=2 and tp=2 x pp=2 run the whole engine
(worker specs as `orion serve` builds them, the scheduler, the ranks, the
stage links) in real gloo processes, one launch per layout covering every
architecture. Each decodes the prompts together (batched prefill with padding,
batched decode) and the first prompt alone, and must reproduce transformers'
greedy generate() token for token. The prompts are longer than the tiny
models' sliding windows and than the RoPE variants' original lengths, but for
one that crosses it while decoding (Phi-3's longrope recomputes there).
"""

from __future__ import annotations

import pytest
import torch

from orion_cli.errors import ModelDirError, UsageError
from orion_cli.serve.plans import Shape, check_parallel, model_plan, split_layers
from orion_cli.serve.protocol import SamplingSpec
from orion_cli.serve.sampling import Sampler
from orion_cli.serve.stage_link import pack_rows, unpack_rows
from orion_cli.serve.text import TextStream
from tiny_models import (ARCHITECTURES, build_model, doge_config, lfm2_config, modernbert_decoder_config,
                         tiny_config, torch_engine_runs)

from engine_testing import run_layout
from serve_testing import hf_greedy, hf_tokenizer, tokenize

PROMPTS = ["def main():\n    return 42 + x * y - z", "import os", "class Foo(object):\n    x = 1\n    y = 2\n"]
NEW_TOKENS = 10
LAYOUTS = [(2, 1), (1, 2), (2, 2)]
TORCH_ARCHITECTURES = [a for a in ARCHITECTURES if torch_engine_runs(a)]


def prompt_ids(model_dir) -> list[list[int]]:
    return [tokenize(model_dir, p) for p in PROMPTS]


def expected(model_dir) -> list[list[int]]:
    return [hf_greedy(model_dir, ids, NEW_TOKENS) for ids in prompt_ids(model_dir)]


def same_until_eos(got: list[list[int]], want: list[list[int]]) -> bool:
    """generate() stops at eos; the engine decodes on (ignore_eos), so compare what generate() produced."""
    return all(g[:len(w)] == w for g, w in zip(got, want))


def whole_stage(model_dir, slots: int, dtype: torch.dtype = torch.float32):
    """A stage model holding every layer, in this process."""
    from transformers import AutoConfig

    from orion_cli.checkpoint import CheckpointReader
    from orion_cli.serve.stage import StageModel
    from orion_cli.serve.tp import TPGroup, WeightLoader

    config = AutoConfig.from_pretrained(model_dir)
    with CheckpointReader(model_dir) as reader:
        return StageModel(config, range(Shape.of(config).num_layers), True, True, TPGroup(),
                          WeightLoader(reader, dtype, torch.device("cpu")), slots, 128)


def stage_greedy(model_dir, prompts: list[list[int]]) -> list[list[int]]:
    """Decode `prompts` together through a stage model holding every layer, in this process."""
    from orion_cli.serve.attention import Step

    stage = whole_stage(model_dir, len(prompts))
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    with torch.inference_mode():
        step = Step.make(True, 0, lengths, [0] * len(prompts), stage.device)
        tokens = stage.step(step, tokens=torch.tensor([p + [0] * (width - len(p)) for p in prompts])).argmax(-1)
        out, starts = [[int(t)] for t in tokens], list(lengths)
        for _ in range(NEW_TOKENS - 1):
            step = Step.make(False, 0, [1] * len(prompts), starts, stage.device)
            tokens = stage.step(step, tokens=tokens.view(-1, 1)).argmax(-1)
            for row, token in zip(out, tokens):
                row.append(int(token))
            starts = [s + 1 for s in starts]
    return out


@pytest.mark.parametrize("arch", [a for a in TORCH_ARCHITECTURES if a != "phi3-rope-longrope"])
def test_stage_model_reproduces_transformers_in_one_process(tiny_models, arch):
    """(longrope rebuilds its cache at the switch, which the scheduler does: it is checked in the engine test.)"""
    path = tiny_models[arch]
    assert same_until_eos(stage_greedy(path, prompt_ids(path)), expected(path))


@pytest.mark.parametrize("config, message", [
    (lfm2_config, "Lfm2ForCausalLM's layer 0 does not call the attention function"),
    (doge_config, "DogeForCausalLM's layer 0 hands the attention function a mask of its own"),
], ids=["convolution-layer", "own-mask"])
def test_a_layer_whose_state_or_mask_the_cache_would_drop_is_refused_at_load(tmp_path, config, message):
    """Both take attention functions, and both decoded wrong tokens before: LFM2's convolution layer keeps a
    state of its own (here the stage is built directly, past the config's layer_types check), and Doge's layers
    mask by the values they compute, a mask the engine's attention function ignored."""
    model = build_model(config(), tmp_path / "model")
    with pytest.raises(ModelDirError, match=message):
        stage_greedy(model, [[5, 17, 42]])


@pytest.mark.multiprocess
def test_modules_beside_the_base_model_and_the_head_are_loaded_on_the_last_stage(tmp_path):
    """ModernBERT-decoder runs a dense layer and a norm (`lm_head`) between its base model and its vocabulary
    projection (`decoder`). The stage read weights only for those two, so it failed to load ("no weight was
    loaded for model.lm_head.dense.weight"); now the last stage reads them and the others drop the module."""
    path = str(build_model(modernbert_decoder_config(), tmp_path / "modernbert-decoder"))
    prompts = prompt_ids(path)
    want = [hf_greedy(path, ids, NEW_TOKENS) for ids in prompts]
    assert same_until_eos(stage_greedy(path, prompts), want)
    split = run_layout(1, 2, {"modernbert-decoder": path}, prompts, NEW_TOKENS, tmp_path)
    assert same_until_eos(split["modernbert-decoder"]["batched"], want)


def test_deepseek_plans_split_heads_and_experts_and_keep_low_rank_projections_whole():
    """DeepSeek-V2's config splits q_a_proj, whose output feeds a norm over all its features (q_a_layernorm), and
    leaves the experts whole; V3's covers only its MLPs, in transformers' local styles. orion's additions
    (serve/plans.py) split both by heads and experts; the layout test decodes them at tp=2 as generate()."""
    v2, v3 = model_plan(tiny_config("deepseek_v2")), model_plan(tiny_config("deepseek_v3"))
    for plan in (v2, v3):
        assert plan.style_of("layers.0.self_attn.q_b_proj") == "colwise"
        assert plan.style_of("layers.0.self_attn.kv_b_proj") == "colwise"
        assert plan.style_of("layers.0.self_attn.o_proj") == "rowwise"
        assert plan.style_of("layers.1.mlp.experts.3.gate_proj") == "colwise"
        assert plan.style_of("layers.1.mlp.experts.3.down_proj") == "rowwise"
        assert plan.style_of("layers.0.self_attn.kv_a_proj_with_mqa") is None  # whole on every rank
    assert v2.style_of("layers.0.self_attn.q_a_proj") == "replicate"
    assert "local_colwise" not in v3.tp.values() and "gather" not in v3.tp.values()


def test_the_prompts_cover_sliding_windows_and_the_longrope_switch(tiny_models):
    from tiny_models import SLIDING_WINDOW

    first, crossing, third = (len(ids) for ids in prompt_ids(tiny_models["llama"]))  # one tokenizer for all
    assert first > SLIDING_WINDOW and third > SLIDING_WINDOW
    assert crossing <= 8 < crossing + NEW_TOKENS  # the rope variants' original length is 8


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", [(1, 1)] + LAYOUTS, ids=lambda v: str(v))
def test_the_engine_reproduces_transformers_at_every_layout(tiny_models, tmp_path, tp, pp):
    """One launch of tp x pp processes covers every architecture of the table."""
    models = {arch: str(tiny_models[arch]) for arch in TORCH_ARCHITECTURES}
    prompts = prompt_ids(tiny_models["llama"])  # one tokenizer for the whole table
    results = run_layout(tp, pp, models, prompts, NEW_TOKENS, tmp_path)
    wrong = []
    for arch, path in models.items():
        want = [hf_greedy(path, ids, NEW_TOKENS) for ids in prompts]
        if not same_until_eos(results[arch]["batched"], want):
            wrong.append(f"{arch} batched")
        if not same_until_eos(results[arch]["alone"], want[:1]):
            wrong.append(f"{arch} alone")
    assert not wrong, f"tp={tp} pp={pp}: differs from generate(): {wrong}"


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_a_cache_grown_for_a_long_prompt_survives_a_slot_move(tiny_llama, tmp_path, tp):
    """The crash of issue 12: a prompt past the first cache allocation (256) grows the cache; a shorter request
    finishing first then moves another into its slot. Every request must still get generate()'s tokens."""
    text = open(__file__).read()
    long_prompt = tokenize(tiny_llama, text)[:300]
    prompts = [long_prompt, tokenize(tiny_llama, PROMPTS[1]), tokenize(tiny_llama, PROMPTS[2])]
    counts = [12, 2, 8]  # the second ends first: the third moves from slot 2 to slot 1
    results = run_layout(tp, 1, {"llama": str(tiny_llama)}, prompts, counts, tmp_path, max_model_len=512)
    got = results["llama"]["batched"]
    want = [hf_greedy(tiny_llama, ids, n) for ids, n in zip(prompts, counts)]
    assert same_until_eos(got, want) and [len(g) for g in got] == counts


# -- plans and layouts ---------------------------------------------------------------------


def test_tensor_parallel_degree_is_checked_against_the_heads(tiny_models):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_models["llama"])  # 4 heads, 2 key/value heads
    plan = model_plan(config)
    for tp in (1, 2, 4):
        check_parallel(config, plan, tp, 1)
    with pytest.raises(UsageError, match=r"--tp 3: does not divide the model's 4 attention heads; choose one of 1, 2, 4"):
        check_parallel(config, plan, 3, 1)
    with pytest.raises(UsageError, match="--tp 8"):
        check_parallel(config, plan, 8, 1)


def test_a_model_without_plans_serves_at_tp1_pp1_only_and_says_why():
    from transformers import GPTNeoConfig

    config = GPTNeoConfig(architectures=["GPTNeoForCausalLM"])
    plan = model_plan(config)
    assert plan.source == "none"
    check_parallel(config, plan, 1, 1)
    with pytest.raises(UsageError, match=r"--tp 2: GPTNeoForCausalLM has no tensor-parallel plan"):
        check_parallel(config, plan, 2, 1)
    with pytest.raises(UsageError, match=r"--pp 2: GPTNeoForCausalLM has no pipeline-parallel plan"):
        check_parallel(config, plan, 1, 2)


def test_plans_come_from_the_config_or_from_orions_data(tiny_models):
    from transformers import AutoConfig

    llama, gpt2 = (model_plan(AutoConfig.from_pretrained(tiny_models[a])) for a in ("llama", "gpt2"))
    assert llama.source == "transformers config" and llama.style_of("layers.3.self_attn.o_proj") == "rowwise"
    assert llama.style_of("layers.3.input_layernorm") is None  # left out: replicated
    assert gpt2.source == "orion" and gpt2.style_of("h.0.attn.c_attn") == "colwise_rep"


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
        return [sampler.sample(logits[rows], [7, 8, 9][: len(rows)])[0].token for _ in range(5)]

    assert draw([0]) == draw([0, 1, 2])  # other requests in the batch change nothing
    greedy = Sampler()
    assert [r.token for r in greedy.sample(logits, [1, 2, 3])] == logits.argmax(-1).tolist()


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    sampler = Sampler()
    sampler.admit({1: SamplingSpec(temperature=1.0, top_p=0.7, seed=3)})
    drawn = {sampler.sample(logits.view(1, -1), [1])[0].token for _ in range(200)}
    assert drawn == {0, 1}


def test_penalties_follow_vllms_semantics():
    """Repetition divides positive and multiplies negative logits of prompt and generated tokens; frequency
    subtracts per occurrence of a generated token, presence once."""
    logits = torch.tensor([[2.0, -1.0, 1.5, 0.5, 1.9]])
    sampler = Sampler()
    sampler.admit({1: SamplingSpec(repetition_penalty=2.0)})
    assert sampler.sample(logits, [1], prompts=[[0, 1]])[0].token == 4  # 2.0 / 2 < 1.9
    sampler.admit({2: SamplingSpec(frequency_penalty=0.3)})
    first = sampler.sample(logits, [2], prompts=[[3]])[0].token
    second = sampler.sample(logits, [2])[0].token  # token 0 generated once: 2.0 - 0.3 = 1.7 < 1.9
    assert (first, second) == (0, 4)
    sampler.admit({3: SamplingSpec(presence_penalty=0.05)})
    tokens = [sampler.sample(logits, [3], prompts=[[3]] if i == 0 else None)[0].token for i in range(3)]
    assert tokens == [0, 0, 0]  # presence is subtracted once, however often: 1.95 > 1.9
    plain = Sampler()
    assert plain.sample(logits, [9])[0].token == 0


def test_logprobs_are_the_models_own_and_include_prompt_positions():
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(1))
    prompt_logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    sampler = Sampler()
    sampler.admit({1: SamplingSpec(logprobs=3, prompt_logprobs=2, repetition_penalty=1.5)})
    result = sampler.sample(logits, [1], prompts=[[5, 6, 7, 8]], prompt_logits=[prompt_logits])[0]
    reference = logits[0].log_softmax(-1)
    assert abs(result.logprob.logprob - reference[result.token].item()) < 1e-6  # before penalties
    assert [t for t, _ in result.logprob.top] == reference.topk(3).indices.tolist()
    assert result.prompt[0] is None and len(result.prompt) == 4
    scores = prompt_logits.log_softmax(-1)
    for position, entry in enumerate(result.prompt[1:]):
        assert entry.token == [6, 7, 8][position]
        assert abs(entry.logprob - scores[position, entry.token].item()) < 1e-6
        assert len(entry.top) == 2


def test_a_row_that_cannot_be_sampled_fails_alone():
    logits = torch.tensor([[float("nan")] * 4, [0.0, 1.0, 0.0, 0.0]])
    sampler = Sampler()
    sampler.admit({1: SamplingSpec(temperature=1.0, seed=1), 2: SamplingSpec()})
    bad, good = sampler.sample(logits, [1, 2])
    assert bad.error and good.error is None and good.token == 1


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


def test_one_requests_failure_fails_only_that_request(tiny_llama):
    """A row whose sampling failed (the sampler reports it) ends its request with a failure; the engine and the
    other requests go on."""
    import threading

    from orion_cli.serve.metrics import ServeMetrics
    from orion_cli.serve.sampling import Sampled
    from orion_cli.serve.scheduler import GenerationRequest, Scheduler

    class RowFailingRunner:  # a StepRunner whose second request's rows cannot be sampled
        def run(self, plan):
            if not plan.has_work:
                return [] if plan.kind == "stats" else None
            return [Sampled(-1, error="ValueError: bad row") if request_id == 2 else Sampled(5)
                    for request_id in plan.request_ids]

        def shutdown(self):
            pass

    scheduler = Scheduler(RowFailingRunner(), hf_tokenizer(str(tiny_llama)), set(), 4, 64, ServeMetrics())
    events: dict[int, list] = {1: [], 2: [], 3: []}
    done = {i: threading.Event() for i in events}

    def deliver_to(index):
        def deliver(event):
            events[index].append(event)
            if event.finish_reason or event.failure or event.error:
                done[index].set()
        return deliver

    for index in events:
        scheduler.submit(GenerationRequest([1, 2, 3], 4), deliver_to(index))
    scheduler.start()
    assert all(d.wait(30) for d in done.values())
    assert events[2][-1].failure == "ValueError: bad row"
    for index in (1, 3):
        assert events[index][-1].finish_reason == "length" and events[index][-1].completion_tokens == 4
    assert scheduler.healthy and scheduler.stop(10)


def test_a_repetition_penalty_near_zero_still_samples():
    """Dividing positive logits by 1e-300 makes them infinite; sampling must still draw among them."""
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    sampler = Sampler()
    sampler.admit({1: SamplingSpec(temperature=1.0, seed=0, repetition_penalty=1e-300)})
    result = sampler.sample(logits, [1], prompts=[[0, 1, 3]])[0]
    assert result.error is None and result.token in (0, 1, 3)


def test_finished_text_equals_decoding_every_token(tiny_llama):
    """A completion cut inside a UTF-8 character ends, as transformers' decode() shows it, in U+FFFD (the bug:
    the incremental decoder held those bytes back and the finished text dropped them)."""
    tokenizer = hf_tokenizer(str(tiny_llama))
    ids = tokenizer("naïve café ☕ 終わり")["input_ids"]
    cuts = [n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd")]
    assert cuts, "the tokenizer splits no character across tokens: pick another text"
    for cut in cuts[:3]:
        stream = TextStream(tokenizer)
        text = "".join(stream.push(token)[0] for token in ids[:cut]) + stream.finish()
        assert text == tokenizer.decode(ids[:cut], skip_special_tokens=True)


@pytest.mark.parametrize("dtype, flags, served", [
    ("bfloat16", {"avx2", "fma"}, "float32"),  # no native bf16: float32, saying why
    ("bfloat16", {"avx2", "avx512_bf16"}, "bfloat16"),
    ("bfloat16", {"amx_bf16"}, "bfloat16"),
    ("float16", {"avx2"}, "float32"),
    ("float16", {"avx512_fp16"}, "float16"),
    ("float32", {"avx2"}, "float32"),
    ("bfloat16", set(), "bfloat16"),  # flags unknown (no /proc/cpuinfo): as asked
])
def test_half_precision_on_cpu_needs_native_instructions(dtype, flags, served):
    from orion_cli.serve.options import cpu_dtype

    chosen, why = cpu_dtype(dtype, flags)
    assert chosen == served
    assert (why is not None) == (served != dtype)
    if why:
        assert why.startswith(f"--dtype {dtype}:") and "AVX512" in why


def test_a_loaded_stage_keeps_no_view_of_the_checkpoints_memory_map(tiny_llama, tmp_path):
    """A slice already in the served dtype (a float32 checkpoint served in float32) stayed a view of the memory map,
    which kept the map, and every page read at load, resident beside the rank's own copies: 270 MiB more on the
    88M Llama, 700 MiB on TinyLlama in bfloat16. Every placed tensor is now a copy, so closing the reader unmaps it."""
    import gc
    import shutil
    from pathlib import Path

    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    model = Path(shutil.copytree(tiny_llama, tmp_path / "model"))  # a file no other test has mapped
    stage = whole_stage(model, 1)
    gc.collect()
    checkpoints = [str(path.resolve()) for path in model.glob("*.safetensors")]
    assert checkpoints and stage.weight_bytes > 0
    assert not any(path in maps.read_text() for path in checkpoints)


def test_bfloat16_linears_run_on_the_packed_kernel_where_this_cpu_has_it(tiny_llama):
    """--dtype bfloat16 used to multiply by the checkpoint's layout (F.linear), about twice the time of oneDNN's
    packed kernel at one row; where oneDNN runs bfloat16 here every linear is now packed, and the logits are
    transformers' bfloat16 logits."""
    from transformers import AutoModelForCausalLM

    from orion_cli.serve.attention import Step
    from orion_cli.serve.kernels import DenseMatmul
    from orion_cli.serve.tp import ParallelLinear

    stage = whole_stage(tiny_llama, 1, torch.bfloat16)
    linears = [m for m in stage.modules() if isinstance(m, ParallelLinear)]
    packed = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert linears and all(isinstance(m.matmul, DenseMatmul) == packed for m in linears)
    assert all(m.matmul.packed.dtype == torch.bfloat16 for m in linears if packed)

    ids = prompt_ids(tiny_llama)[2]
    with torch.inference_mode():
        got = stage.step(Step.make(True, 0, [len(ids)], [0], stage.device), tokens=torch.tensor([ids]))
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
        want = model(torch.tensor([ids])).logits[:, -1].float()
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=0.05 * want.abs().max().item())
    assert got.argmax() == want.argmax()


def test_rank_zero_loads_its_stage_and_runs_every_plan_on_one_thread(tiny_llama, monkeypatch):
    """libgomp keeps an OpenMP pool per thread that starts a parallel region. Rank 0 used to load its stage on the
    main thread and run plans on the scheduler's: two pools, more OpenMP threads than cores, and libgomp then
    sleeps and wakes its workers around every matmul (29237 context switches against 2754 over 144 served tokens
    of the 88M Llama). Both now run on one compute thread (worker.start_driver)."""
    import threading

    import torch.distributed as dist

    from engine_testing import drive, free_port
    from orion_cli.config import shipped_config
    from orion_cli.modeldir import inspect_model_dir
    from orion_cli.serve.options import ServeJob, check_torch_options
    from orion_cli.serve.stage import StageModel
    from orion_cli.serve.worker import build_topology, start_driver

    threads: dict[str, set[int]] = {"load": set(), "step": set()}
    load, step = StageModel.__init__, StageModel.step

    def recorded_load(self, *args, **kwargs):
        threads["load"].add(threading.get_ident())
        load(self, *args, **kwargs)

    def recorded_step(self, *args, **kwargs):
        threads["step"].add(threading.get_ident())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(StageModel, "__init__", recorded_load)
    monkeypatch.setattr(StageModel, "step", recorded_step)
    shipped = shipped_config()
    settings = shipped.serve.model_copy(update={"backend": "gloo", "max_batch_size": 2})
    spec = check_torch_options(ServeJob(tiny_llama, "models.json", settings, shipped.codec),
                               inspect_model_dir(tiny_llama), "llama", None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        runner = start_driver(spec, build_topology(spec, 0, 0), torch.device("cpu"))
        got = drive(runner, runner.runtime, str(tiny_llama), prompt_ids(tiny_llama)[:2], [4, 4])
    finally:
        dist.destroy_process_group()
    assert all(len(tokens) == 4 for tokens in got["batched"])
    assert len(threads["load"]) == 1 and threads["step"] == threads["load"]
    assert threading.get_ident() not in threads["load"]


def test_cpu_ranks_serve_in_the_dtype_this_cpu_runs(tiny_llama):
    from orion_cli.config import shipped_config
    from orion_cli.modeldir import inspect_model_dir
    from orion_cli.serve.options import ServeJob, check_torch_options, cpu_dtype, cpu_flags

    shipped = shipped_config()
    settings = shipped.serve.model_copy(update={"dtype": "bfloat16", "backend": "gloo"})
    spec = check_torch_options(ServeJob(tiny_llama, "models.json", settings, shipped.codec),
                               inspect_model_dir(tiny_llama), "llama", None)
    expected, why = cpu_dtype("bfloat16", cpu_flags())
    assert spec.serve.dtype == expected
    assert (why in spec.notes) if why else not any("--dtype" in note for note in spec.notes)
