"""Tiny random-init checkpoints of every supported architecture, built from transformers configs.

One line per architecture in TINY: the config class and what makes this
model type itself (grouped-query heads, a head_dim that is not hidden ÷ heads,
sliding windows shorter than the test prompts, softcapping, multipliers,
layers without RoPE, experts). A new architecture costs one line here, and
every table-driven test (serve parity, quantize, merge) picks it up.
Each model gets a byte-level BPE tokenizer trained locally; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_VOCAB = 512
TOKENIZER_TEXT_BYTES = 400_000
SLIDING_WINDOW = 8  # shorter than the prompts the tests send, so the window matters

_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)

_DEEPSEEK = dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                 v_head_dim=24, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                 moe_intermediate_size=48, first_k_dense_replace=1, tie_word_embeddings=False)

# name -> (transformers config class, overrides of _SHAPE and of the class's defaults)
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(sliding_window=SLIDING_WINDOW, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, use_sliding_window=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True)),
    "phi3": ("Phi3Config", dict(original_max_position_embeddings=512, tie_word_embeddings=False)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, n_inner=128)),
    "gpt2-untied": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, n_inner=128,
                                       tie_word_embeddings=False)),
    "gemma": ("GemmaConfig", dict(head_dim=16, num_key_value_heads=1)),
    "gemma-untied": ("GemmaConfig", dict(head_dim=16, tie_word_embeddings=False)),
    # tied, a √hidden-scaled embedding dominates a random model's residual and greedy output repeats one token
    "gemma2": ("Gemma2Config", dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=SLIDING_WINDOW,
                                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                    tie_word_embeddings=False)),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=SLIDING_WINDOW,
                                             layer_types=["sliding_attention", "full_attention"],
                                             final_logit_softcapping=30.0, tie_word_embeddings=False)),
    "granite": ("GraniteConfig", dict(embedding_multiplier=12.0, residual_multiplier=0.22,
                                      attention_multiplier=0.0625, logits_scaling=8.0, tie_word_embeddings=False)),
    "olmo2": ("Olmo2Config", dict(tie_word_embeddings=False)),
    # rotary on a quarter of each head (16 of 64 dims, as StableLM-2), qkv biases, LayerNorm; torch's SDPA
    # export computes its scale from the query's shape. (One head: at width 128 the random net is so chaotic
    # that q4 moves it 0.09 nats.)
    "stablelm": ("StableLmConfig", dict(num_attention_heads=1, num_key_value_heads=1, partial_rotary_factor=0.25,
                                        use_qkv_bias=True, tie_word_embeddings=False)),
    "smollm3": ("SmolLM3Config", dict(no_rope_layers=[1, 0], tie_word_embeddings=True)),
    "phi": ("PhiConfig", dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
                              partial_rotary_factor=0.5, tie_word_embeddings=False)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=128, num_attention_heads=2, rotary_pct=0.25,
                                      tie_word_embeddings=False)),
    "falcon": ("FalconConfig", dict(num_attention_heads=1, num_kv_heads=1, tie_word_embeddings=False)),
    "starcoder2": ("Starcoder2Config", dict(sliding_window=SLIDING_WINDOW, use_bias=True, tie_word_embeddings=False)),
    "olmo": ("OlmoConfig", dict(clip_qkv=8.0, tie_word_embeddings=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                         decoder_sparse_step=1, norm_topk_prob=True, tie_word_embeddings=False)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
    # no num_key_value_heads in its config (multi-head), qk layernorm, rotary on half of each 32-wide head
    "persimmon": ("PersimmonConfig", dict(hidden_size=128, num_key_value_heads=None, tie_word_embeddings=False)),
    # learned positions offset by 2, a base model nested one level deeper (model.decoder), tied head
    "opt": ("OPTConfig", dict(ffn_dim=128, word_embed_proj_dim=64, tie_word_embeddings=True)),
    # multi-head latent attention (keys of 32, values of 24), routed and shared experts after one dense layer
    "deepseek_v3": ("DeepseekV3Config", _DEEPSEEK),
    # the same, with V2's complex-valued rotary embedding (onnx_export/rotary.py)
    "deepseek_v2": ("DeepseekV2Config", _DEEPSEEK),
    # no attention functions: served by onnxruntime, through the standard-decoder export and experts.py's blocks
    "olmoe": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                         shared_expert_intermediate_size=96, tie_word_embeddings=False)),
    "phimoe": ("PhimoeConfig", dict(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
    # each expert stack one 3-D parameter; Granite's multipliers; tied as Granite 3 MoE ships
    "granitemoe": ("GraniteMoeConfig", dict(num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=12.0,
                                            residual_multiplier=0.22, logits_scaling=4.0, tie_word_embeddings=True)),
    # RoPE scaling variants, with original lengths the test prompts exceed
    "llama-rope-llama3": ("LlamaConfig", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                            "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 8})),
    "qwen2-rope-yarn": ("Qwen2Config", dict(rope_scaling={"rope_type": "yarn", "factor": 64.0,
                                                          "original_max_position_embeddings": 8})),
    "phi3-rope-longrope": ("Phi3Config", dict(original_max_position_embeddings=8, rope_scaling={
        "type": "longrope", "long_factor": [1.0 + i / 4 for i in range(8)], "short_factor": [1.0] * 8})),
}
ARCHITECTURES = tuple(TINY)
# The five the seed covered, for tests whose cost grows with the table and whose subject is not breadth.
CORE = ("llama", "mistral", "qwen2", "phi3", "gpt2")


def torch_engine_runs(name: str) -> bool:
    """Whether transformers' class for `name` takes attention functions, as orion serve's torch engine needs;
    the others (StableLM) are served by onnxruntime (tests/test_serve_onnx_export.py)."""
    import transformers
    from transformers import AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping[getattr(transformers, TINY[name][0])]
    return bool(getattr(model_class, "_supports_attention_backend", False))


def tiny_tokenizer():
    from orion_cli.reference.tokenizer import corpus_tokenizer

    return corpus_tokenizer(TINY_VOCAB, TOKENIZER_TEXT_BYTES)


def tiny_config(name: str, **overrides: Any):
    class_name, extra = TINY[name]
    shape = {} if class_name == "GPT2Config" else dict(_SHAPE)
    # Wider than the usual 0.02 so random logits are far apart and greedy decoding is not decided by float
    # rounding. A larger vocab_size override is a padded table, as many real models have (rows no token id reaches).
    return config_of(class_name, **{"initializer_range": 0.2, **shape, **extra, **overrides})


def config_of(class_name: str, **fields: Any):
    """A config of transformers' `class_name` with the tiny tokenizer's vocabulary and special tokens and `fields`
    (its shape; `vocab_size` among them pads the table): the table's models, and the tests whose subject is an
    architecture outside it, such as how orion refuses one."""
    import transformers

    from orion_cli.reference.tokenizer import EOS, PAD

    tokenizer = tiny_tokenizer()
    eos, pad = tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(PAD)
    return getattr(transformers, class_name)(**{"vocab_size": len(tokenizer), "bos_token_id": eos,
                                                "eos_token_id": eos, "pad_token_id": pad, **fields})


def tiny_shape(*without: str) -> dict[str, Any]:
    """The table's shape without the fields a config takes no value for (JetMoE derives its attention heads,
    ModernBERT-decoder has no key/value head count)."""
    return {field: value for field, value in _SHAPE.items() if field not in without}


def jetmoe_config():
    """JetMoE: a standard decoder whose experts' block no export makes traceable (it splits its rows by the
    routing's counts in Python, and its attention is a mixture of experts too)."""
    return config_of("JetMoeConfig", kv_channels=16, num_local_experts=4, num_experts_per_tok=2,
                     **tiny_shape("num_attention_heads"))


