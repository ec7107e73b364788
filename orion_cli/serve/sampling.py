"""Next-token choice per request: greedy, or temperature and nucleus (top-p) sampling with a seed.

Each request owns a torch.Generator seeded from its `seed`, so a seeded
request samples the same tokens whichever other requests share its steps.
"""

from __future__ import annotations

import torch

from .protocol import SamplingSpec


class Sampler:
    def __init__(self) -> None:
        self._specs: dict[int, SamplingSpec] = {}
        self._generators: dict[int, torch.Generator] = {}

    def admit(self, admitted: dict[int, SamplingSpec]) -> None:
        for request_id, spec in admitted.items():
            self._specs[request_id] = spec
            if spec.temperature > 0:
                self._generators[request_id] = torch.Generator(device="cpu").manual_seed(spec.seed)

    def release(self, request_ids: list[int]) -> None:
        for request_id in request_ids:
            self._specs.pop(request_id, None)
            self._generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, request_ids: list[int]) -> list[int]:
        """One token per row of `logits` [rows, vocab]."""
        chosen = logits.argmax(dim=-1).tolist()
        for row, request_id in enumerate(request_ids):
            spec = self._specs.get(request_id, SamplingSpec())
            if spec.temperature > 0:
                chosen[row] = sample_row(logits[row].float().cpu(), spec, self._generators[request_id])
        return chosen


def sample_row(logits: torch.Tensor, spec: SamplingSpec, generator: torch.Generator) -> int:
    probs = torch.softmax(logits / spec.temperature, dim=-1)
    if spec.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        outside = sorted_probs.cumsum(0) - sorted_probs >= spec.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
