"""How much a quantized model departs from its fp32 export, measured in onnxruntime.

Both models read the same token windows of held-out text in one forward pass
each (no past, so no KV cache is involved); from the two next-token
distributions at every position come perplexity, the KL divergence
KL(fp32 || quantized) and how often their top-1 tokens agree. Windows go through
in small batches so memory stays at a few batches of logits, whatever the vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ..progress import Advance

BATCH_WINDOWS = 8


@dataclass(frozen=True)
class QualityFigures:
    tokens: int
    perplexity_fp32: float
    perplexity: float
    kl_divergence: float  # mean over positions, nats
    top1_agreement: float  # fraction of positions

    @property
    def perplexity_change(self) -> float:
        """Relative change of perplexity against fp32 (0.02 = 2% worse)."""
        return self.perplexity / self.perplexity_fp32 - 1.0

    def as_dict(self) -> dict[str, Any]:
        data = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        data["perplexity_change"] = round(self.perplexity_change, 6)
        return data


def token_windows(tokenizer, text: str, window: int, max_windows: int) -> np.ndarray:
    """Non-overlapping [n, window + 1] windows of token ids (each predicts its own last `window` tokens)."""
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    count = min(max_windows, (len(ids) - 1) // window)
    if count < 1:
        return np.zeros((0, window + 1), dtype=np.int64)
    return np.stack([ids[i * window : i * window + window + 1] for i in range(count)])


class OnnxLM:
    """One onnxruntime session over a decoder exported with past key values, run without a past."""

    def __init__(self, model: str | Path | bytes, threads: int | None = None, extra_inputs: Iterable[str] = ()):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        extra = set(extra_inputs)
        self.inputs = [i for i in self.session.get_inputs() if i.name not in extra]

    def feeds(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        batch, length = input_ids.shape
        feeds: dict[str, np.ndarray] = {}
        for item in self.inputs:
            if item.name == "input_ids":
                feeds[item.name] = input_ids
            elif item.name == "attention_mask":
                feeds[item.name] = np.ones((batch, length), dtype=np.int64)
            elif item.name == "position_ids":
                feeds[item.name] = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()
            elif item.name.startswith("past_key_values"):
                shape = [batch if i == 0 else (d if isinstance(d, int) else 0) for i, d in enumerate(item.shape)]
                feeds[item.name] = np.zeros(shape, dtype=np.float32)
            else:
                raise ValueError(f"unexpected model input {item.name!r}")
        return feeds

    def logits(self, input_ids: np.ndarray, extra: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        feeds = self.feeds(input_ids)
        if extra:
            feeds.update(extra)
        return self.session.run(["logits"], feeds)[0]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """In float32: KL values of 1e-4 stay exact to a few digits, and it is twice as fast as float64."""
    shifted = logits.astype(np.float32) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)


class _Accumulator:
    def __init__(self) -> None:
        self.tokens = 0
        self.nll_ref = 0.0
        self.nll = 0.0
        self.kl = 0.0
        self.agree = 0

    def add(self, ref_logp: np.ndarray, logp: np.ndarray, targets: np.ndarray) -> None:
        take = lambda lp: np.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]  # noqa: E731
        self.nll_ref -= float(take(ref_logp).sum(dtype=np.float64))
        self.nll -= float(take(logp).sum(dtype=np.float64))
        self.kl += float((np.exp(ref_logp) * (ref_logp - logp)).sum(dtype=np.float64))
        self.agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
        self.tokens += targets.size

    def figures(self) -> QualityFigures:
        n = max(self.tokens, 1)
        return QualityFigures(
            tokens=self.tokens,
            perplexity_fp32=math.exp(self.nll_ref / n),
            perplexity=math.exp(self.nll / n),
            kl_divergence=self.kl / n,
            top1_agreement=self.agree / n,
        )


def compare(reference: OnnxLM, candidate: OnnxLM, windows: np.ndarray, advance: Advance | None = None,
            candidate_inputs: Mapping[str, np.ndarray] | None = None) -> QualityFigures:
    """Perplexity of both models, KL and top-1 agreement of the candidate against the reference."""
    acc = _Accumulator()
    for start in range(0, len(windows), BATCH_WINDOWS):
        batch = windows[start : start + BATCH_WINDOWS]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        ref_logp = log_softmax(reference.logits(inputs))
        logp = log_softmax(candidate.logits(inputs, candidate_inputs))
        acc.add(ref_logp, logp, targets)
        if advance:
            advance(len(batch))
    return acc.figures()


class CachedReference:
    """The fp32 model's log-probabilities on a fixed set of windows, computed once.

    The q3 allocation scores dozens of candidate weight sets against the same
    reference; caching its distributions halves the work.
    """

    def __init__(self, reference: OnnxLM, windows: np.ndarray, extra: Mapping[str, np.ndarray] | None = None):
        self.windows = windows
        self.batches = []
        for start in range(0, len(windows), BATCH_WINDOWS):
            batch = windows[start : start + BATCH_WINDOWS]
            self.batches.append((batch, log_softmax(reference.logits(batch[:, :-1], extra))))

    def score(self, candidate: OnnxLM, extra: Mapping[str, np.ndarray] | None = None) -> QualityFigures:
        acc = _Accumulator()
        for batch, ref_logp in self.batches:
            acc.add(ref_logp, log_softmax(candidate.logits(batch[:, :-1], extra)), batch[:, 1:])
        return acc.figures()
