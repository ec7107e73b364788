"""Perplexity of a GGUF model on token windows, through llama.cpp's own library (a child of quantize_frontier.py).

    python benchmarks/llama_cpp_score.py MODEL.gguf WINDOWS.npy LLAMA_CPP_ROOT   ->   {"nll": ..., "count": ...}

WINDOWS.npy holds token ids [N, T]; every position after the first of every
window is scored, each window from an empty context, as orion's evaluation
scores its ONNX models. The bindings are llama-cpp-python's, from its source
distribution (the one llama.cpp was built from), over this build's libllama;
they import diskcache (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != here]  # benchmarks/llama_cpp.py shadows the package


def main() -> None:
    gguf, windows_file, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    os.environ["LLAMA_CPP_LIB_PATH"] = str(root / "build" / "bin")
    sys.path.insert(0, str(root.parents[1]))
    import numpy as np
    from llama_cpp import Llama

    windows = np.load(windows_file)
    width = windows.shape[1]
    model = Llama(gguf, n_ctx=width, n_batch=width, logits_all=True, n_threads=2, verbose=False)
    total, count = 0.0, 0
    for row in windows:
        model.reset()
        model.eval(row[:-1].tolist())
        logits = np.array(model.scores[: width - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        log_z = np.log(np.exp(logits).sum(-1))
        total += float((log_z - logits[np.arange(width - 1), row[1:]]).sum())
        count += width - 1
    print(json.dumps({"nll": total, "count": count}))


if __name__ == "__main__":
    main()
