"""Next-token choice per request, with vLLM's penalties, and the log-probabilities clients ask for.

Each request owns a torch.Generator seeded from its `seed`, so a seeded
request samples the same tokens whichever other requests share its steps.

Order, as in vLLM: repetition, frequency and presence penalties change the
logits; then greedy takes the argmax, or temperature and nucleus (top-p)
sampling draw from them. Reported log-probabilities are the model's own
(log-softmax of the raw logits, before penalties and temperature), which is
what vLLM reports by default and what evaluation harnesses score with.

A failure while choosing one row's token (non-finite logits, say) fails
that request only: its result carries the error and the other rows go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .protocol import SamplingSpec


@dataclass
class TokenLogprob:
    """A token's log-probability and the `top` most likely tokens at its position (id, log-probability)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Sampled:
    """One row's result of a step."""

    token: int
    logprob: TokenLogprob | None = None  # when the request asked for log-probabilities
    prompt: list[TokenLogprob | None] | None = None  # prefill of a request scoring its prompt; None for token 0
    error: str | None = None  # this request failed; the others did not
    cached_prompt_tokens: int = 0  # prefill: prompt positions taken from the prefix cache instead of computed


class _History:
    """What penalties look at: which tokens the prompt holds, and how often each was generated."""

    def __init__(self, prompt: list[int], vocab_size: int, device: torch.device):
        self.in_prompt = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.in_prompt[torch.tensor(prompt, device=device)] = True
        self.generated = torch.zeros(vocab_size, dtype=torch.float32, device=device)


class Sampler:
    def __init__(self) -> None:
        self._specs: dict[int, SamplingSpec] = {}
        self._generators: dict[int, torch.Generator] = {}
        self._histories: dict[int, _History] = {}

    def admit(self, admitted: dict[int, SamplingSpec]) -> None:
        for request_id, spec in admitted.items():
            self._specs[request_id] = spec
            if spec.temperature > 0:
                self._generators[request_id] = torch.Generator(device="cpu").manual_seed(spec.seed)

    def release(self, request_ids: list[int]) -> None:
        for request_id in request_ids:
            self._specs.pop(request_id, None)
            self._generators.pop(request_id, None)
            self._histories.pop(request_id, None)

    def wants_prompt_logprobs(self, request_ids: list[int]) -> list[bool]:
        return [self._specs.get(r, SamplingSpec()).prompt_logprobs is not None for r in request_ids]

    def sample(self, logits: torch.Tensor, request_ids: list[int], prompts: list[list[int]] | None = None,
               prompt_logits: list[torch.Tensor | None] | None = None) -> list[Sampled]:
        """One token per row of `logits` [rows, vocab]. A prefill passes each row's prompt (`prompts`) and,
        for rows scoring their prompt, the logits at every prompt position (`prompt_logits[row]`, [length, vocab])."""
        results: list[Sampled] = []
        for row, request_id in enumerate(request_ids):
            spec = self._specs.get(request_id, SamplingSpec())
            try:
                results.append(self._one(logits[row], request_id, spec, prompts[row] if prompts else None,
                                         prompt_logits[row] if prompt_logits else None))
            except Exception as exc:  # noqa: BLE001 - whatever one row raises fails that request only
                results.append(Sampled(-1, error=f"{type(exc).__name__}: {str(exc).strip()[:200]}"))
        return results

    def _one(self, row_logits: torch.Tensor, request_id: int, spec: SamplingSpec, prompt: list[int] | None,
             prompt_logits: torch.Tensor | None) -> Sampled:
        history = None
        if spec.penalized:
            history = self._histories.get(request_id)
            if history is None:
                if prompt is None:
                    raise RuntimeError("a penalized request reached decode without its prompt")
                history = self._histories[request_id] = _History(prompt, row_logits.shape[-1], row_logits.device)
        chosen_from = penalize(row_logits.float(), spec, history) if history is not None else row_logits
        if spec.temperature > 0:
            token = sample_row(chosen_from.float().cpu(), spec, self._generators[request_id])
        else:
            token = int(chosen_from.argmax())
        if history is not None:
            history.generated[token] += 1
        result = Sampled(token)
        if spec.logprobs is not None:
            result.logprob = token_logprobs(row_logits.float().log_softmax(-1).unsqueeze(0), [token], spec.logprobs)[0]
        if spec.prompt_logprobs is not None and prompt_logits is not None and prompt is not None:
            # position i's logits predict token i + 1; the first token has nothing before it
            scored = token_logprobs(prompt_logits[:-1].float().log_softmax(-1), prompt[1:], spec.prompt_logprobs)
            result.prompt = [None, *scored]
        return result


def penalize(logits: torch.Tensor, spec: SamplingSpec, history: _History) -> torch.Tensor:
    """vLLM's penalties: repetition over prompt and generated tokens (divide positive logits, multiply negative
    ones), frequency by how often and presence by whether each token was generated."""
    if spec.repetition_penalty != 1.0:
        seen = history.in_prompt | (history.generated > 0)
        scaled = torch.where(logits > 0, logits / spec.repetition_penalty, logits * spec.repetition_penalty)
        logits = torch.where(seen, scaled, logits)
    if spec.frequency_penalty:
        logits = logits - spec.frequency_penalty * history.generated
    if spec.presence_penalty:
        logits = logits - spec.presence_penalty * (history.generated > 0).float()
    return logits


def token_logprobs(logprobs: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """For each row of `logprobs` [positions, vocab]: the given token's log-probability and the `top` best."""
    picked = logprobs.gather(-1, torch.tensor(tokens, device=logprobs.device).unsqueeze(-1)).squeeze(-1).tolist()
    if top:
        values, ids = logprobs.topk(top, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in tokens]
    return [TokenLogprob(token, logprob, best) for token, logprob, best in zip(tokens, picked, tops)]


def sample_row(logits: torch.Tensor, spec: SamplingSpec, generator: torch.Generator) -> int:
    # float64, infinities clipped: a repetition penalty near 0 divides logits into inf, which softmax
    # would turn into NaN; clipped, the largest logits share the mass. NaN logits still fail the row.
    scaled = torch.nan_to_num(logits.double() / spec.temperature, nan=float("nan"), posinf=1e300, neginf=-1e300)
    probs = torch.softmax(scaled, dim=-1)
    if spec.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        outside = sorted_probs.cumsum(0) - sorted_probs >= spec.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
