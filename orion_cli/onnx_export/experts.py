"""Mixture-of-experts blocks made traceable for the ONNX export, where optimum has no patch of its own.

transformers' sparse MoE blocks mostly loop only over the experts some token
was routed to (`expert_hit`): the tracer fixes that set to the dummy batch's,
and the graph fails on any other batch (measured on Mixtral: onnxruntime's
Split refuses the routing of a real prompt). optimum patches Qwen3-MoE's block
to loop over every expert instead, an expert no token chose computing on zero
rows. Its patched forward is written for any block with Mixtral's contract
(`gate`, `experts`, `top_k`, `num_experts`, top-k weights renormalized when
`norm_topk_prob`), so a block listed here gets it too; Qwen2-MoE's adds its
gated shared expert after it. PhiMoE routes with its own sparsemixer and then
skips an expert no token chose (`if top_x.shape[0] == 0: continue`, the same
trap), so its routing is kept and the loop replaced, as are DeepSeek-V2's and V3's
(a grouped top-k router, the same trap in its loop, then shared experts). OLMoE's block already runs
every expert and is listed with no patch. A block is listed only once its
export has been compared with transformers' logits (the test table;
GraniteMoeShared, whose block is GraniteMoE's, by tools/architecture_sweep.py).

GraniteMoE keeps each expert stack in one 3-D parameter [experts, out, in]
and splits the rows routed to each by a Python list of counts. Its stacks are
split into one nn.Linear per expert (split_stacked_experts), in the model the
export traces and in the one quantize calibrates: each expert is then a 2-D
weight the quantizer takes like any linear layer, with its own calibration
inputs, read from the checkpoint as row e of the stack
(onnx_export/tensors.py, `<stack>.experts.<e>.weight`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn



def _renormalized(self, hidden_states):
    """Mixtral's block: optimum's every-expert forward with the one switch it reads that Mixtral's block lacks."""
    from optimum.exporters.onnx.model_patcher import qwen3_moe_forward_patched

    self.norm_topk_prob = True  # Mixtral always renormalizes its top-k weights
    return qwen3_moe_forward_patched(self, hidden_states)


def _with_shared_expert(self, hidden_states):
    """Qwen2-MoE's block: the routed experts as Qwen3-MoE's, plus a shared expert every token takes, scaled by
    its own sigmoid gate (transformers' Qwen2MoeSparseMoeBlock.forward, without the `expert_hit` loop)."""
    from optimum.exporters.onnx.model_patcher import qwen3_moe_forward_patched

    routed, router_logits = qwen3_moe_forward_patched(self, hidden_states)
    shared = torch.sigmoid(self.shared_expert_gate(hidden_states)) * self.shared_expert(hidden_states)
    return routed + shared, router_logits


