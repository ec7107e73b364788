"""How a model is split: its tensor- and pipeline-parallel plans, read from its transformers config.

transformers 4.57 configs carry `base_model_tp_plan` (module pattern -> style,
e.g. "layers.*.self_attn.q_proj": "colwise") and `base_model_pp_plan` (the
base model's modules in execution order: embeddings, the layer list, the final
norm). Where a config has none, orion supplies one here, as data: a few lines
per model type, never model code. What neither has serves at tp=1 and pp=1.
Everything a plan cannot split is refused before any worker starts, naming
the flag and the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedModelError, UsageError

# Styles orion runs. colwise: a share of the output features; rowwise: a share of the input
# features and one all-reduce; *_rep: the same, with the output gathered (colwise) or the input
# taken replicated (rowwise); replicate: the whole layer on every rank.
STYLES = ("colwise", "rowwise", "colwise_rep", "rowwise_rep", "replicate")

# model_type -> (tensor-parallel plan, pipeline stages' modules), for configs that ship neither.
# GPT-2's attention projection c_attn holds q|k|v fused in one Conv1D ([in, out] weights), so it is
# split and gathered like Phi-3's fused qkv_proj in transformers' own plan.
ORION_PLANS: dict[str, tuple[dict[str, str], list[str]]] = {
    "gpt2": ({"h.*.attn.c_attn": "colwise_rep", "h.*.attn.c_proj": "rowwise_rep",
              "h.*.mlp.c_fc": "colwise", "h.*.mlp.c_proj": "rowwise"},
             ["wte", "wpe", "drop", "h", "ln_f"]),
    # Persimmon's fused query_key_value is laid out head by head ([heads, 3, head_dim]), so a colwise share is
    # whole heads, each with its q, k and v; its attention views by num_heads (stage.py's _heads_per_rank)
    "persimmon": ({"layers.*.self_attn.query_key_value": "colwise", "layers.*.self_attn.dense": "rowwise",
                   "layers.*.mlp.dense_h_to_4h": "colwise", "layers.*.mlp.dense_4h_to_h": "rowwise"},
                  ["embed_tokens", "layers", "final_layernorm"]),
    # OPT's base model is model.decoder (stage.py); project_in/out are None unless word_embed_proj_dim differs
    "opt": ({"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.k_proj": "colwise",
             "layers.*.self_attn.v_proj": "colwise", "layers.*.self_attn.out_proj": "rowwise",
             "layers.*.fc1": "colwise", "layers.*.fc2": "rowwise"},
            ["embed_tokens", "embed_positions", "project_in", "layers", "final_layer_norm", "project_out"]),
    # stages only: its MLP's Wi holds gate and up stacked, which a plain colwise share would split apart
    "modernbert-decoder": ({}, ["embeddings", "layers", "final_norm"]),
}


# transformers' styles for experts sharded without DTensors: local_colwise and local_rowwise split a linear and
# communicate nothing, and "gather" on the MoE block all-reduces its output ("local" marks a container). orion's
# rowwise all-reduces each linear's output instead: the block's output, a weighted sum of its linears' outputs,
# comes out the same, at one all-reduce per expert run instead of one per block.
_LOCAL_STYLES = {"local_colwise": "colwise", "local_rowwise": "rowwise"}
_MARKERS = ("local", "gather")

# Entries orion adds to a config's own plan. DeepSeek's covers its MLPs only; its multi-head latent attention
# splits by heads too: the up-projections of the query and of the compressed keys/values (which every rank
# computes whole, as it does the rotary key shared by all heads) colwise, the output projection rowwise.
_MLA_HEADS = {"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.q_b_proj": "colwise",
              "layers.*.self_attn.kv_b_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise"}
# DeepSeek-V2's own plan splits q_a_proj colwise, but the query's low-rank down-projection feeds a norm over all
# its features (q_a_layernorm), so it stays whole; its plan leaves the experts whole, orion splits them as V3's.
_DEEPSEEK_V2 = {**_MLA_HEADS, "layers.*.self_attn.q_a_proj": "replicate",
                **{f"layers.*.mlp.{experts}.{name}": style for experts in ("experts.*", "shared_experts")
                   for name, style in (("gate_proj", "colwise"), ("up_proj", "colwise"), ("down_proj", "rowwise"))}}
ORION_ADDITIONS: dict[str, dict[str, str]] = {"deepseek_v3": _MLA_HEADS, "deepseek_v2": _DEEPSEEK_V2}


@dataclass(frozen=True)
class ModelPlan:
    tp: dict[str, str]  # pattern relative to the base model -> style; empty: no plan
    pp: list[str]  # the base model's modules in execution order; empty: no plan
    source: str  # "transformers config", "orion", or "none"

    def style_of(self, qualname: str) -> str | None:
        """The style of a module of the base model (e.g. 'layers.3.mlp.up_proj'), None when the plan leaves it out."""
        for pattern, style in self.tp.items():
            if re.fullmatch(re.escape(pattern).replace(r"\*", r"\d+"), qualname):
                return style
        return None


def model_plan(config: Any) -> ModelPlan:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    tp = {pattern: _LOCAL_STYLES.get(style, style) for pattern, style in
          (getattr(text, "base_model_tp_plan", None) or {}).items() if style not in _MARKERS}
    pp = list((getattr(text, "base_model_pp_plan", None) or {}).keys())
    if tp or pp:
        return ModelPlan({**tp, **ORION_ADDITIONS.get(text.model_type, {})}, pp, "transformers config")
    if text.model_type in ORION_PLANS:
        tp, pp = ORION_PLANS[text.model_type]
        return ModelPlan(dict(tp), list(pp), "orion")
    return ModelPlan({}, [], "none")


@dataclass(frozen=True)
class Shape:
    """The attention shape a tensor-parallel split must respect."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    hidden_size: int

    @classmethod
    def of(cls, config: Any) -> "Shape":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = _first(text, "num_attention_heads", "n_head")
        hidden = _first(text, "hidden_size", "n_embd")
        return cls(
            num_layers=_first(text, "num_hidden_layers", "n_layer"), num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or hidden // heads, vocab_size=text.vocab_size,
            max_positions=_first(text, "max_position_embeddings", "n_positions"), hidden_size=hidden,
        )

    def kv_heads_per_rank(self, tp: int) -> int:
        """KV heads each rank holds: a share, or one head shared by a group of ranks when tp exceeds them."""
        return max(1, self.num_kv_heads // tp)

    def kv_head_start(self, tp: int, rank: int) -> int:
        if self.num_kv_heads >= tp:
            return rank * (self.num_kv_heads // tp)
        return rank // (tp // self.num_kv_heads)


def _first(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise UnsupportedModelError(f"MODEL_DIR: config.json has none of {', '.join(names)}")


def check_parallel(config: Any, plan: ModelPlan, tp: int, pp: int) -> None:
    """Refuse, naming the flag, what the plans cannot split."""
    arch = (getattr(config, "architectures", None) or [config.model_type])[0]
    shape = Shape.of(config)
    if tp > 1:
        if not plan.tp:
            raise UsageError(f"--tp {tp}: {arch} has no tensor-parallel plan (its transformers config carries none "
                             "and orion supplies none); serve it with --tp 1")
        unsupported = sorted({style for style in plan.tp.values() if style not in STYLES})
        if unsupported:
            raise UsageError(f"--tp {tp}: {arch}'s tensor-parallel plan uses {', '.join(unsupported)}, which orion "
                             f"does not run (it runs {', '.join(STYLES)}); serve it with --tp 1")
        if shape.num_heads % tp:
            raise UsageError(f"--tp {tp}: does not divide the model's {shape.num_heads} attention heads; "
                             f"choose one of {', '.join(str(d) for d in divisors(shape.num_heads))}")
        kv = shape.num_kv_heads
        if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
            raise UsageError(f"--tp {tp}: the model's {kv} key/value heads can be neither split nor replicated "
                             f"evenly over {tp} ranks")
    if pp > 1:
        if not plan.pp:
            raise UsageError(f"--pp {pp}: {arch} has no pipeline-parallel plan (its transformers config carries "
                             "none and orion supplies none); serve it with --pp 1")


def check_split_features(qualname: str, style: str, out_features: int, in_features: int, tp: int,
                         shape: Shape) -> None:
    """A planned linear layer whose features do not split into whole shares (kv heads are handled by groups)."""
    kv_projection = (style == "colwise" and out_features == shape.num_kv_heads * shape.head_dim
                     and shape.num_kv_heads < tp)
    if style.startswith("colwise") and out_features % tp and not kv_projection:
        raise UsageError(f"--tp {tp}: does not divide the {out_features} output features of {qualname}")
    if style.startswith("rowwise") and in_features % tp:
        raise UsageError(f"--tp {tp}: does not divide the {in_features} input features of {qualname}")


def recompute_position(config: Any) -> int | None:
    """Where generate() throws the KV cache away and prefills the whole sequence again, if anywhere.

    Phi-3's longrope switches from its short to its long factors once a sequence
    passes original_max_position_embeddings; transformers' Phi3ForCausalLM then
    recomputes every cached position with the long factors (its
    prepare_inputs_for_generation). A request reaching that position is
    prefilled again, so its tokens are generate()'s.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scaling = getattr(text, "rope_scaling", None) or {}
    if (scaling.get("rope_type") or scaling.get("type")) != "longrope":
        return None
    return getattr(text, "original_max_position_embeddings", None)


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
