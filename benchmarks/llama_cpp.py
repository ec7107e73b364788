"""llama.cpp, the peer: where its build is, and its converter wrapped for locally trained tokenizers.

Build it once (about 15 minutes on 2 cores), outside the repository:

    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d ~/.cache/orion-peer
    tar xzf ~/.cache/orion-peer/llama_cpp_python-0.3.36.tar.gz -C ~/.cache/orion-peer
    cmake -S ~/.cache/orion-peer/llama_cpp_python-0.3.36/vendor/llama.cpp -B .../build \\
          -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF
    cmake --build .../build --target llama-server llama-quantize llama-perplexity llama-imatrix -j 2

ORION_LLAMA_CPP points at another checkout (the directory holding convert_hf_to_gguf.py and build/).

convert_hf_to_gguf.py identifies a BPE tokenizer's pre-tokenizer by hashing
how it splits a test string and refuses hashes it does not know, which
every locally trained tokenizer has. orion's tokenizers are byte-level BPE
split the way GPT-2 splits, so `python benchmarks/llama_cpp.py convert MODEL
OUT.gguf` maps an unknown hash to "gpt-2" and runs the converter unchanged
otherwise. (Comparisons score token ids, never text, so the choice cannot
favour either side.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_ROOT = Path.home() / ".cache" / "orion-peer" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"


def llama_cpp_root() -> Path | None:
    root = Path(os.environ.get("ORION_LLAMA_CPP", DEFAULT_ROOT))
    return root if (root / "convert_hf_to_gguf.py").is_file() and (root / "build" / "bin").is_dir() else None


def tool(name: str) -> Path:
    root = llama_cpp_root()
    if root is None:
        raise SystemExit(f"llama.cpp is not built at {DEFAULT_ROOT} (or $ORION_LLAMA_CPP); see {__file__}")
    return root / "build" / "bin" / name


def convert_command(model: Path, gguf: Path, outtype: str = "bf16") -> list[str]:
    """The command converting a Hugging Face checkpoint to GGUF (run it as its own process)."""
    return [sys.executable, __file__, "convert", str(model), str(gguf), outtype]


def _convert(model: str, gguf: str, outtype: str) -> None:
    root = llama_cpp_root()
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    from conversion import base

    original = base.TextModel.get_vocab_base_pre

    def pre_tokenizer(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:  # a locally trained byte-level BPE: GPT-2's pre-tokenizer
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = pre_tokenizer
    from conversion import phi

    sentencepiece_vocab = phi.Phi3MiniModel.set_vocab

    def phi3_vocab(self) -> None:  # Phi-3's converter insists on a SentencePiece model; ours is byte-level BPE
        if not (self.dir_model / "tokenizer.model").is_file():
            return self._set_vocab_gpt2()
        return sentencepiece_vocab(self)

    phi.Phi3MiniModel.set_vocab = phi3_vocab
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", gguf, "--outtype", outtype]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "convert":
        raise SystemExit("usage: python benchmarks/llama_cpp.py convert MODEL_DIR OUT.gguf OUTTYPE")
    _convert(*sys.argv[2:])
