"""Byte-level BPE tokenizers trained locally with `tokenizers`, wrapped as transformers tokenizers."""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]

# ChatML, as Qwen2 and many others use; generation ends at <|endoftext|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(text: str, vocab_size: int):
    """A deterministic byte-level BPE tokenizer as a PreTrainedTokenizerFast."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = text.splitlines(keepends=True)
    tokenizer.train_from_iterator((lines[i : i + 256] for i in range(0, len(lines), 256)), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        # Real model tokenizers declare these two only; without it the tokenizer
        # returns token_type_ids, which generate() rejects.
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )



@lru_cache(maxsize=4)
def corpus_tokenizer(vocab_size: int = 512, text_bytes: int = 400_000):
    """A tokenizer trained on the first `text_bytes` of the corpus's training split (cached per process)."""
    from .corpus import corpus_text

    return train_tokenizer(corpus_text("train", text_bytes), vocab_size)
