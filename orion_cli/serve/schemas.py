"""The request and error bodies of the OpenAI-compatible API, as pydantic models (they also make /openapi.json).

Unknown fields are accepted and ignored with a logged warning, as vLLM does:
newer OpenAI SDKs send fields (`metadata`, `store`, ...) older servers have
never heard of. Ranges follow OpenAI's and vLLM's (seeds are 64-bit, up to 20
log-probabilities), so an out-of-range value is a 400 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
MAX_STOP = 16
MAX_SEQUENCES = 128  # prompts x (best_of or n) in one request


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_SEQUENCES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)  # vLLM extension
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    return_token_ids: bool = False  # orion (and vLLM) extension: the generated token ids per choice
    ignore_eos: bool = False  # orion (and vLLM) extension: generate max_tokens tokens whatever they are


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_SEQUENCES)
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):  # name, tool_call_id, ... pass through to the chat template
    role: str
    content: Union[str, list[TextPart], None] = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: Union[str, int, None] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


_ERROR = {"model": ErrorResponse}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {**_ERROR, "description": "Invalid request: the message names the field at fault."},
    401: {**_ERROR, "description": "Missing or wrong API key (--api-key)."},
    404: {**_ERROR, "description": "No such model on this server."},
    413: {**_ERROR, "description": "The body is larger than --max-request-bytes."},
    500: {**_ERROR, "description": "This request failed (and nothing else did); the message names the failure."},
    503: {**_ERROR, "description": "The server is draining or its engine failed."},
}
GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The completion, or with `stream` a server-sent event stream of chunks.",
          "content": {"application/json": {}, "text/event-stream": {}}},
    **ERROR_RESPONSES,
}
