"""From an OpenAI request body to the scheduler's GenerationRequests: one per sequence the client asked for.

A completion request may carry several prompts (strings or token-id lists),
each answered `n` times (or `best_of` times, the best `n` by cumulative
log-probability kept): every one of those sequences joins the continuous
batch as if it were a request of its own. Choice `i * n + j` is prompt i's
j-th sequence, as in vLLM. With a seed, sequence j samples with seed + j, so
the choices differ and the request is still reproducible.

These functions run off the event loop (tokenizing a 5 MB prompt takes
seconds); they raise RequestError, which the API answers with 400.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .scheduler import GenerationRequest
from .schemas import MAX_SEQUENCES, MAX_STOP, ChatCompletionRequest, ChatMessage, CompletionRequest, _Sampling

GREEDY_BELOW = 1e-5  # temperatures below this are greedy (dividing logits by 1e-40 overflows), as in vLLM
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


@dataclass
class Plan:
    """What one HTTP request asks the scheduler for."""

    prompts: list[list[int]]
    sequences: list[GenerationRequest]  # prompt-major: prompt i's sequences are [i * per_prompt, (i + 1) * per_prompt)
    per_prompt: int  # best_of, or n
    n: int  # choices returned per prompt
    logprobs: int | None  # alternatives per token the client asked for (None: no log-probabilities)
    echo: bool = False

    def prompt_of(self, sequence: int) -> int:
        return sequence // self.per_prompt


def plan_completion(body: CompletionRequest, served: Any) -> Plan:
    unsupported(body, suffix=None)
    prompts = completion_prompts(body.prompt, served)
    per_prompt = body.best_of or body.n
    if per_prompt < body.n:
        raise RequestError(f"best_of: must be at least n ({body.best_of} < {body.n})", "best_of")
    if per_prompt > body.n and body.stream:
        raise RequestError("best_of: cannot stream when best_of is larger than n (the best are known at the end)",
                           "best_of")
    max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise RequestError("max_tokens: must be at least 1, unless echo scores the prompt only", "max_tokens")
    ranking = 0 if per_prompt > body.n else None  # best_of ranks by the chosen tokens' log-probabilities
    logprobs = body.logprobs if body.logprobs is not None else ranking
    plan = Plan(prompts, [], per_prompt, body.n, body.logprobs, body.echo)
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    plan.sequences = sequences(body, prompts, per_prompt, max_tokens, logprobs, prompt_logprobs, served)
    return plan


def plan_chat(body: ChatCompletionRequest, served: Any) -> Plan:
    unsupported(body, tools=None, tool_choice=(None, "none"))
    if body.response_format not in (None, {"type": "text"}):
        kind = body.response_format.get("type") if isinstance(body.response_format, dict) else None
        raise RequestError(f"response_format: {kind!r} is not supported; orion serve has no grammar-constrained "
                           "decoding yet, so it cannot guarantee the format (use {\"type\": \"text\"})",
                           "response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise RequestError("top_logprobs: needs logprobs set to true", "top_logprobs")
    prompt = chat_prompt(body.messages, served)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens == 0:
        raise RequestError("max_completion_tokens: must be at least 1", "max_completion_tokens")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    plan = Plan([prompt], [], body.n, body.n, logprobs)
    plan.sequences = sequences(body, [prompt], body.n, max_tokens, logprobs, None, served)
    return plan


def unsupported(body: _Sampling, **allowed: Any) -> None:
    """Reject OpenAI parameters orion does not implement, unless left at their neutral value."""
    for name, neutral in allowed.items():
        value = getattr(body, name)
        accepted = neutral if isinstance(neutral, tuple) else (neutral,)
        if value not in accepted:
            raise RequestError(f"{name}: not supported by orion serve (got {value!r})", name)
    if body.logit_bias:
        raise RequestError("logit_bias: not supported by orion serve", "logit_bias")


def completion_prompts(prompt: Any, served: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise RequestError("prompt: is empty", "prompt")
    token_lists = []
    for index, one in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{index}]"
        if isinstance(one, str):
            # the batch call: tokenizers releases the GIL for it, so the event loop keeps running meanwhile
            ids = served.tokenizer([one])["input_ids"][0]
        else:
            bad = [t for t in one if not 0 <= t < served.vocab_size]
            if bad:
                raise RequestError(f"{where}: token id {bad[0]} is outside the vocabulary "
                                   f"(0..{served.vocab_size - 1})", "prompt")
            ids = list(one)
        if not ids:
            raise RequestError(f"{where}: is empty", "prompt")
        token_lists.append(ids)
    return token_lists


def chat_prompt(messages: list[ChatMessage], served: Any) -> list[int]:
    if not getattr(served.tokenizer, "chat_template", None):
        raise RequestError(f"the model '{served.id}' has no chat template; use /v1/completions", "messages")
    plain = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        plain.append({**(message.model_extra or {}), "role": message.role, "content": content or ""})
    try:
        ids = served.tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # noqa: BLE001 - jinja raises whatever the template raises
        raise RequestError(f"messages: the chat template rejected them ({exc})", "messages") from None
    if isinstance(ids, dict):
        ids = ids["input_ids"]
    return list(ids)


def sequences(body: _Sampling, prompts: list[list[int]], per_prompt: int, max_tokens: int | None,
              logprobs: int | None, prompt_logprobs: int | None, served: Any) -> list[GenerationRequest]:
    if len(prompts) * per_prompt > MAX_SEQUENCES:
        raise RequestError(f"n: {len(prompts)} prompts x {per_prompt} sequences each is more than "
                           f"{MAX_SEQUENCES} sequences per request", "n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP:
        raise RequestError(f"stop: at most {MAX_STOP} sequences (got {len(stop)})", "stop")
    temperature = body.temperature if body.temperature >= GREEDY_BELOW else 0.0
    limit = served.max_model_len
    param = "prompt" if hasattr(body, "prompt") else "messages"
    out = []
    for prompt in prompts:
        if len(prompt) >= limit and not (max_tokens == 0 and len(prompt) <= limit):
            raise RequestError(f"the prompt is {len(prompt)} tokens but this server's --max-model-len is {limit} "
                               "(prompt and completion together)", param, "context_length_exceeded")
        wanted = limit - len(prompt) if max_tokens is None else max_tokens
        if len(prompt) + wanted > limit:
            raise RequestError(f"this server's --max-model-len is {limit} tokens, but {len(prompt) + wanted} were "
                               f"requested ({len(prompt)} in the prompt, {wanted} in the completion)",
                               "max_tokens", "context_length_exceeded")
        for j in range(per_prompt):
            seed = None if body.seed is None else (body.seed + j) % 2**64
            out.append(GenerationRequest(prompt, wanted, temperature, body.top_p, seed, stop, body.ignore_eos,
                                         logprobs, prompt_logprobs, body.presence_penalty, body.frequency_penalty,
                                         body.repetition_penalty))
    return out
