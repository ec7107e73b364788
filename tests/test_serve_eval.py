"""Real evaluation and fuzzing clients against orion serve: lm-evaluation-harness and schemathesis.

lm-eval's `local-completions` backend scores three small tasks shipped in
tests/lm_eval_tasks/ (multiple choice, rolling perplexity, and generation
with four `until` strings at batch size 4) through the server, and its own
`hf` backend scores them on the same model in this process: every metric and
every document's result agree within 1e-3 (the hf reference runs one
document at a time, the server gets requests of four prompts). schemathesis then fuzzes the
server from its /openapi.json, and the server must neither answer 5xx nor
break its schema, and still be healthy.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server_process import serving

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
TASKS = ["orion_mc", "orion_rolling", "orion_gen"]
# lm-eval's context window. Its API backends keep max_length - 1 for the request (one token is generated after
# it) and cut rolling windows one shorter again, its hf backend cuts them at max_length: the API backend gets
# MAX_LENGTH + 2, so both score the same windows of MAX_LENGTH tokens.
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    with serving(tiny_llama, "--port", "0", "--max-model-len", "128", "--max-batch-size", "8",
                 cwd=tmp_path_factory.mktemp("serve-eval")) as process:
        yield process


def evaluate(model: str, model_args: str, batch_size: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS, batch_size=batch_size,
                                   task_manager=TaskManager(include_path=str(TASKS_DIR)), log_samples=True,
                                   random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)


def per_document(samples: list[dict]) -> list:
    """Each document's raw results: (loglikelihood, is_greedy) pairs, rolling loglikelihoods, or generations."""
    out = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        out.append([r[0] if isinstance(r, list) and len(r) == 1 else r for r in sample["resps"]])
    return out


def assert_close(ours, theirs, where: str) -> None:
    if isinstance(ours, (list, tuple)):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_close(a, b, f"{where}[{i}]")
    elif isinstance(ours, float) or isinstance(theirs, float):
        assert math.isclose(ours, theirs, rel_tol=1e-3, abs_tol=1e-3), f"{where}: {ours} != {theirs}"
    else:
        assert ours == theirs, f"{where}: {ours!r} != {theirs!r}"


def test_lm_eval_through_the_server_equals_lm_evals_hf_backend(server, tiny_llama, monkeypatch):
    monkeypatch.chdir(TASKS_DIR)  # the task YAMLs name their JSONL files relative to here
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    served = evaluate("local-completions", f"model=llama,base_url={server.url}/v1/completions,"
                      f"tokenizer={tiny_llama},tokenizer_backend=huggingface,tokenized_requests=True,"
                      f"max_length={MAX_LENGTH + 2},num_concurrent=1,max_retries=1", batch_size=4)
    # the reference one document at a time: hf's batched generate() left-pads, which moves positions
    reference = evaluate("hf", f"pretrained={tiny_llama},dtype=float32,device=cpu,max_length={MAX_LENGTH}",
                         batch_size=1)
    for task in TASKS:
        ours, theirs = served["results"][task], reference["results"][task]
        metrics = [k for k in theirs if "," in k and not k.endswith("_stderr,none")]
        assert metrics, theirs
        for key in metrics:
            assert_close(ours[key], theirs[key], f"{task} {key}")
        assert_close(per_document(served["samples"][task]), per_document(reference["samples"][task]), task)
    generations = [d[0] for d in per_document(served["samples"]["orion_gen"])]
    assert any(generations), "every generation is empty: the comparison proves little"


def test_schemathesis_finds_no_server_error_and_no_schema_violation(server, tmp_path):
    command = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{server.url}/openapi.json",
               "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
               "response_schema_conformance", "--max-examples", "15", "--seed", "1",
               "--request-timeout", "60", "--no-color"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
