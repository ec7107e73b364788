"""Which text calibrates the quantizer and which evaluates it, cut into token windows.

Without --eval-text, calibration reads the reference corpus's training split
and evaluation its held-out split (the reference model's own held-out file when
the model is the reference model), so the two never overlap. With --eval-text,
both come from that file: calibration from its first windows, evaluation from
the windows after them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..reference.corpus import corpus_text
from ..errors import UsageError
from ..reference.model import heldout_text
from .evaluate import token_windows

BYTES_PER_TOKEN = 8  # generous: corpus text is read by bytes, windows are counted in tokens


@dataclass
class TextPlan:
    calibration: np.ndarray  # [n, window + 1] token ids
    evaluation: np.ndarray
    calibration_source: dict[str, Any] = field(default_factory=dict)
    evaluation_source: dict[str, Any] = field(default_factory=dict)


def _describe(name: str, windows: np.ndarray) -> dict[str, Any]:
    tokens = int(windows.shape[0] * (windows.shape[1] - 1)) if len(windows) else 0
    return {"source": name, "windows": int(len(windows)), "tokens": tokens}


def plan_texts(tokenizer, model_dir: Path, eval_text: Path | None, calibration_tokens: int, eval_tokens: int,
               window: int) -> TextPlan:
    want_cal = -(-calibration_tokens // window) if calibration_tokens > 0 else 0
    want_eval = -(-eval_tokens // window) if eval_tokens > 0 else 0
    if eval_text is not None:
        text = eval_text.read_text(encoding="utf-8", errors="replace")
        windows = token_windows(tokenizer, text, window, want_cal + want_eval)
        needed = (want_cal > 0) + (want_eval > 0)
        if len(windows) < needed:
            raise UsageError(
                f"--eval-text {eval_text}: too short; it needs at least {needed * (window + 1)} tokens "
                f"({needed} window(s) of {window + 1})"
            )
        if len(windows) >= want_cal + want_eval:
            n_cal = want_cal
        else:  # share what there is, calibration never reading the evaluation's windows
            n_cal = len(windows) // 2 if want_eval else len(windows)
            n_cal = max(n_cal, 1) if want_cal else 0
        calibration, evaluation = windows[:n_cal], windows[n_cal : n_cal + want_eval]
        name = str(eval_text)
        return TextPlan(calibration, evaluation, _describe(name, calibration), _describe(name, evaluation))

    calibration = token_windows(tokenizer, corpus_text("train", want_cal * window * BYTES_PER_TOKEN), window, want_cal) \
        if want_cal else np.zeros((0, window + 1), dtype=np.int64)
    reference_heldout = heldout_text(model_dir)
    if reference_heldout is not None:
        held, held_name = reference_heldout, "reference model held-out split (heldout.txt)"
    else:
        held, held_name = corpus_text("heldout", max(want_eval, 1) * window * BYTES_PER_TOKEN), "corpus held-out split"
    evaluation = token_windows(tokenizer, held, window, want_eval) if want_eval else np.zeros((0, window + 1), np.int64)
    return TextPlan(calibration, evaluation, _describe("corpus training split", calibration),
                    _describe(held_name, evaluation))
