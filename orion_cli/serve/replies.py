"""OpenAI-shaped response bodies and server-sent event streams for one HTTP request and its choices.

Log-probabilities take OpenAI's two shapes: the legacy completions one
(parallel lists `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`;
with `echo` the prompt's tokens come first, the first of them without a
log-probability) and the chat one (`content`: a list of token, logprob, bytes
and top_logprobs). As OpenAI documents, the chosen token is always among a
position's top log-probabilities, so there may be logprobs + 1 of them.
Token strings are each token decoded alone.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from .generation import Plan
from .sampling import TokenLogprob
from .scheduler import Event
from .schemas import error_body

__all__ = ["ChoiceState", "Reply", "error_body", "sse_line"]


@dataclass
class ChoiceState:
    """What the API has received for one sequence so far."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0

    def add(self, event: Event) -> None:
        self.text.append(event.text)
        self.token_ids.extend(event.token_ids)
        self.logprobs.extend(event.logprobs)
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        self.finish_reason = event.finish_reason or self.finish_reason
        self.completion_tokens = event.completion_tokens or self.completion_tokens

    @property
    def cumulative_logprob(self) -> float:
        return sum(entry.logprob for entry in self.logprobs)


@dataclass
class Reply:
    """Builds the bodies and chunks of one request."""

    model: str
    chat: bool
    with_token_ids: bool
    plan: Plan
    token_text: Callable[[int], str]  # one token decoded alone
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    # -- whole bodies --------------------------------------------------------------

    def full(self, choices: list[ChoiceState], prompt_texts: list[str]) -> dict[str, Any]:
        kept = self._best(choices)
        body = self._envelope("chat.completion" if self.chat else "text_completion",
                              [self._choice(index, sequence, state, prompt_texts)
                               for index, (sequence, state) in enumerate(kept)])
        body["usage"] = self._usage(choices)
        return body

    def _best(self, choices: list[ChoiceState]) -> list[tuple[int, ChoiceState]]:
        """The `n` choices of each prompt: all of them, or with best_of the n most likely."""
        plan = self.plan
        kept = []
        for prompt in range(len(plan.prompts)):
            own = list(range(prompt * plan.per_prompt, (prompt + 1) * plan.per_prompt))
            if plan.per_prompt > plan.n:
                own = sorted(own, key=lambda s: choices[s].cumulative_logprob, reverse=True)[: plan.n]
            kept.extend((s, choices[s]) for s in own)
        return kept

    def _choice(self, index: int, sequence: int, state: ChoiceState, prompt_texts: list[str]) -> dict[str, Any]:
        text = "".join(state.text)
        prompt_ids = self.plan.prompts[self.plan.prompt_of(sequence)]
        if self.chat:
            choice = {"index": index, "message": {"role": "assistant", "content": text},
                      "logprobs": self._chat_logprobs(state.logprobs), "finish_reason": state.finish_reason}
        else:
            echo = prompt_texts[self.plan.prompt_of(sequence)] if self.plan.echo else ""
            choice = {"index": index, "text": echo + text, "finish_reason": state.finish_reason,
                      "logprobs": self._completion_logprobs(state, prompt_ids)}
        if self.with_token_ids:
            choice["token_ids"] = state.token_ids
            choice["prompt_token_ids"] = prompt_ids
        return choice

    def _usage(self, choices: list[ChoiceState]) -> dict[str, int]:
        prompt = sum(len(p) for p in self.plan.prompts)
        completion = sum(state.completion_tokens for state in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {"id": prefix + self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}

    # -- log-probabilities ---------------------------------------------------------

    def _completion_logprobs(self, state: ChoiceState, prompt_ids: list[int],
                             generated: list[TokenLogprob] | None = None, offset: int = 0) -> dict[str, Any] | None:
        if self.plan.logprobs is None:
            return None
        entries: list[tuple[int, TokenLogprob | None]] = []
        if self.plan.echo and state.prompt_logprobs is not None:
            entries += [(token, entry) for token, entry in zip(prompt_ids, state.prompt_logprobs)]
        entries += [(entry.token, entry) for entry in (state.logprobs if generated is None else generated)]
        tokens, offsets = [], []
        for token, _ in entries:
            offsets.append(offset)
            tokens.append(self.token_text(token))
            offset += len(tokens[-1])
        return {"tokens": tokens,
                "token_logprobs": [entry.logprob if entry else None for _, entry in entries],
                "top_logprobs": [self._top_dict(entry) if entry else None for _, entry in entries],
                "text_offset": offsets}

    def _top_dict(self, entry: TokenLogprob) -> dict[str, float]:
        # tokens decoding to the same text (pieces of one UTF-8 character) share a key: the likeliest keeps it
        top: dict[str, float] = {}
        for token, logprob in [*entry.top[: self.plan.logprobs], (entry.token, entry.logprob)]:
            text = self.token_text(token)
            top[text] = max(top.get(text, logprob), logprob)
        return top

    def _chat_logprobs(self, generated: list[TokenLogprob]) -> dict[str, Any] | None:
        if self.plan.logprobs is None:
            return None

        def item(token: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**item(entry.token, entry.logprob),
                             "top_logprobs": [item(t, lp) for t, lp in entry.top[: self.plan.logprobs]]}
                            for entry in generated]}

    # -- streams -------------------------------------------------------------------

    def chunk(self, index: int, event: Event, prompt_text: str = "") -> dict[str, Any]:
        """The chunk carrying one event of choice `index` (prompt_text: the echo, on its first chunk)."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        if self.chat:
            choice = {"index": index, "delta": {"content": event.text}, "finish_reason": event.finish_reason,
                      "logprobs": self._chat_logprobs(event.logprobs) if event.logprobs else None}
        else:
            state = ChoiceState(prompt_logprobs=event.prompt_logprobs)
            prompt_ids = self.plan.prompts[self.plan.prompt_of(index)] if event.prompt_logprobs else []
            choice = {"index": index, "text": prompt_text + event.text, "finish_reason": event.finish_reason,
                      "logprobs": self._completion_logprobs(state, prompt_ids, event.logprobs)
                      if event.logprobs or event.prompt_logprobs else None}
        if self.with_token_ids:
            choice["token_ids"] = event.token_ids
        return self._envelope(kind, [choice])

    def role_chunk(self, index: int) -> dict[str, Any]:
        return self._envelope("chat.completion.chunk", [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                         "logprobs": None, "finish_reason": None}])

    def usage_chunk(self, choices: list[ChoiceState]) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = self._usage(choices)
        return body


def sse_line(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