def _sparsemixer_routed(self, hidden_states):
    """PhiMoE's block (transformers' PhimoeSparseMoeBlock.forward at inference), every expert run."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    batch_size, sequence_length, hidden_dim = hidden_states.shape
    flat = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(flat)
    weights, selected = sparsemixer(router_logits, jitter_eps=self.router_jitter_noise, training=False)
    return _every_expert(self, flat, weights, selected).reshape(batch_size, sequence_length, hidden_dim), router_logits


def _routed_and_shared(self, hidden_states):
    """DeepSeek-V2's and V3's block (DeepseekV2MoE/DeepseekV3MoE.forward): the router's top-k, every routed expert
    run, plus the shared experts every token takes. Their `moe` skips an expert no token chose (V3's
    `if token_indices.numel() > 0`, V2's `if num_tokens == 0: continue`)."""
    shape = hidden_states.shape
    selected, weights = self.gate(hidden_states)
    flat = hidden_states.view(-1, shape[-1])
    routed = _every_expert(self, flat, weights.type_as(flat), selected)
    return routed.view(*shape) + self.shared_experts(hidden_states)


def _every_expert(self, flat, weights, selected, experts=None):
    """Each expert's output on the rows routed to it, weighted and summed; an expert no row chose computes on
    zero rows instead of being skipped, so the traced graph holds every expert."""
    experts = self.experts if experts is None else experts
    out = torch.zeros_like(flat)
    expert_mask = torch.nn.functional.one_hot(selected, num_classes=len(experts)).permute(2, 1, 0)
    for expert_index, expert in enumerate(experts):
        choice, rows = torch.where(expert_mask[expert_index])
        out.index_add_(0, rows, expert(flat[rows]) * weights[rows, choice, None])
    return out


def _stacked_top_k(self, layer_input):
    """GraniteMoE's block (GraniteMoeMoE.forward): top-k of the router's logits, softmax over those k, each
    expert a gated MLP of its split input and output stacks, every expert run."""
    batch_size, sequence_length, hidden_dim = layer_input.shape
    flat = layer_input.reshape(-1, hidden_dim)
    router_logits = self.router.layer(flat).float()
    top_logits, selected = router_logits.topk(self.router.top_k, dim=1)
    weights = torch.softmax(top_logits, dim=1).type_as(flat)

    def expert(index):
        def forward(rows):
            gate, up = self.input_linear.experts[index](rows).chunk(2, dim=-1)
            return self.output_linear.experts[index](self.activation(gate) * up)
        return forward

    experts = [expert(index) for index in range(len(self.input_linear.experts))]
    out = _every_expert(self, flat, weights, selected, experts)
    return out.view(batch_size, sequence_length, hidden_dim), router_logits


class ExpertLinears(nn.Module):
    """An expert stack [experts, out, in] as one bias-free nn.Linear per expert (`experts.<e>`), with the stack's
    forward: rows grouped by expert, `expert_size` rows each."""

    def __init__(self, stack: nn.Module):
        super().__init__()
        experts, out_features, in_features = stack.weight.shape
        self.experts = nn.ModuleList()
        for index in range(experts):
            linear = nn.Linear(in_features, out_features, bias=False, device="meta")
            linear.weight = nn.Parameter(stack.weight[index], requires_grad=False)
            self.experts.append(linear)

    def forward(self, inputs, expert_size):
        parts = inputs.split(expert_size, dim=0)
        return torch.cat([expert(part) for expert, part in zip(self.experts, parts)], dim=0)


# classes holding experts as one 3-D parameter, split by split_stacked_experts
STACKED_EXPERTS = ("GraniteMoeParallelExperts", "GraniteMoeSharedParallelExperts")


def split_stacked_experts(model: nn.Module) -> None:
    """Replace every expert stack of `model` (built on the meta device) by ExpertLinears."""
    stacks = [(name, module) for name, module in model.named_modules() if type(module).__name__ in STACKED_EXPERTS]
    for name, stack in stacks:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, ExpertLinears(stack))


# model_type -> (block class, forward swapped in for the export; None where the block's own forward already
# runs every expert)
TRACEABLE_BLOCKS: dict[str, tuple[str, Callable | None]] = {
    "mixtral": ("MixtralSparseMoeBlock", _renormalized),
    "qwen2_moe": ("Qwen2MoeSparseMoeBlock", _with_shared_expert),
    "olmoe": ("OlmoeSparseMoeBlock", None),
    "phimoe": ("PhimoeSparseMoeBlock", _sparsemixer_routed),
    "granitemoe": ("GraniteMoeMoE", _stacked_top_k),
    "granitemoeshared": ("GraniteMoeSharedMoE", _stacked_top_k),
    "deepseek_v2": ("DeepseekV2MoE", _routed_and_shared),
    "deepseek_v3": ("DeepseekV3MoE", _routed_and_shared),
}


def traceable(model_type: str) -> bool:
    return model_type in TRACEABLE_BLOCKS


def expert_swaps(model_type: str) -> list[tuple[str, str, Callable]]:
    """(block class's name in the modeling module, "forward", its every-expert forward) for `model_type`'s listed
    block; none when the block needs no patch or is not listed (traceable() tells the two apart)."""
    entry = TRACEABLE_BLOCKS.get(model_type)
    if entry is None or entry[1] is None:
        return []
    class_name, every_expert_forward = entry
    return [(class_name, "forward", every_expert_forward)]
