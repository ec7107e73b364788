"""Mixture-of-experts blocks made traceable for the ONNX export, where optimum has no patch of its own.

transformers' sparse MoE blocks loop only over the experts some token was
routed to (`expert_hit`): the tracer fixes that set to the dummy batch's, and
the graph fails on any other batch (measured on Mixtral: onnxruntime's Split
refuses the routing of a real prompt). optimum patches Qwen3-MoE's block to
loop over every expert instead, an expert no token chose computing on zero
rows. Its patched forward is written for any block with Mixtral's contract
(`gate`, `experts`, `top_k`, `num_experts`, top-k weights renormalized when
`norm_topk_prob`), so a block listed here gets it too. A block is listed only
once its export has been compared with transformers' logits (the test table).
"""

from __future__ import annotations

import importlib

# model_type -> (module, block class, whether its top-k routing weights are renormalized)
TRACEABLE_BLOCKS = {
    "mixtral": ("transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock", True),
}


def experts_patcher(model_type: str) -> type | None:
    """An optimum ModelPatcher that swaps in the every-expert forward for `model_type`'s block; None when the
    block is not listed."""
    entry = TRACEABLE_BLOCKS.get(model_type)
    if entry is None:
        return None
    from optimum.exporters.onnx.model_patcher import ModelPatcher, qwen3_moe_forward_patched

    module, class_name, renormalized = entry
    block = getattr(importlib.import_module(module), class_name)

    def every_expert_forward(self, hidden_states):
        self.norm_topk_prob = renormalized  # the one switch optimum's forward reads that Mixtral's block lacks
        return qwen3_moe_forward_patched(self, hidden_states)

    class ExpertsPatcher(ModelPatcher):
        def __enter__(self):
            super().__enter__()
            self.original_block_forward = block.forward
            block.forward = every_expert_forward

        def __exit__(self, exc_type, exc_value, traceback):
            super().__exit__(exc_type, exc_value, traceback)
            block.forward = self.original_block_forward

    return ExpertsPatcher
