"""The OpenAI-compatible HTTP API (FastAPI) in front of a Scheduler.

Routes: POST /v1/completions and /v1/chat/completions (both with `stream`),
GET /v1/models, /health and /metrics. Request bodies are validated by pydantic
models that forbid unknown fields; every error is an OpenAI-style body
({"error": {"message", "type", "param", "code"}}) with status 400 for bad
input, 401 for a missing or wrong API key, 404 for another model, 503 while
the engine is failed or draining. The app does not know whether the engine is
torch.distributed ranks or onnxruntime.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .metrics import CONTENT_TYPE, ServeMetrics
from .replies import Reply, error_body, sse
from .scheduler import EngineUnavailable, Event, GenerationRequest, Scheduler

DISCONNECT_POLL_S = 0.5


@dataclass
class ServedModel:
    id: str
    root: str
    max_model_len: int
    tokenizer: Any
    vocab_size: int
    created: int = field(default_factory=lambda: int(time.time()))
    metadata: dict[str, Any] = field(default_factory=dict)

    def card(self) -> dict[str, Any]:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "orion", "root": self.root,
                "max_model_len": self.max_model_len, **self.metadata}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=error_body(self.message, self.kind, self.param, self.code))


# -- request bodies --------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    return_token_ids: bool = False  # orion (and vLLM) extension: the generated token ids per choice
    ignore_eos: bool = False  # orion (and vLLM) extension: generate max_tokens tokens whatever they are


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... pass through to the chat template
    role: str
    content: Union[str, list[TextPart], None] = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None


# -- the app -----------------------------------------------------------------------------


def create_app(scheduler: Scheduler, served: ServedModel, metrics: ServeMetrics, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="orion serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.requests.labels(f"http_{exc.status}").inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        metrics.requests.labels("http_400").inc()
        message, param = describe_validation_error(exc)
        return JSONResponse(status_code=400, content=error_body(message, param=param))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        if scheduler.healthy:
            return {"status": "ok"}
        reason = scheduler.failure or "shutting down"
        return JSONResponse(status_code=503, content={"status": "unavailable", "reason": reason})

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [served.card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def model(model_id: str):
        check_model(model_id, served)
        return served.card()

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model, served)
        unsupported(body, echo=False, logprobs=None, best_of=(None, 1), suffix=None)
        prompt_ids = completion_prompt(body.prompt, served)
        generation = generation_request(body, prompt_ids, body.max_tokens or 16, served)
        return await respond(request, scheduler, served, metrics, body, generation, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model, served)
        unsupported(body, logprobs=(None, False), top_logprobs=None, tools=None, tool_choice=(None, "none"))
        if body.response_format not in (None, {"type": "text"}):
            raise APIError(400, "response_format: only {\"type\": \"text\"} is supported", param="response_format")
        prompt_ids = chat_prompt(body.messages, served)
        max_tokens = body.max_completion_tokens or body.max_tokens
        generation = generation_request(body, prompt_ids, max_tokens, served)
        return await respond(request, scheduler, served, metrics, body, generation, chat=True)

    return app


def describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    where = ".".join(loc)
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))})", None
    if first.get("type") == "extra_forbidden":
        return f"unknown field '{where}'", where
    if first.get("type") == "missing":
        return f"missing required field '{where}'", where
    if not where:
        return f"the request body must be a JSON object ({first.get('msg')})", None
    return f"{where}: {first.get('msg')} (got {first.get('input')!r})", where


def check_model(model: str, served: ServedModel) -> None:
    if model not in (served.id, served.root):
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{served.id}'",
                       param="model", code="model_not_found")


def unsupported(body: BaseModel, **allowed: Any) -> None:
    """Reject OpenAI parameters orion does not implement, unless left at their neutral value."""
    for name, neutral in allowed.items():
        value = getattr(body, name)
        accepted = neutral if isinstance(neutral, tuple) else (neutral,)
        if value not in accepted:
            raise APIError(400, f"{name}: not supported by orion serve (got {value!r})", param=name)
    if body.n != 1:
        raise APIError(400, f"n: only n=1 is supported (got {body.n})", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name}: not supported by orion serve (got {getattr(body, name)})", param=name)
    if body.logit_bias:
        raise APIError(400, "logit_bias: not supported by orion serve", param="logit_bias")


def completion_prompt(prompt: Any, served: ServedModel) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = served.tokenizer(prompt)["input_ids"]
    elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < served.vocab_size]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary (0..{served.vocab_size - 1})",
                           param="prompt")
        ids = list(prompt)
    else:
        raise APIError(400, "prompt: one prompt per request is supported (a string or a list of token ids)",
                       param="prompt")
    if not ids:
        raise APIError(400, "prompt: is empty", param="prompt")
    return ids


def chat_prompt(messages: list[ChatMessage], served: ServedModel) -> list[int]:
    if not getattr(served.tokenizer, "chat_template", None):
        raise APIError(400, f"the model '{served.id}' has no chat template; use /v1/completions", param="messages")
    plain = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        plain.append({**(message.model_extra or {}), "role": message.role, "content": content or ""})
    try:
        ids = served.tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # noqa: BLE001 - jinja raises whatever the template raises
        raise APIError(400, f"messages: the chat template rejected them ({exc})", param="messages") from None
    if isinstance(ids, dict):
        ids = ids["input_ids"]
    return list(ids)


def generation_request(body: _Sampling, prompt_ids: list[int], max_tokens: int | None,
                       served: ServedModel) -> GenerationRequest:
    limit = served.max_model_len
    if len(prompt_ids) >= limit:
        raise APIError(400, f"the prompt is {len(prompt_ids)} tokens but this server's --max-model-len is {limit} "
                            "(prompt and completion together)", param="prompt" if hasattr(body, "prompt") else "messages",
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = limit - len(prompt_ids)
    if max_tokens < 1:
        raise APIError(400, f"max_tokens: must be at least 1 (got {max_tokens})", param="max_tokens")
    if len(prompt_ids) + max_tokens > limit:
        raise APIError(400, f"this server's --max-model-len is {limit} tokens, but {len(prompt_ids) + max_tokens} "
                            f"were requested ({len(prompt_ids)} in the prompt, {max_tokens} in the completion)",
                       param="max_tokens", code="context_length_exceeded")
    if not 0.0 <= body.temperature <= 2.0:
        raise APIError(400, f"temperature: must be between 0 and 2 (got {body.temperature})", param="temperature")
    if not 0.0 < body.top_p <= 1.0:
        raise APIError(400, f"top_p: must be in (0, 1] (got {body.top_p})", param="top_p")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise APIError(400, f"stop: at most 4 sequences (got {len(stop)})", param="stop")
    return GenerationRequest(prompt_ids, max_tokens, body.temperature, body.top_p, body.seed, stop, body.ignore_eos)


# -- answering ---------------------------------------------------------------------------


async def respond(request: Request, scheduler: Scheduler, served: ServedModel, metrics: ServeMetrics,
                  body: _Sampling, generation: GenerationRequest, chat: bool):
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()
    try:
        request_id = scheduler.submit(generation, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
    except EngineUnavailable as exc:
        raise APIError(503, str(exc), kind="service_unavailable", code="service_unavailable") from None
    reply = Reply(served.id, chat, body.return_token_ids, generation.prompt_ids)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = sse(queue, scheduler, request_id, reply, usage, metrics)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text, tokens, last = [], [], Event()
    finished = False
    try:
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)
                continue
            if event.error:
                finished = True
                raise APIError(503, f"the engine failed while answering: {event.error}",
                               kind="service_unavailable", code="service_unavailable")
            text.append(event.text)
            tokens.extend(event.token_ids)
            last = event
            if event.finish_reason:
                finished = True
                break
    finally:
        if not finished:
            scheduler.cancel(request_id)
    metrics.requests.labels(last.finish_reason).inc()
    return reply.full("".join(text), tokens, last)
