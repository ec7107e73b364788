"""The export's patch of a model's code: attributes swapped while torch traces it, restored after.

optimum runs each export inside its config's ModelPatcher; orion's patcher is
that class (or optimum's plain one) extended with swaps of module code: a
mixture-of-experts block's every-expert forward (experts.py) and a complex
rotary embedding's real form (rotary.py).
"""

from __future__ import annotations

import importlib
from typing import Callable

from .experts import expert_swaps
from .rotary import rotary_swaps

_MODULE = "transformers.models.{0}.modeling_{0}"


def export_patcher(model_type: str, base: type | None = None) -> type | None:
    """A ModelPatcher subclass of `base` (an export config's own patcher, or optimum's plain one) making the swaps
    `model_type` needs; None when it needs none. The swaps name their owners in transformers' modeling module of
    `model_type` (None: the module itself)."""
    named = expert_swaps(model_type) + rotary_swaps(model_type)
    if not named:
        return None
    module = importlib.import_module(_MODULE.format(model_type))
    return swapping_patcher([(module if owner is None else getattr(module, owner), attribute, value)
                             for owner, attribute, value in named], base)


def swapping_patcher(swaps: list[tuple[object, str, Callable]], base: type | None = None) -> type | None:
    """A ModelPatcher that sets each (owner, attribute, value) on entering and restores the originals on leaving."""
    if not swaps:
        return None
    from optimum.exporters.onnx.model_patcher import ModelPatcher

    class SwappingPatcher(base or ModelPatcher):
        def __enter__(self):
            super().__enter__()
            self.originals = [(owner, name, getattr(owner, name)) for owner, name, _ in swaps]
            for owner, name, value in swaps:
                setattr(owner, name, value)

        def __exit__(self, exc_type, exc_value, traceback):
            super().__exit__(exc_type, exc_value, traceback)
            for owner, name, value in self.originals:
                setattr(owner, name, value)

    return SwappingPatcher
