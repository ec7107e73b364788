"""The built-in reference model and what it is made from, all offline.

corpus.py     the Python standard library's source, split into training and held-out files
tokenizer.py  byte-level BPE tokenizers trained locally
model.py      a small Llama trained on the corpus, cached; quality is measured on it
"""

from .corpus import corpus_digest, corpus_files, corpus_text, split_of, stdlib_root
from .model import (Recipe, ensure_reference_model, evaluate_perplexity, heldout_text, reference_model_dir,
                    train_reference_model)

__all__ = [
    "Recipe", "corpus_digest", "corpus_files", "corpus_text", "ensure_reference_model", "evaluate_perplexity",
    "heldout_text", "reference_model_dir", "split_of", "stdlib_root", "train_reference_model",
]
