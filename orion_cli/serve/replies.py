"""OpenAI-shaped response bodies and server-sent event streams for one request."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from .metrics import ServeMetrics
from .scheduler import Event, Scheduler


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Reply:
    """Builds OpenAI-shaped bodies and chunks for one request."""

    model: str
    chat: bool
    with_token_ids: bool
    prompt_ids: list[int]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {"id": prefix + self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}

    def _usage(self, completion_tokens: int) -> dict[str, int]:
        prompt = len(self.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                "total_tokens": prompt + completion_tokens}

    def _choice(self, text: str, tokens: list[int], finish_reason: str | None, delta: bool) -> dict[str, Any]:
        if self.chat:
            key = "delta" if delta else "message"
            message: dict[str, Any] = {"content": text} if delta else {"role": "assistant", "content": text}
            choice = {"index": 0, key: message, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if self.with_token_ids:
            choice["token_ids"] = tokens
            if not delta:
                choice["prompt_token_ids"] = self.prompt_ids
        return choice

    def full(self, text: str, tokens: list[int], last: Event) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        body = self._envelope(kind, [self._choice(text, tokens, last.finish_reason, delta=False)])
        body["usage"] = self._usage(last.completion_tokens)
        return body

    def chunk(self, text: str, tokens: list[int], finish_reason: str | None = None,
              role: bool = False) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        choice = self._choice(text, tokens, finish_reason, delta=True)
        if role:
            choice["delta"] = {"role": "assistant", "content": ""}
        return self._envelope(kind, [choice])

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        body = self._envelope(kind, [])
        body["usage"] = self._usage(completion_tokens)
        return body


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def sse(queue: asyncio.Queue, scheduler: Scheduler, request_id: int, reply: Reply, include_usage: bool,
              metrics: ServeMetrics) -> AsyncIterator[str]:
    finished = False
    try:
        if reply.chat:
            yield _sse(reply.chunk("", [], role=True))
        while True:
            event: Event = await queue.get()
            if event.error:
                finished = True
                metrics.requests.labels("http_503").inc()
                yield _sse(error_body(f"the engine failed while answering: {event.error}", "service_unavailable",
                                      code=503))
                return
            if event.text or (reply.with_token_ids and event.token_ids):
                yield _sse(reply.chunk(event.text, event.token_ids))
            if event.finish_reason:
                finished = True
                metrics.requests.labels(event.finish_reason).inc()
                yield _sse(reply.chunk("", [], event.finish_reason))
                if include_usage:
                    yield _sse(reply.usage_chunk(event.completion_tokens))
                yield "data: [DONE]\n\n"
                return
    finally:
        if not finished:  # the client went away mid-stream: free the slot
            scheduler.cancel(request_id)
