"""Where each supported architecture keeps its weights, and what its shape allows.

The sharded model in model.py is one decoder; what differs between Llama,
Mistral, Qwen2, Phi-3 and GPT-2 is written here as data: tensor names, which
projections are fused into one tensor (Phi-3's qkv_proj and gate_up_proj,
GPT-2's c_attn), and which are stored transposed (GPT-2's Conv1D keeps
[in, out]). Each rank reads only its rows or columns of those tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedModelError, UsageError

# model_type -> the decoder family it is computed with
SUPPORTED = {"llama": "rotary", "mistral": "rotary", "qwen2": "rotary", "phi3": "rotary", "gpt2": "gpt2"}


@dataclass(frozen=True)
class Proj:
    """One projection's weight inside a checkpoint tensor.

    `offset` is where its output features start inside a fused tensor; `conv1d`
    marks GPT-2's layout, which stores the weight as [in, out].
    """

    weight: str
    bias: str | None = None
    offset: int = 0
    conv1d: bool = False


@dataclass(frozen=True)
class LayerNames:
    attn_norm: str
    attn_norm_bias: str | None
    mlp_norm: str
    mlp_norm_bias: str | None
    q: Proj
    k: Proj
    v: Proj
    o: Proj
    gate: Proj | None  # None: a plain (non-gated) MLP, GPT-2's
    up: Proj
    down: Proj


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    activation: str
    tie_word_embeddings: bool
    max_positions: int
    sliding_window: int | None
    attention_scale: float
    scale_by_layer: bool  # GPT-2's scale_attn_by_inverse_layer_idx

    def kv_heads_per_rank(self, tp: int) -> int:
        """KV heads each rank holds: a share, or one replicated head when tp exceeds their count."""
        return max(1, self.num_kv_heads // tp)

    def kv_head_start(self, tp: int, rank: int) -> int:
        if self.num_kv_heads >= tp:
            return rank * (self.num_kv_heads // tp)
        return rank // (tp // self.num_kv_heads)

    # -- tensor names -----------------------------------------------------------

    @property
    def embed(self) -> str:
        return "transformer.wte.weight" if self.family == "gpt2" else "model.embed_tokens.weight"

    @property
    def position_embed(self) -> str | None:
        return "transformer.wpe.weight" if self.family == "gpt2" else None

    @property
    def final_norm(self) -> tuple[str, str | None]:
        if self.family == "gpt2":
            return "transformer.ln_f.weight", "transformer.ln_f.bias"
        return "model.norm.weight", None

    @property
    def lm_head(self) -> str:
        return self.embed if self.tie_word_embeddings else "lm_head.weight"

    def layer(self, index: int, has: Any) -> LayerNames:
        """Names of layer `index`'s tensors; `has(name)` says whether an optional bias exists."""
        qd, kvd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.family == "gpt2":
            p = f"transformer.h.{index}."
            attn = f"{p}attn.c_attn."
            return LayerNames(
                attn_norm=f"{p}ln_1.weight", attn_norm_bias=f"{p}ln_1.bias",
                mlp_norm=f"{p}ln_2.weight", mlp_norm_bias=f"{p}ln_2.bias",
                q=Proj(attn + "weight", attn + "bias", 0, True),
                k=Proj(attn + "weight", attn + "bias", qd, True),
                v=Proj(attn + "weight", attn + "bias", qd + kvd, True),
                o=Proj(f"{p}attn.c_proj.weight", f"{p}attn.c_proj.bias", 0, True),
                gate=None,
                up=Proj(f"{p}mlp.c_fc.weight", f"{p}mlp.c_fc.bias", 0, True),
                down=Proj(f"{p}mlp.c_proj.weight", f"{p}mlp.c_proj.bias", 0, True),
            )
        p = f"model.layers.{index}."

        def proj(name: str, offset: int = 0, fused_name: str | None = None) -> Proj:
            base = p + (fused_name or name)
            bias = base + ".bias"
            return Proj(base + ".weight", bias if has(bias) else None, offset)

        if self.model_type == "phi3":
            q, k, v = proj("q", 0, "self_attn.qkv_proj"), proj("k", qd, "self_attn.qkv_proj"), proj("v", qd + kvd, "self_attn.qkv_proj")
            gate = proj("gate", 0, "mlp.gate_up_proj")
            up = proj("up", self.intermediate_size, "mlp.gate_up_proj")
        else:
            q, k, v = proj("self_attn.q_proj"), proj("self_attn.k_proj"), proj("self_attn.v_proj")
            gate, up = proj("mlp.gate_proj"), proj("mlp.up_proj")
        return LayerNames(
            attn_norm=p + "input_layernorm.weight", attn_norm_bias=None,
            mlp_norm=p + "post_attention_layernorm.weight", mlp_norm_bias=None,
            q=q, k=k, v=v, o=proj("self_attn.o_proj"), gate=gate, up=up, down=proj("mlp.down_proj"),
        )


