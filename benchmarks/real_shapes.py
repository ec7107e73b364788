"""Random-weight checkpoints of real models' shapes, written tensor by tensor (for bench_quantize --scale).

The model is built from its transformers config on the meta device, so only
its shapes exist; each tensor is then drawn (normal, std 0.02, as
transformers initializes) in the checkpoint dtype and written into
safetensors shards of at most SHARD_BYTES with a model.safetensors.index.json,
as save_pretrained lays out a sharded checkpoint. Memory stays at one shard.
The tokenizer is orion's locally trained byte-level BPE (no download); the
config's vocabulary is larger than its, which only leaves embedding rows
unused.

    python benchmarks/real_shapes.py phi-3-mini /data/phi-3-mini-random
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARD_BYTES = 2 << 30

# name -> (config class, arguments): the published configs' shapes
SHAPES = {
    "tinyllama-1.1b": ("LlamaConfig", dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
        tie_word_embeddings=False)),
    "phi-3-mini": ("Phi3Config", dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
        original_max_position_embeddings=4096, sliding_window=2047, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "llama-3-8b": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "starcoder2-3b": ("Starcoder2Config", dict(
        hidden_size=3072, intermediate_size=12288, num_hidden_layers=30, num_attention_heads=24,
        num_key_value_heads=2, vocab_size=49152, max_position_embeddings=16384, sliding_window=4096,
        rope_theta=999999.4420358813, norm_epsilon=1e-5, use_bias=True, tie_word_embeddings=True)),
    "opt-125m": ("OPTConfig", dict(
        hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12, word_embed_proj_dim=768,
        vocab_size=50272, max_position_embeddings=2048, do_layer_norm_before=True, tie_word_embeddings=True)),
    "olmoe-1b-7b": ("OlmoeConfig", dict(
        hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, vocab_size=50304,
        max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "qwen1.5-moe-a2.7b": ("Qwen2MoeConfig", dict(
        hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
        num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
        norm_topk_prob=False, vocab_size=151936, max_position_embeddings=8192, rope_theta=1000000.0,
        rms_norm_eps=1e-6, use_sliding_window=False, tie_word_embeddings=False)),
    "granite-3.1-1b-a400m": ("GraniteMoeConfig", dict(
        hidden_size=1024, intermediate_size=512, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
        num_local_experts=32, num_experts_per_tok=8, vocab_size=49155, max_position_embeddings=131072,
        rope_theta=10000000.0, rms_norm_eps=1e-6, embedding_multiplier=12.0, residual_multiplier=0.22,
        attention_multiplier=0.015625, logits_scaling=6.0, tie_word_embeddings=True)),
    "deepseek-v2-lite": ("DeepseekV2Config", dict(
        hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
        kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
        norm_topk_prob=False, vocab_size=102400, max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        rms_norm_eps=1e-6, tie_word_embeddings=False)),
}


def write_random_checkpoint(name: str, output: Path, dtype: str = "bfloat16", seed: int = 0,
                            layers: int | None = None) -> Path:
    """`name`'s shapes with random weights in `output`; `layers` keeps only the first so many decoder layers
    (each of the real shape), for a trial of an architecture whose whole model would not fit the machine."""
    import torch
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    from orion_cli.reference.tokenizer import EOS, PAD, corpus_tokenizer

    class_name, arguments = SHAPES[name]
    tokenizer = corpus_tokenizer(512, 400_000)
    arguments = {**arguments, **({"num_hidden_layers": layers} if layers else {})}
    config = getattr(transformers, class_name)(
        **arguments, bos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS), pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        torch_dtype=dtype)
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config)
    output.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    weight_map: dict[str, str] = {}
    total = 0
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    names = list(model.state_dict())

    def flush() -> None:
        index = len(shards)
        file = f"model-{index:05d}.safetensors"
        save_file(shards[-1], str(output / file), metadata={"format": "pt"})
        for key in shards[-1]:
            weight_map[key] = file
        shards[-1] = {}

    for key in names:
        param = tensors[key]
        if key.endswith("norm.weight") or key.endswith("layernorm.weight"):
            tensor = torch.ones(param.shape, dtype=torch_dtype)
        else:
            tensor = (torch.randn(param.shape, generator=generator, dtype=torch.float32) * 0.02).to(torch_dtype)
        size = tensor.numel() * tensor.element_size()
        if shard_bytes and shard_bytes + size > SHARD_BYTES:
            flush()
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor
        shard_bytes += size
        total += size
    flush()
    count = len(shards)
    renamed = {}
    for i in range(1, count + 1):  # save_pretrained's names: model-00001-of-00004.safetensors
        old, new = f"model-{i:05d}.safetensors", f"model-{i:05d}-of-{count:05d}.safetensors"
        (output / old).rename(output / new)
        renamed[old] = new
    index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.architectures = [type(model).__name__]  # what save_pretrained records; llama.cpp's converter reads it
    config.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(SHAPES))
    parser.add_argument("output", type=Path)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, help="keep only the first N decoder layers (a trial of a model too "
                        "large for the machine)")
    args = parser.parse_args()
    print(write_random_checkpoint(args.name, args.output, args.dtype, layers=args.layers), file=sys.stderr)


if __name__ == "__main__":
    main()
