"""The reference model: a small Llama trained here, offline, on the standard library's source.

Quantization and merge quality are measured on it, because random weights make
quantization look better than it is. It is deterministic for a machine, takes a
few minutes on two cores, and is cached under the orion cache directory keyed by
its recipe and corpus, so later runs reuse it.

Build it alone: python -m orion_cli.reference [--cache-dir DIR] [--force]
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

from ..atomic import atomic_output_dir
from ..modeldir import METADATA_FILE
from ..progress import NULL_PROGRESS, ProgressReporter
from ..provenance import make_provenance
from .corpus import corpus_digest, corpus_text, stdlib_root

log = logging.getLogger(__name__)

HELDOUT_FILE = "heldout.txt"


@dataclass(frozen=True)
class Recipe:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    max_position_embeddings: int = 512
    train_bytes: int = 4_000_000
    seq_len: int = 128
    batch_size: int = 24
    steps: int = 250
    warmup_steps: int = 25
    learning_rate: float = 3e-3
    weight_decay: float = 0.1
    seed: int = 0
    eval_tokens: int = 60_000
    version: int = 1  # bump when the training code changes what it produces

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True) + corpus_digest()
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def reference_model_dir(cache_dir: Path, recipe: Recipe = Recipe()) -> Path:
    return Path(cache_dir) / "reference-model" / recipe.key()


def ensure_reference_model(
    cache_dir: Path, recipe: Recipe = Recipe(), force: bool = False, progress: ProgressReporter = NULL_PROGRESS
) -> Path:
    """The cached reference model directory, trained first if it is not there yet."""
    target = reference_model_dir(cache_dir, recipe)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if (target / METADATA_FILE).is_file() and not force:
            return target
        with atomic_output_dir(target, force=True) as tmp:
            train_reference_model(tmp, recipe, progress)
    return target


def heldout_text(model_dir: Path) -> str | None:
    """The held-out split stored beside a reference model, or None for other models."""
    path = Path(model_dir) / HELDOUT_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


def train_reference_model(output: Path, recipe: Recipe, progress: ProgressReporter = NULL_PROGRESS) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from .tokenizer import EOS, PAD, train_tokenizer

    started = time.perf_counter()
    with progress.stage("Tokenizer: training byte-level BPE on the stdlib corpus"):
        train_text = corpus_text("train", recipe.train_bytes)
        held_text = corpus_text("heldout")
        tokenizer = train_tokenizer(train_text, recipe.vocab_size)
        train_ids = torch.tensor(tokenizer(train_text)["input_ids"], dtype=torch.long)
        held_ids = torch.tensor(tokenizer(held_text)["input_ids"][: recipe.eval_tokens], dtype=torch.long)

    eos, pad = tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(PAD)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay,
                                  betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, recipe))

    model.train()
    losses = []
    with progress.stage("Reference model: training", total=recipe.steps) as advance:
        for _ in range(recipe.steps):
            starts = torch.randint(0, len(train_ids) - recipe.seq_len - 1, (recipe.batch_size,), generator=generator)
            batch = torch.stack([train_ids[s : s + recipe.seq_len] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            advance(1)

    model.eval()
    with progress.stage("Reference model: held-out perplexity"):
        perplexity = evaluate_perplexity(model, held_ids, recipe.seq_len)
    log.info("reference model: held-out perplexity %.2f after %d steps", perplexity, recipe.steps)

    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    (output / HELDOUT_FILE).write_text(held_text, encoding="utf-8")
    summary = {
        "heldout_file": HELDOUT_FILE,
        "heldout_perplexity": round(perplexity, 3),
        "heldout_tokens": int(len(held_ids)),
        "train_tokens_seen": recipe.steps * recipe.batch_size * recipe.seq_len,
        "final_train_loss": round(sum(losses[-10:]) / min(10, len(losses)), 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    metadata = {
        "provenance": make_provenance(
            "train", asdict(recipe), [{"path": str(stdlib_root()), "sha256": corpus_digest()}]
        ),
        "reference": summary,
    }
    (output / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return summary


def _lr_factor(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def evaluate_perplexity(model, ids, seq_len: int) -> float:
    """Perplexity over non-overlapping windows of `ids` (a 1-D LongTensor)."""
    import torch

    total_loss, total_tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, seq_len):
            window = ids[start : start + seq_len + 1]
            if len(window) < 2:
                break
            logits = model(input_ids=window[:-1].unsqueeze(0)).logits[0]
            loss = torch.nn.functional.cross_entropy(logits.float(), window[1:], reduction="sum")
            total_loss += loss.item()
            total_tokens += len(window) - 1
    return math.exp(total_loss / total_tokens)
