"""orion serve when things go wrong: startup errors before any worker, dying workers, restarts."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import httpx
import psutil
import pytest

from server_process import ServerProcess

from serve_testing import hf_greedy, tokenize


def _no_children() -> bool:
    """No process of orion's: multiprocessing's resource tracker, which a spawn-based engine test earlier in this
    pytest process starts and keeps for the process's lifetime, does not count."""
    def orions(child: psutil.Process) -> bool:
        try:
            return "multiprocessing.resource_tracker" not in " ".join(child.cmdline())
        except psutil.NoSuchProcess:  # gone since it was listed
            return False

    return not [child for child in psutil.Process().children(recursive=True) if orions(child)]


@pytest.mark.parametrize("args, code, message", [
    (["./no-such-model"], 1, "MODEL_DIR ./no-such-model: neither a directory nor a key in registry"),
    (["{llama}", "--tp", "3"], 2, "--tp 3: does not divide the model's 4 attention heads; choose one of 1, 2, 4"),
    (["{llama}", "--pp", "2", "--pp-split", "1,2"], 2, "--pp-split 1,2: sums to 3 layers but the model has 2"),
    (["{llama}", "--nnodes", "2", "--node-rank", "2"], 2, "--node-rank 2: must be below --nnodes 2"),
    (["{llama}", "--activation-codec", "gzip"], 2, "--activation-codec gzip: choose from"),
    (["{llama}", "--max-batch-size", "0"], 2, "--max-batch-size 0: must be at least 1"),
])
def test_startup_errors_are_one_line_before_any_worker(orion, tiny_llama, args, code, message):
    result = orion("serve", *[a.replace("{llama}", str(tiny_llama)) for a in args])
    assert result.exit_code == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("orion: error: ") and message in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert _no_children()


def test_nccl_without_cuda_is_refused(orion, tiny_llama):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = orion("serve", tiny_llama, "--backend", "nccl")
    assert result.exit_code == 2
    assert "--backend nccl: CUDA is not available on this machine; use --backend gloo" in result.stderr
    assert _no_children()


def test_port_in_use_is_an_error_before_any_worker(orion, tiny_llama):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = orion("serve", tiny_llama, "--port", str(port), "--json")
    assert result.exit_code == 1
    assert f"--host 127.0.0.1 --port {port}: cannot listen there (Address already in use)" in result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["error"]["exit_code"] == 1
    assert _no_children()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_dead_worker_fails_in_flight_requests_then_the_group_restarts_then_gives_up(tiny_llama, tmp_path):
    """--max-restarts 1: the first death is survived (503 in flight, served after), the second ends the server."""
    server = ServerProcess(tiny_llama, "--tp", "2", "--port", "0", "--max-restarts", "1", cwd=tmp_path).start()
    try:
        server.wait_ready()
        url = server.url
        long_request = {"model": "llama", "prompt": "import os", "max_tokens": 400, "temperature": 0,
                        "ignore_eos": True}
        outcome: dict[str, object] = {}

        def non_streaming() -> None:
            outcome["response"] = httpx.post(f"{url}/v1/completions", json=long_request, timeout=60)

        waiter = threading.Thread(target=non_streaming)
        with httpx.stream("POST", f"{url}/v1/completions", json={**long_request, "stream": True},
                          timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: {")
            waiter.start()
            time.sleep(0.05)
            os.kill(server.ready["ranks"][1]["pid"], signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        waiter.join(60)
        # the in-flight requests are answered 503, not left hanging
        error = json.loads(rest[-1][6:])["error"]
        assert error["type"] == "service_unavailable" and "[DONE]" not in rest[-1]
        assert outcome["response"].status_code == 503
        assert outcome["response"].json()["error"]["type"] == "service_unavailable"

        again = server.wait_event("ready", timeout=240)  # torchrun restarted the group
        assert again["restart"] == 1 and again["url"] == url
        prompt = "def main():\n    return"
        reply = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "llama", "prompt": prompt, "max_tokens": 8, "temperature": 0, "return_token_ids": True})
        assert reply.json()["choices"][0]["token_ids"] == hf_greedy(tiny_llama, tokenize(tiny_llama, prompt), 8)

        # no restarts left: the next death ends the server, non-zero, within seconds
        killed_at = time.monotonic()
        os.kill(again["ranks"][1]["pid"], signal.SIGKILL)
        health_failed = None
        while time.monotonic() - killed_at < 30:
            try:
                ok = httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                ok = False
            if not ok:
                health_failed = time.monotonic() - killed_at
                break
            time.sleep(0.1)
        assert health_failed is not None and health_failed < 15
        code = server.wait(30)
        assert code == 1, server.stderr
        assert time.monotonic() - killed_at < 30
        last = server.stderr.strip().splitlines()[-1]
        assert last.startswith("orion: error: worker rank 1") and "SIGKILL" in last, server.stderr
    finally:
        server.stop()
        leftovers = server.kill_leftovers()
        assert not leftovers, f"processes left behind: {leftovers}"


@pytest.mark.parametrize("config, flags, code, message", [
    ({"model_type": "my_custom", "auto_map": {"AutoConfig": "configuration_custom.MyConfig",
                                              "AutoModelForCausalLM": "modeling_custom.MyModel"}},
     (), 2, "names custom modeling code (auto_map); pass --trust-remote-code to run it"),
    ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]},
     (), 1, "architecture T5ForConditionalGeneration (model_type 't5') has no causal-LM class in transformers"),
    # served whole, `--engine auto` gives such a model to onnxruntime (test_serve_onnx_export.py); split, it cannot
    ({"model_type": "stablelm", "architectures": ["StableLmForCausalLM"]},
     ("--tp", "2"), 1, "takes no attention function, so the torch engine (whose KV cache is an attention function) "
                       "cannot run it; serve it in one process with --engine onnxruntime"),
    # layers whose state is not keys and values: before, served with that state dropped at every step (wrong tokens)
    ({"model_type": "lfm2", "architectures": ["Lfm2ForCausalLM"], "layer_types": ["conv", "full_attention"]},
     ("--engine", "torch"), 1, "has layers of type 'conv' (config.json layer_types), whose state is not a key/value "
                               "cache"),
    ({"model_type": "minimax", "architectures": ["MiniMaxForCausalLM"],
      "layer_types": ["linear_attention", "full_attention"]},
     ("--tp", "2"), 1, "has layers of type 'linear_attention' (config.json layer_types)"),
], ids=["remote-code", "no-causal-lm-class", "no-attention-functions", "convolution-layers", "linear-attention"])
def test_what_cannot_run_is_refused_with_the_reason(orion, tiny_llama, tmp_path, config, flags, code, message):
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "config.json").write_text(json.dumps({**json.loads((model / "config.json").read_text()), **config}))
    result = orion("serve", model, "--port", "0", *flags)
    assert result.exit_code == code, result.stderr
    assert message in result.stderr.strip().splitlines()[-1], result.stderr
    assert _no_children()
