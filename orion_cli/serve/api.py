"""The OpenAI-compatible HTTP API (FastAPI) in front of a Scheduler.

Routes: POST /v1/completions and /v1/chat/completions (both with `stream`),
GET /v1/models, /health, /metrics and /openapi.json. Every error body has
OpenAI's shape ({"error": {"message", "type", "param", "code"}}), 404 and 405
included: 400 for bad input (the message names the field), 401 for a missing
or wrong API key, 404 for another model, 413 for a body over
--max-request-bytes, 500 when one request fails (nothing else does), 503
while the engine is failed or draining. Tokenizing prompts and building
bodies run in a worker thread, so a 5 MB prompt never stalls /health. A
client that goes away cancels its sequences within one decode step. The app
does not know whether the engine is torch.distributed ranks or onnxruntime.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .generation import Plan, RequestError, plan_chat, plan_completion
from .metrics import CONTENT_TYPE, ServeMetrics
from .replies import ChoiceState, Reply, error_body, sse_line
from .scheduler import EngineUnavailable, Event, Scheduler
from .schemas import GENERATION_RESPONSES, ChatCompletionRequest, CompletionRequest, ErrorResponse

log = logging.getLogger("orion_cli.serve")


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

    @functools.cached_property
    def token_text(self):
        """One token decoded alone (log-probability entries), cached: the same tokens recur."""
        return functools.lru_cache(maxsize=1 << 16)(lambda token: self.tokenizer.decode([token]))


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=error_body(self.message, self.kind, self.param, self.code))


def unavailable(reason: str) -> APIError:
    return APIError(503, reason, kind="service_unavailable", code="service_unavailable")


class RequestGate:
    """ASGI middleware in front of the routes: 503 at once while the engine cannot take work, and 413 for
    bodies over the limit (read whole here, so a chunked body cannot slip past a Content-Length check)."""

    def __init__(self, app: Any, scheduler: Scheduler, max_request_bytes: int, metrics: ServeMetrics):
        self.app, self.scheduler, self.limit, self.metrics = app, scheduler, max_request_bytes, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if not self.scheduler.healthy:
            reason = f"the engine failed: {self.scheduler.failure}" if self.scheduler.failure else \
                "the server is shutting down"
            return await self._refuse(send, receive, unavailable(reason))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, receive, self._too_large())
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.limit:
                return await self._refuse(send, receive, self._too_large(), more=bool(message.get("more_body")))
            if not message.get("more_body"):
                break
        body, replayed = b"".join(parts), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for the client's disconnect

        await self.app(scope, replay, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than this server's --max-request-bytes ({self.limit})",
                        code="request_too_large")

    async def _refuse(self, send: Any, receive: Any, error: APIError, more: bool = True) -> None:
        self.metrics.requests.labels(f"http_{error.status}").inc()
        while more:  # read what the client sends, unkept: closing on unread bytes resets the connection
            message = await receive()
            more = message["type"] == "http.request" and bool(message.get("more_body"))
        body = json.dumps(error_body(error.message, error.kind, error.param, error.code)).encode()
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def create_app(scheduler: Scheduler, served: ServedModel, metrics: ServeMetrics, api_key: str | None = None,
               max_request_bytes: int = 16 << 20) -> FastAPI:
    app = FastAPI(title="orion serve", version="1", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.add_middleware(RequestGate, scheduler=scheduler, max_request_bytes=max_request_bytes, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.requests.labels(f"http_{exc.status}").inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        metrics.requests.labels("http_400").inc()
        message, param = describe_validation_error(exc)
        return JSONResponse(status_code=400, content=error_body(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        metrics.requests.labels(f"http_{exc.status_code}").inc()
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {str(exc.detail).lower()}"
        return JSONResponse(status_code=exc.status_code, content=error_body(message, kind, code=exc.status_code),
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # a bug met by one request fails that request; the server goes on
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        metrics.requests.labels("http_500").inc()
        return JSONResponse(status_code=500, content=error_body(
            f"this request failed: {type(exc).__name__}: {str(exc).strip()[:200]}", "internal_error", code=500))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    @app.get("/health", responses={503: {"description": "The engine failed or the server is draining."}})
    async def health():
        if scheduler.healthy:
            return {"status": "ok"}
        reason = scheduler.failure or "shutting down"
        return JSONResponse(status_code=503, content={"status": "unavailable", "reason": reason})

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {}}, "description": "Prometheus text"}})
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[Depends(authorize)], responses={401: {"model": ErrorResponse}})
    async def models():
        return {"object": "list", "data": [served.card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)],
             responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})
    async def model(model_id: str):
        check_model(model_id, served)
        return served.card()

    @app.post("/v1/completions", dependencies=[Depends(authorize)], responses=GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model, served)
        warn_unknown(body)
        plan = await planned(plan_completion, body, served)
        prompt_texts = [served.tokenizer.decode(p) for p in plan.prompts] if plan.echo else []
        return await respond(request, scheduler, served, metrics, body, plan, chat=False, prompt_texts=prompt_texts)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)], responses=GENERATION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model, served)
        warn_unknown(body)
        plan = await planned(plan_chat, body, served)
        return await respond(request, scheduler, served, metrics, body, plan, chat=True)

    app.openapi = lambda: openapi_without_422(app)
    return app


def openapi_without_422(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents 422 for validation errors; this server answers them with 400 (OpenAI's status)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    where = ".".join(loc)
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))})", None
    if first.get("type") == "missing":
        return f"missing required field '{where}'", where
    if not where:
        return f"the request body must be a JSON object ({first.get('msg')})", None
    value = repr(first.get("input"))
    return f"{where}: {first.get('msg')} (got {value[:100]}{'...' if len(value) > 100 else ''})", where


def check_model(model: str, served: ServedModel) -> None:
    if model not in (served.id, served.root):
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{served.id}'",
                       param="model", code="model_not_found")


def warn_unknown(body: Any) -> None:
    unknown = body.unknown_fields()
    if unknown:
        log.warning("ignoring unknown request fields: %s", ", ".join(unknown))


async def planned(planner: Any, body: Any, served: ServedModel) -> Plan:
    try:
        return await run_in_threadpool(planner, body, served)
    except RequestError as exc:
        raise APIError(exc.status, exc.message, exc.param, exc.code) from None


# -- answering ---------------------------------------------------------------------------


async def respond(request: Request, scheduler: Scheduler, served: ServedModel, metrics: ServeMetrics, body: Any,
                  plan: Plan, chat: bool, prompt_texts: list[str] | None = None):
    mailbox = _Mailbox.of(asyncio.get_running_loop())
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    try:
        ids = scheduler.submit_all([(sequence, functools.partial(mailbox.post, queue, index))
                                    for index, sequence in enumerate(plan.sequences)])
    except EngineUnavailable as exc:
        raise unavailable(str(exc)) from None
    reply = Reply(served.id, chat, body.return_token_ids, plan, served.token_text)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _stream(queue, scheduler, ids, reply, usage, metrics, prompt_texts or [])
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    states = [ChoiceState() for _ in ids]
    left = set(range(len(ids)))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while left:
            next_event = asyncio.ensure_future(queue.get())
            await asyncio.wait({next_event, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not next_event.done():  # the client went away: cancel its sequences now
                next_event.cancel()
                return Response(status_code=499)
            index, event = next_event.result()
            if event.error:
                raise unavailable(f"the engine failed while answering: {event.error}")
            if event.failure:
                raise APIError(500, f"this request failed: {event.failure}", kind="internal_error", code="500")
            states[index].add(event)
            if event.finish_reason:
                left.discard(index)
    finally:
        gone.cancel()
        for index in left:
            scheduler.cancel(ids[index])
    return await run_in_threadpool(reply.full, states, prompt_texts or [])


class _Mailbox:
    """Events from the engine thread into one event loop's request queues, with one wake-up per burst.

    A decode step delivers an event to every running request at once; waking
    the loop for each (call_soon_threadsafe writes its self-pipe) cost a system
    call and a loop iteration per token.
    """

    _by_loop: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, tuple[int, Event]]] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "_Mailbox":
        mailbox = cls._by_loop.get(loop)
        if mailbox is None:
            mailbox = cls._by_loop[loop] = cls(loop)
        return mailbox

    def post(self, queue: asyncio.Queue, index: int, event: Event) -> None:
        with self.lock:
            self.pending.append((queue, (index, event)))
            if len(self.pending) > 1:  # a flush is scheduled and has not run yet: it takes this one too
                return
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, item in pending:
            queue.put_nowait(item)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(queue: asyncio.Queue, scheduler: Scheduler, ids: list[int], reply: Reply, include_usage: bool,
                  metrics: ServeMetrics, prompt_texts: list[str]) -> AsyncIterator[str]:
    states = [ChoiceState() for _ in ids]
    left = set(range(len(ids)))
    echoed: set[int] = set()
    try:
        if reply.chat:
            for index in range(len(ids)):
                yield sse_line(reply.role_chunk(index))
        while left:
            index, event = await queue.get()
            if event.error or event.failure:
                status = 503 if event.error else 500
                metrics.requests.labels(f"http_{status}").inc()
                message = f"the engine failed while answering: {event.error}" if event.error else \
                    f"this request failed: {event.failure}"
                yield sse_line(error_body(message, "service_unavailable" if event.error else "internal_error",
                                          code=status))
                return
            states[index].add(event)
            echo = ""
            if prompt_texts and index not in echoed:
                echo = prompt_texts[reply.plan.prompt_of(index)]
                echoed.add(index)
            if echo or event.text or event.logprobs or event.prompt_logprobs or event.finish_reason or \
                    (reply.with_token_ids and event.token_ids):
                if event.logprobs or event.prompt_logprobs:  # token strings: tokenizer work, off the event loop
                    yield sse_line(await run_in_threadpool(reply.chunk, index, event, echo))
                else:  # a text chunk is one small dict: a thread hop per token cost more than building it here
                    yield sse_line(reply.chunk(index, event, echo))
            if event.finish_reason:
                left.discard(index)
        if include_usage:
            yield sse_line(reply.usage_chunk(states))
        yield "data: [DONE]\n\n"
    finally:
        for index in left:  # the client went away mid-stream: free the slots
            scheduler.cancel(ids[index])
