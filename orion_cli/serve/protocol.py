"""What rank 0 tells every rank each step: the plan, and the sampling settings of new requests.

Plans travel by torch.distributed's object broadcast on the CPU (gloo) group,
so they stay small: token ids and slot numbers, never tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

PlanKind = Literal["prefill", "decode", "idle", "stats", "stop"]


@dataclass(frozen=True)
class SamplingSpec:
    """How the sampling rank picks a request's next token (greedy when temperature is 0)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    logprobs: int | None = None  # report each generated token's log-probability and this many alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token, computed in the prefill (echo)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass
class StepPlan:
    """One engine step.

    prefill: rows are new requests in slots [first_slot, first_slot + len(rows)),
    `tokens` their whole prompts. decode: rows are every running request in slots
    0..n-1, `tokens` their last token and `starts` how many positions each has
    cached. `moves` (source slot, target slot) are applied before the step, in
    order, to keep running requests in the lowest slots. idle and stats steps
    carry no work; a stats step makes every rank report its figures to rank 0.
    """

    kind: PlanKind
    request_ids: list[int] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    first_slot: int = 0
    admit: dict[int, SamplingSpec] = field(default_factory=dict)
    release: list[int] = field(default_factory=list)
    moves: list[tuple[int, int]] = field(default_factory=list)

    @property
    def has_work(self) -> bool:
        return self.kind in ("prefill", "decode")

    @property
    def scores_prompts(self) -> bool:
        """A prefill whose requests want their prompts' log-probabilities: the last stage keeps every
        position's logits (the scheduler never mixes these with other requests in one prefill)."""
        return self.kind == "prefill" and any(spec.prompt_logprobs is not None for spec in self.admit.values())