def lfm2_config():
    """LFM2 with a convolution layer first: it takes attention functions, but that layer's state is no KV cache."""
    return config_of("Lfm2Config", layer_types=["conv", "full_attention"], **_SHAPE)


def doge_config():
    """Doge: takes attention functions, and hands them a mask computed from its values (dynamic mask attention)."""
    return config_of("DogeConfig", **_SHAPE)


def cohere2_config():
    """Cohere 2: a standard decoder whose export fails inside torch's exporter (transformers 4.57, optimum-onnx 0.1.0),
    which then prints its IR graph from C++."""
    return config_of("Cohere2Config", **_SHAPE)


def modernbert_decoder_config():
    """ModernBERT-decoder: its CausalLM holds a dense layer, activation and norm (`lm_head`) beside the base model,
    before the vocabulary projection (`decoder`), and alternates global and sliding-window attention."""
    return config_of("ModernBertDecoderConfig", global_attn_every_n_layers=2, local_attention=16,
                     **tiny_shape("num_key_value_heads"))


def mamba_config():
    """Mamba: a state-space model, no key/value cache and no attention; not a standard decoder."""
    return config_of("MambaConfig", hidden_size=64, state_size=8, num_hidden_layers=2)


def build_tiny_model(name: str, output: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a random-init model of architecture `name`, its tokenizer and generation config to `output`."""
    if name not in TINY:
        raise ValueError(f"unknown tiny architecture {name!r}; choose from {', '.join(TINY)}")
    return build_model(tiny_config(name, **overrides), output, seed, gemma_norms=name.startswith("gemma"))


def build_model(config, output: str | Path, seed: int = 0, gemma_norms: bool = False) -> Path:
    """Write a random-init model of `config` (a transformers config object), its tokenizer and generation
    config to `output`: for the tests whose subject is an architecture outside the table."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    output = Path(output)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if gemma_norms:  # zero-initialised norms (1 + w) would hide the weight's role in every test
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if param_name.endswith("norm.weight"):
                    param.normal_(0.0, 0.2)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(output, safe_serialization=True)
    tiny_tokenizer().save_pretrained(output)
    return output