def model_shape(config: Any) -> ModelShape:
    """The shape facts of a transformers config object (AutoConfig), or UnsupportedModelError."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        arch = (getattr(config, "architectures", None) or [model_type])[0]
        raise UnsupportedModelError(
            f"MODEL_DIR: architecture {arch!r} (model_type {model_type!r}) is not supported by orion serve; "
            f"supported: {', '.join(sorted(SUPPORTED))}"
        )
    family = SUPPORTED[model_type]
    if family == "gpt2":
        hidden, heads = config.n_embd, config.n_head
        return ModelShape(
            model_type=model_type, family=family, vocab_size=config.vocab_size, hidden_size=hidden,
            num_layers=config.n_layer, num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
            intermediate_size=config.n_inner or 4 * hidden, norm_eps=config.layer_norm_epsilon,
            activation=config.activation_function, tie_word_embeddings=True, max_positions=config.n_positions,
            sliding_window=None,
            attention_scale=(hidden // heads) ** -0.5 if config.scale_attn_weights else 1.0,
            scale_by_layer=bool(config.scale_attn_by_inverse_layer_idx),
        )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    window = getattr(config, "sliding_window", None)
    if model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        window = None
    return ModelShape(
        model_type=model_type, family=family, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
        intermediate_size=config.intermediate_size, norm_eps=config.rms_norm_eps, activation=config.hidden_act,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        max_positions=config.max_position_embeddings, sliding_window=window,
        attention_scale=head_dim ** -0.5, scale_by_layer=False,
    )


def check_tensor_parallel(shape: ModelShape, tp: int) -> None:
    """Fail with the flag at fault when `tp` cannot split this model's heads and MLP evenly."""
    if shape.num_heads % tp:
        raise UsageError(
            f"--tp {tp}: does not divide the model's {shape.num_heads} attention heads; "
            f"choose one of {', '.join(str(d) for d in divisors(shape.num_heads))}"
        )
    kv = shape.num_kv_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise UsageError(
            f"--tp {tp}: the model's {kv} key/value heads can be neither split nor replicated evenly over {tp} ranks"
        )
    if shape.intermediate_size % tp:
        raise UsageError(f"--tp {tp}: does not divide the model's MLP width {shape.intermediate_size}")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def split_layers(num_layers: int, pp: int, pp_split: str | list[int] | None) -> list[range]:
    """Contiguous layer ranges, one per pipeline stage: even by default, or as --pp-split says."""
    if pp > num_layers:
        raise UsageError(f"--pp {pp}: the model has only {num_layers} layers")
    if pp_split is None or pp_split == "":
        base, extra = divmod(num_layers, pp)
        counts = [base + (1 if stage < extra else 0) for stage in range(pp)]
    else:
        try:
            counts = [int(part) for part in pp_split.split(",")] if isinstance(pp_split, str) else list(pp_split)
        except ValueError:
            raise UsageError(f"--pp-split {pp_split}: expected comma-separated layer counts, e.g. 10,14") from None
        if len(counts) != pp:
            raise UsageError(f"--pp-split {pp_split}: gives {len(counts)} stages but --pp is {pp}")
        if any(c < 1 for c in counts):
            raise UsageError(f"--pp-split {pp_split}: every stage needs at least one layer")
        if sum(counts) != num_layers:
            raise UsageError(f"--pp-split {pp_split}: sums to {sum(counts)} layers but the model has {num_layers}")
    ranges, start = [], 0
    for count in counts:
        ranges.append(range(start, start + count))
        start += count
    return ranges
