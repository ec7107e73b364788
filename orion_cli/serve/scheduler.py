"""Continuous batching on rank 0: requests join and leave the running batch between steps.

One thread owns the engine. Each step is either a prefill of newly admitted
requests (their prompts, batched) or one decode step of every running request;
requests that finish free their slot at once and the last running request
moves into it, so the next step already has room for a waiting one. The step
itself is run by a StepRunner: the torch.distributed ranks (worker.py) or
onnxruntime (onnx_engine.py); the scheduler does not know which.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from .metrics import ServeMetrics
from .protocol import SamplingSpec, StepPlan
from .sampling import Sampled, TokenLogprob
from .text import TextStream

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # an idle engine still steps this often, so a dead rank is noticed
STATS_INTERVAL_S = 2.0
SCORING_LOGITS_BYTES = 1 << 30  # a prefill scoring prompts holds every position's logits (float32): at most this


class EngineUnavailable(Exception):
    """The engine failed or is shutting down; the API answers 503."""


class StepRunner(Protocol):
    def run(self, plan: StepPlan) -> list[Sampled] | list[dict[str, Any]] | None:
        """One result per row of a prefill/decode plan, every rank's figures for a stats plan, None otherwise."""

    def shutdown(self) -> None:
        """Stop every rank (after the last plan)."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # see SamplingSpec
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0


@dataclass
class Event:
    """What the API receives for a request: text as it is decoded, then a finish reason or an error.

    `error`: the engine failed (every request gets it, 503). `failure`: this request failed and nothing
    else did (500). `logprobs` are the generated tokens' (the end-of-sequence token included, whose text is
    empty), `prompt_logprobs` the prompt's, on the first event of a request scoring its prompt.
    """

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length"
    error: str | None = None
    failure: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None


Deliver = Callable[[Event], None]


@dataclass
class _Sequence:
    id: int
    request: GenerationRequest
    deliver: Deliver
    text: TextStream
    arrived: float
    generated: list[int] = field(default_factory=list)
    cached: int = 0  # positions in the KV cache
    last_token_at: float = 0.0
    admitted_at: float = 0.0
    first_token_at: float = 0.0

    @property
    def spec(self) -> SamplingSpec:
        r = self.request
        return SamplingSpec(r.temperature, r.top_p, r.seed if r.seed is not None else secrets.randbits(63),
                            r.logprobs, r.prompt_logprobs, r.presence_penalty, r.frequency_penalty,
                            r.repetition_penalty)

    @property
    def scores_prompt(self) -> bool:
        return self.request.prompt_logprobs is not None


class Scheduler:
    def __init__(self, runner: StepRunner, tokenizer: Any, eos_token_ids: set[int], max_batch_size: int,
                 max_model_len: int, metrics: ServeMetrics, on_failure: Callable[[str], None] | None = None,
                 recompute_at: int | None = None, vocab_size: int = 1):
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        self.metrics = metrics
        self.on_failure = on_failure
        self.recompute_at = recompute_at  # plans.recompute_position: the cache is rebuilt when a request reaches it
        self.scoring_positions = max(1, SCORING_LOGITS_BYTES // (4 * vocab_size))
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # index == cache slot
        self._cancelled: set[int] = set()
        self._moves: list[tuple[int, int]] = []
        self._releases: list[int] = []
        self._accepting = True
        self._stopping = False
        self.failure: str | None = None
        self.served = 0
        self.generated_tokens = 0
        self._thread = threading.Thread(target=self._loop, name="orion-engine", daemon=True)
        self._last_stats = 0.0

    # -- the API's side ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self.failure is None and self._accepting

    def submit(self, request: GenerationRequest, deliver: Deliver) -> int:
        return self.submit_all([(request, deliver)])[0]

    def submit_all(self, requests: list[tuple[GenerationRequest, Deliver]]) -> list[int]:
        """Queue a client's sequences together, so one prefill can take them all; their ids, in order."""
        with self._cond:
            if self.failure is not None:
                raise EngineUnavailable(f"the engine failed: {self.failure}")
            if not self._accepting:
                raise EngineUnavailable("the server is shutting down")
            now = time.perf_counter()
            sequences = [_Sequence(next(self._ids), request, deliver, TextStream(self.tokenizer, request.stop), now)
                         for request, deliver in requests]
            self._waiting.extend(sequences)
            self._update_gauges()
            self._cond.notify()
            return [sequence.id for sequence in sequences]

    def cancel(self, request_id: int) -> None:
        """The client went away: free the request's slot at the next step."""
        with self._cond:
            self._cancelled.add(request_id)
            self._cond.notify()

    def drain(self) -> None:
        """Refuse new requests; the running and waiting ones are finished."""
        with self._cond:
            self._accepting = False

    def stop(self, timeout: float) -> bool:
        """Finish what is in flight (up to `timeout` seconds), then stop every rank. True if drained."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._fail("the server was stopped before this request finished")
            self._thread.join(5)
            return False
        return self.failure is None

    @property
    def in_flight(self) -> int:
        with self._cond:
            return len(self._waiting) + len(self._running)

    # -- the engine thread ---------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                plan = self._next_plan()
                if plan is None:
                    break
                result = self.runner.run(plan)
                if plan.kind == "stats":
                    self.metrics.update_ranks(result or [])
                elif plan.has_work:
                    self._advance(plan, result)
            if self.failure is None:
                self.runner.shutdown()
        except Exception as exc:  # noqa: BLE001 - any failure of a step ends the engine
            log.debug("engine step failed", exc_info=True)
            self._fail(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")

    def _next_plan(self) -> StepPlan | None:
        with self._cond:
            while True:
                if self.failure is not None:
                    return None
                self._take_cancellations()
                busy = bool(self._running or self._waiting)
                if self._stopping and not busy:
                    return None
                if busy:
                    break
                if time.monotonic() - self._last_stats >= STATS_INTERVAL_S:
                    return self._stats_plan()
                self._cond.wait(HEARTBEAT_S)
                if not (self._running or self._waiting or self._stopping or self._cancelled):
                    return self._with_pending(StepPlan("idle"))
            if time.monotonic() - self._last_stats >= STATS_INTERVAL_S:
                return self._stats_plan()
            free = self.max_batch_size - len(self._running)
            if self._waiting and free > 0:
                admitted = self._admit(free)
                first_slot = len(self._running)
                self._running.extend(admitted)
                self._update_gauges()
                plan = StepPlan("prefill", [s.id for s in admitted], [s.request.prompt_ids for s in admitted],
                                [0] * len(admitted), first_slot, admit={s.id: s.spec for s in admitted})
            elif (slot := self._needing_recompute()) is not None:
                sequence = self._running[slot]
                sequence.cached = 0  # its whole sequence is prefilled again into its own slot
                plan = StepPlan("prefill", [sequence.id], [sequence.request.prompt_ids + sequence.generated], [0], slot)
            else:
                self.metrics.decode_batch_size.observe(len(self._running))
                plan = StepPlan("decode", [s.id for s in self._running], [[s.generated[-1]] for s in self._running],
                                [s.cached for s in self._running])
            return self._with_pending(plan)

    def _admit(self, free: int) -> list[_Sequence]:
        """The waiting requests the next prefill takes, in arrival order: requests scoring their prompts
        (every position's logits, SCORING_LOGITS_BYTES at most) never share a prefill with the others."""
        scoring = self._waiting[0].scores_prompt
        admitted: list[_Sequence] = []
        width = 0  # the prefill's rows are padded to the longest prompt
        while self._waiting and len(admitted) < free and self._waiting[0].scores_prompt == scoring:
            width = max(width, len(self._waiting[0].request.prompt_ids))
            if scoring and admitted and width * (len(admitted) + 1) > self.scoring_positions:
                break
            admitted.append(self._waiting.popleft())
        now = time.perf_counter()
        for sequence in admitted:
            sequence.admitted_at = now
            self.metrics.queue_time.observe(now - sequence.arrived)
        return admitted

    def _needing_recompute(self) -> int | None:
        """The slot of a request whose next token reaches the position where the model's generate() rebuilds its
        cache (Phi-3's longrope switching to its long factors), as transformers' generate() does."""
        if self.recompute_at is None:
            return None
        return next((slot for slot, s in enumerate(self._running) if s.cached == self.recompute_at), None)

    def _stats_plan(self) -> StepPlan:
        self._last_stats = time.monotonic()
        return self._with_pending(StepPlan("stats"))

    def _with_pending(self, plan: StepPlan) -> StepPlan:
        plan.moves, self._moves = self._moves, []
        plan.release, self._releases = self._releases, []
        return plan

    def _take_cancellations(self) -> None:
        if not self._cancelled:
            return
        for sequence in [s for s in self._waiting if s.id in self._cancelled]:
            self._waiting.remove(sequence)
        for sequence in [s for s in self._running if s.id in self._cancelled]:
            self._remove(sequence)
        self._cancelled.clear()
        self._update_gauges()

    def _advance(self, plan: StepPlan, results: list[Sampled]) -> None:
        now = time.perf_counter()
        finished: list[tuple[_Sequence, Event]] = []
        events: list[tuple[_Sequence, Event]] = []
        with self._cond:
            by_id = {s.id: s for s in self._running}
            for request_id, result, fed in zip(plan.request_ids, results, plan.tokens):
                sequence = by_id.get(request_id)
                if sequence is None:  # cancelled while the step ran
                    continue
                sequence.cached += len(fed)
                try:
                    event = self._push(sequence, result, now)
                except Exception as exc:  # noqa: BLE001 - detokenizing one request fails that request only
                    log.debug("request %d failed", request_id, exc_info=True)
                    event = Event(failure=f"{type(exc).__name__}: {str(exc).strip()[:200]}")
                if event.finish_reason or event.failure:
                    self._remove(sequence)
                    finished.append((sequence, event))
                elif event.text or event.token_ids or event.logprobs:
                    events.append((sequence, event))
            self._update_gauges()
        for sequence, event in events + finished:
            sequence.deliver(event)
        for sequence, event in finished:
            if event.failure:
                continue
            self.metrics.e2e_latency.observe(now - sequence.arrived)
            if sequence.first_token_at:
                self.metrics.decode_time.observe(now - sequence.first_token_at)
            self.metrics.request_success.labels(finished_reason=event.finish_reason).inc()
            self.served += 1

    def _push(self, sequence: _Sequence, result: Sampled, now: float) -> Event:
        request = sequence.request
        if result.error:
            return Event(failure=result.error)
        event = Event(prompt_tokens=len(request.prompt_ids))
        if not sequence.generated and not sequence.first_token_at:  # this request's prefill
            self.metrics.prompt_tokens.inc(len(request.prompt_ids))
            self.metrics.prefix_cache_queries.inc(len(request.prompt_ids))
            self.metrics.prefix_cache_hits.inc(result.cached_prompt_tokens)
            self.metrics.prefill_time.observe(now - sequence.admitted_at)
            event.prompt_logprobs = result.prompt
            if request.max_tokens == 0:  # scoring the prompt only (echo with max_tokens 0)
                event.finish_reason = "length"
                return event
            self.metrics.time_to_first_token.observe(now - sequence.arrived)
            sequence.first_token_at = now
        else:
            self.metrics.inter_token_latency.observe(now - sequence.last_token_at)
        sequence.last_token_at = now
        self.metrics.generation_tokens.inc()
        self.generated_tokens += 1
        token = result.token
        if result.logprob is not None:
            event.logprobs = [result.logprob]
        if token in self.eos_token_ids and not request.ignore_eos:
            event.text, event.finish_reason = sequence.text.finish(), "stop"
        else:
            sequence.generated.append(token)
            event.token_ids = [token]
            event.text, hit_stop = sequence.text.push(token)
            if hit_stop:
                event.finish_reason = "stop"
            elif len(sequence.generated) >= request.max_tokens or \
                    len(request.prompt_ids) + len(sequence.generated) >= self.max_model_len:
                event.text += sequence.text.finish()
                event.finish_reason = "length"
        event.completion_tokens = len(sequence.generated)
        return event

    def _remove(self, sequence: _Sequence) -> None:
        """Free a running request's slot; the last running request moves into it."""
        slot = self._running.index(sequence)
        last = len(self._running) - 1
        if slot != last:
            self._running[slot] = self._running[last]
            self._moves.append((last, slot))
        self._running.pop()
        self._releases.append(sequence.id)

    def _fail(self, reason: str) -> None:
        with self._cond:
            if self.failure is None:
                self.failure = reason
            victims = list(self._waiting) + list(self._running)
            self._waiting.clear()
            self._running.clear()
            self._update_gauges()
        log.error("orion serve: engine failed: %s", self.failure)
        for sequence in victims:
            sequence.deliver(Event(error=self.failure))
        if self.on_failure is not None:
            self.on_failure(self.failure)

    def _update_gauges(self) -> None:
        self.metrics.running.set(len(self._running))
        self.metrics.waiting.set(len(self._waiting))
        # the slot cache holds max_batch_size sequences of max_model_len positions
        used = sum(s.cached for s in self._running)
        self.metrics.kv_cache_usage.set(used / (self.max_batch_size * self.max_model_len))
