"""How much a quantized model departs from the fp32 model it came from.

The reference is transformers' own model in fp32, run layer by layer from
the checkpoint (layerwise.py), so --test costs a layer's memory like the rest
of quantize; the quantized model runs in onnxruntime through OnnxDecoder.
Both read the same token windows of held-out text (no past, so no KV cache is
involved); from the two next-token distributions at every position come
perplexity, the KL divergence KL(fp32 || quantized) and how often their top-1
tokens agree. Logits are formed a few windows at a time, so memory stays at
a few batches of logits, whatever the vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..progress import Advance

if TYPE_CHECKING:
    from ..onnx_decoder import OnnxDecoder
    from .layerwise import LayerwiseModel

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
        take = lambda lp: np.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
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


def _compare(reference_logits, candidate_logits, windows: np.ndarray, advance: Advance | None) -> QualityFigures:
    acc = _Accumulator()
    for start in range(0, len(windows), BATCH_WINDOWS):
        stop = min(start + BATCH_WINDOWS, len(windows))
        acc.add(log_softmax(reference_logits(start, stop)), log_softmax(candidate_logits(start, stop)),
                windows[start:stop, 1:])
        if advance:
            advance(stop - start)
    return acc.figures()


def compare_with_reference(reference: LayerwiseModel, candidate: OnnxDecoder, windows: np.ndarray,
                           advance: Advance | None = None) -> QualityFigures:
    """Perplexity of both models, KL and top-1 agreement of the candidate against the fp32 reference."""
    inputs = windows[:, :-1]
    hidden = reference.final_hidden(inputs)
    return _compare(lambda start, stop: reference.logits(hidden[start:stop]).numpy(),
                    lambda start, stop: candidate.logits(inputs[start:stop]), windows, advance)


def compare_onnx(reference: OnnxDecoder, candidate: OnnxDecoder, windows: np.ndarray,
                 advance: Advance | None = None) -> QualityFigures:
    """The same figures for two ONNX models (benchmarks compare other tools' output this way)."""
    inputs = windows[:, :-1]
    return _compare(lambda start, stop: reference.logits(inputs[start:stop]),
                    lambda start, stop: candidate.logits(inputs[start:stop]), windows, advance)


def reference_greedy(reference: LayerwiseModel, prompt: list[int], max_new_tokens: int,
                     eos: set[int] = frozenset()) -> list[int]:
    """Greedy decoding with the fp32 reference, without a cache (each step reruns the whole sequence)."""
    ids, out = list(prompt), []
    for _ in range(max_new_tokens):
        hidden = reference.final_hidden(np.array([ids], dtype=np.int64))
        token = int(reference.logits(hidden[:, -1]).argmax())
        if token in eos:
            break
        out.append(token)
        ids.append(token)
    return out


def evaluate_quantized(reference, decoder, texts, tokenizer, prompt: str, completion_tokens: int,
                       progress) -> tuple[dict[str, Any], dict[str, str]]:
    """--test: the figures against transformers' fp32 model on the evaluation windows, and both models'
    greedy completions of `prompt`."""
    with progress.stage("Evaluating against the fp32 model", total=len(texts.evaluation)) as advance:
        figures = compare_with_reference(reference, decoder, texts.evaluation, advance)
    with progress.stage("Greedy completion of the prompt"):
        ids = tokenizer(prompt)["input_ids"]
        eos = {tokenizer.eos_token_id} - {None}
        completions = {
            "fp32": tokenizer.decode(reference_greedy(reference, ids, completion_tokens, eos), skip_special_tokens=True),
            "quantized": tokenizer.decode(decoder.greedy(ids, completion_tokens, eos), skip_special_tokens=True),
        }
    quality = {
        **figures.as_dict(),
        "reference": "transformers, fp32, run from the checkpoint a layer at a time",
        "eval": texts.evaluation_source,
        "window_tokens": int(texts.evaluation.shape[1] - 1) if len(texts.evaluation) else 0,
        "completion": {"prompt": prompt, "max_new_tokens": completion_tokens, **completions},
    }
    return quality, completions
