"""Rotary embeddings written with complex numbers, computed with real ones for the export.

DeepSeek-V2's rotary embedding makes its table with torch.polar and turns
query and key pairs by multiplying them as complex numbers (view_as_complex);
torch's ONNX exporter takes no complex operator ("Exporting the operator
'aten::polar' ... is not supported"). For the export, the table is its cos
and sin side by side, and each pair (a, b) of adjacent dims is turned as the
complex product does: (a cos - b sin, a sin + b cos). Same numbers, real
operators; the test table compares the export's logits with transformers'.
"""

from __future__ import annotations

from typing import Callable

import torch


def _cos_sin_table(self, x, position_ids):
    """DeepseekV2RotaryEmbedding.forward, its complex table as [batch, positions, dims / 2, (cos, sin)]."""
    inv_freq = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
    freqs = (inv_freq.to(x.device) @ position_ids[:, None, :].float()).transpose(1, 2)
    return torch.stack([freqs.cos(), freqs.sin()], dim=-1) * self.attention_scaling


def _turn_pairs(xq, xk, table):
    """apply_rotary_emb over the real table: each adjacent pair of dims multiplied by (cos + i sin)."""
    cos, sin = table.unsqueeze(1).unbind(-1)  # [batch, 1, positions, dims / 2], broadcast over heads

    def turned(x):
        a, b = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(3).type_as(x)

    return turned(xq), turned(xk)


# model_type -> (rotary embedding class, name of the function applying it in the modeling module)
COMPLEX_ROTARY = {"deepseek_v2": ("DeepseekV2RotaryEmbedding", "apply_rotary_emb")}


def rotary_swaps(model_type: str) -> list[tuple[str | None, str, Callable]]:
    """(owner's name in the modeling module, None for the module itself; attribute; export-time value) for a model
    whose rotary embedding is complex; none for the others."""
    if model_type not in COMPLEX_ROTARY:
        return []
    class_name, apply_name = COMPLEX_ROTARY[model_type]
    return [(class_name, "forward", _cos_sin_table), (None, apply_name, _turn_pairs)]
