"""Tiny random-init checkpoints of several architectures, for tests and quick demos.

Built from transformers configs, deterministic for a given seed, each with a
byte-level BPE tokenizer trained locally. Nothing is downloaded.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from ..corpus import corpus_text
from .tokenizer import EOS, PAD, train_tokenizer

TINY_VOCAB = 512
TOKENIZER_TEXT_BYTES = 400_000

ARCHITECTURES = ("llama", "mistral", "qwen2", "phi3", "gpt2")


def _common(vocab: int, eos: int, pad: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
        # Wider than the usual 0.02 so random logits are far apart and greedy
        # decoding is not decided by float rounding.
        initializer_range=0.2,
    )


def _llama(vocab, eos, pad, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                       **_common(vocab, eos, pad), **kw)


def _mistral(vocab, eos, pad, **kw):
    from transformers import MistralConfig

    return MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, sliding_window=None,
                         tie_word_embeddings=False, **_common(vocab, eos, pad), **kw)


def _qwen2(vocab, eos, pad, **kw):
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                       use_sliding_window=False, **_common(vocab, eos, pad), **kw)


def _phi3(vocab, eos, pad, **kw):
    from transformers import Phi3Config

    return Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, original_max_position_embeddings=512,
                      tie_word_embeddings=False, **_common(vocab, eos, pad), **kw)


def _gpt2(vocab, eos, pad, **kw):
    from transformers import GPT2Config

    return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, n_inner=128,
                      **_common(vocab, eos, pad), **kw)


_CONFIGS: dict[str, Callable[..., Any]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "phi3": _phi3,
    "gpt2": _gpt2,
}


@lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = TINY_VOCAB):
    return train_tokenizer(corpus_text("train", TOKENIZER_TEXT_BYTES), vocab_size)


def build_tiny_model(arch: str, output: str | Path, seed: int = 0, **config_overrides: Any) -> Path:
    """Write a random-init `arch` model, its tokenizer and generation config to `output`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if arch not in _CONFIGS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    output = Path(output)
    tokenizer = tiny_tokenizer()
    eos, pad = tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(PAD)
    config = _CONFIGS[arch](len(tokenizer), eos, pad, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    return output
