"""transformers' model run over whole batches of token windows, one decoder layer in memory at a time.

The model is built from its config on the meta device (buffers real). A
forward of its base model over a batch of windows runs as transformers writes
it, with its own masks, rotary embeddings and attention, but each decoder
layer's weights are read from the checkpoint just before the layer runs and
dropped right after (a pre-hook and a hook on the layer). The token embedding
gets only the rows the batch uses. Whoever runs it can look at every layer
while its weights are loaded (calibration collects its linear layers'
inputs then). What stays in memory is the small modules outside the layers
(final norm, position table) and the batch's hidden states.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from ..base_model import find_base_model
from ..onnx_export.graph import meta_model
from ..onnx_export.tensors import ModelTensors, row_blocks
from .sensitivity import LayerCall

LayerVisit = Callable[[int, nn.Module, LayerCall], None]


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or GPT-2's Conv1D."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


class LayerwiseModel:
    def __init__(self, model_dir: str, tensors: ModelTensors, trust_remote_code: bool = False):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        model = meta_model(config, trust_remote_code)  # the model the export traces, each expert its own linear
        self.model = model.eval()
        self.config = config
        self.text_config = config.get_text_config()
        self.tensors = tensors
        self.final_module: nn.Module | None = None  # found by the first forward (final_hidden)
        tensors.base_prefix = model.base_model_prefix
        self.embedding = model.get_input_embeddings()
        self.prefix, self.base = find_base_model(model)
        layers = getattr(self.text_config, "num_hidden_layers", None) or getattr(self.text_config, "n_layer")
        self.layers_name = next(name for name, child in self.base.named_children()
                                if isinstance(child, nn.ModuleList) and len(child) == layers)
        self.layers = getattr(self.base, self.layers_name)
        names = {module: name for name, module in model.named_modules()}
        self.embedding_name = names[self.embedding] + ".weight"
        head = model.get_output_embeddings()
        self.head_name = names[head] + ".weight" if head is not None else self.embedding_name
        if self.head_name not in tensors:  # tied: the checkpoint stores the embedding only
            self.head_name = self.embedding_name
        for name, module in self.base.named_children():  # small modules outside the layers stay materialized
            if name != self.layers_name and module is not self.embedding:
                self._materialize(module, f"{self.prefix}.{name}")

    def layer_prefix(self, index: int) -> str:
        return f"{self.prefix}.{self.layers_name}.{index}."

    def layer_of(self, parameter: str) -> int | None:
        """The decoder layer a parameter belongs to (None for the embedding, head, final norm)."""
        stem = f"{self.prefix}.{self.layers_name}."
        if not parameter.startswith(stem):
            return None
        return int(parameter[len(stem):].split(".", 1)[0])

    def _materialize(self, module: nn.Module, prefix: str) -> None:
        for qualname, child in module.named_modules():
            for name, param in list(child._parameters.items()):
                if param is not None and param.is_meta:
                    key = ".".join(filter(None, (prefix, qualname, name)))
                    child._parameters[name] = nn.Parameter(self.tensors.full(key), requires_grad=False)

    @staticmethod
    def _release(module: nn.Module) -> None:
        for child in module.modules():
            for name, param in list(child._parameters.items()):
                if param is not None and not param.is_meta:
                    child._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    def embedding_rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows of the embedding for the unique ids, ids renumbered into them)."""
        unique, inverse = torch.unique(ids, return_inverse=True)
        vocab, hidden = self.tensors.shape(self.embedding_name)
        rows = torch.empty((len(unique), hidden), dtype=torch.float32)
        for start, stop in row_blocks(vocab, hidden):
            wanted = (unique >= start) & (unique < stop)
            if wanted.any():
                rows[wanted] = self.tensors.rows(self.embedding_name, start, stop)[unique[wanted] - start]
        return rows, inverse.reshape(ids.shape)

    @torch.inference_mode()
    def final_hidden(self, windows: np.ndarray, visit: LayerVisit | None = None) -> torch.Tensor:
        """The hidden states after the final norm for [n, T] token windows; `visit(index, layer, call)` is
        called after each layer ran, while its weights are loaded (`call` can run it again on other rows)."""
        hooks = []
        last_output: dict[str, torch.Tensor] = {}
        embedding = self.embedding
        padding_idx = getattr(embedding, "padding_idx", None)

        def embed_before(module, args):
            rows, renumbered = self.embedding_rows(args[0])
            module._parameters["weight"] = nn.Parameter(rows, requires_grad=False)
            module.padding_idx = None  # only gradients read it, and it may lie beyond the rows taken
            return (renumbered, *args[1:])

        def embed_after(module, args, output):
            module._parameters["weight"] = nn.Parameter(module.weight.to("meta"), requires_grad=False)
            module.padding_idx = padding_idx

        def before(module, args, kwargs):
            self._materialize(module, self.layer_prefix(module._orion_index).rstrip("."))

        def after(module, args, kwargs, output):
            call = LayerCall(args, kwargs, output)
            if visit is not None:
                visit(module._orion_index, module, call)
            self._release(module)
            last_output["hidden"] = call.hidden_out
            last_output["layers"] = last_output.get("layers", 0) + 1

        def final_before(module, args):
            if args and last_output.get("layers") == len(self.layers) and args[0] is last_output["hidden"]:
                self.final_module = module

        hooks.append(embedding.register_forward_pre_hook(embed_before))
        hooks.append(embedding.register_forward_hook(embed_after))
        for index, layer in enumerate(self.layers):
            layer._orion_index = index
            hooks.append(layer.register_forward_pre_hook(before, with_kwargs=True))
            hooks.append(layer.register_forward_hook(after, with_kwargs=True))
        for name, child in self.base.named_children():  # which module turns the last layer's output into the result
            if name != self.layers_name and child is not embedding:
                hooks.append(child.register_forward_pre_hook(final_before))
        try:
            out = self.base(input_ids=torch.from_numpy(np.ascontiguousarray(windows)), use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        return out[0]

    def final(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the base model does after its last layer (the final norm), on other hidden states."""
        if self.final_module is None:
            return hidden  # the base model returns the last layer's output as it is
        return self.final_module(hidden)

    def logits(self, hidden: torch.Tensor, head_rows: Callable[[int, int], torch.Tensor] | None = None) -> torch.Tensor:
        """The model's logits for final hidden states [..., hidden], the head read in row blocks
        (from the checkpoint, or `head_rows(start, stop)`: another version of the head, [rows, hidden]).

        What the CausalLM forward does after the head (Granite's scaling, Gemma 2's
        softcapping) is applied as its config says.
        """
        vocab, width = self.tensors.shape(self.head_name)
        read = head_rows or (lambda start, stop: self.tensors.rows(self.head_name, start, stop))
        parts = [nn.functional.linear(hidden, read(start, stop)) for start, stop in row_blocks(vocab, width)]
        logits = torch.cat(parts, dim=-1)
        if getattr(self.text_config, "logits_scaling", None):
            logits = logits / self.text_config.logits_scaling
        softcap = getattr(self.text_config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits
