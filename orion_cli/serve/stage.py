"""One pipeline stage of any causal LM transformers runs, holding one tensor-parallel rank's share of it.

The model is transformers' own: built from its config on the meta device
(buffers such as rotary frequencies are computed for real), with
attn_implementation="orion" so every layer's attention goes through the slot
KV cache (attention.py). Then, following the model's plans (plans.py):

- the base model's modules outside this stage are replaced: before the layer
  list by placeholders handing over the hidden states received from the
  previous stage, after it by identities; layers outside the stage are dropped;
- linear layers the tensor-parallel plan names become ParallelLinear shares,
  the embedding and LM head vocabulary-parallel; the rest is replicated;
- every remaining weight is read from the checkpoint's memory map, only this
  rank's slice of it, so no rank ever holds the whole model; modules the
  CausalLM holds beside its base model and head (ModernBERT-decoder's dense
  layer and norm before its vocabulary projection) are read whole on the last
  stage and dropped on the others.

The forward is transformers' own too, so whatever a model does beyond
embed -> layers -> norm stays exact at every stage boundary: the embedding
scale of Gemma, Granite's multipliers and logit scaling, Gemma 2/3's
final-logit softcapping, per-layer sliding windows, layers without RoPE. A
stage that is not the first runs the base model with a placeholder embedding
and swaps the received hidden states in front of its first layer (a pre-hook),
so nothing computed before that point reaches its output; the last stage
runs the CausalLM forward, with each row's last position gathered before the
head (a hook on the base model's output) and logits_to_keep=1.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..base_model import find_base_model
from ..errors import ModelDirError
from ..onnx_weights import HEAD_WEIGHT
from .attention import ATTENTION, CURRENT, Context, SlotCache, Step
from .kernels import BlockEmbedding
from .plans import STYLES, Shape, check_split_features, model_plan
from .tp import (TPGroup, VocabParallelEmbedding, VocabParallelLMHead, WeightLoader,
                 parallel_linear, vocab_share)

# the load probe's prompt: shorter than any sliding window, so the plain causal mask is every layer's mask
PROBE_TOKENS = 4


class _Handover:
    """What a step hands to the modules replaced at this stage's edges: the received hidden states, the rows' last positions."""

    received: torch.Tensor | None = None
    last_index: torch.Tensor | None = None


class _StageInput(nn.Module):
    """A module before the layer list on a later stage: it returns the received hidden states (shape and dtype
    for whatever the base model computes before the first layer, all of which the layer's pre-hook discards)."""

    def __init__(self, handover: _Handover):
        super().__init__()
        self.handover = handover

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.handover.received


class PerSequenceRotary(nn.Module):
    """A rotary embedding whose frequencies depend on the sequence length (Phi-3's longrope), applied row by row.

    transformers picks the short or long factors from the longest position in
    the batch; each request must get what it would get alone, as in generate().
    """

    def __init__(self, rotary: nn.Module):
        super().__init__()
        self.rotary = rotary

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.shape[0] == 1:
            return self.rotary(x, position_ids)
        rows = [self.rotary(x, position_ids[r:r + 1]) for r in range(position_ids.shape[0])]
        return tuple(torch.cat(parts, dim=0) for parts in zip(*rows))


class StageModel(nn.Module):
    """Layers `layer_range` of the model, as rank `tp.rank` of its tensor-parallel group holds them."""

    def __init__(self, hf_config: Any, layer_range: range, first: bool, last: bool, tp: TPGroup,
                 load: WeightLoader, max_slots: int, max_len: int):
        super().__init__()
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        self.first, self.last, self.tp = first, last, tp
        self.device = load.device
        self.plan = model_plan(hf_config)
        self.shape = Shape.of(hf_config)
        text = hf_config.get_text_config()
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary frequencies) real
            model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=ATTENTION, dtype=load.dtype)
        self.model = model.eval()
        self.prefix, self.base = find_base_model(model)
        self.handover = _Handover()
        names = {module: name for name, module in model.named_modules()}
        embedding_name = names[model.get_input_embeddings()] + ".weight"
        head_attr = names[model.get_output_embeddings()]
        layers_name, before, after = self._stage_modules()
        layers = getattr(self.base, layers_name)

        if not first:
            for name in before:
                setattr(self.base, name, _StageInput(self.handover))
        if not last:
            for name in after:
                setattr(self.base, name, nn.Identity())
            setattr(model, head_attr, nn.Identity())
        v0, v1, per_rank = vocab_share(self.shape.vocab_size, tp)
        embedding = None
        if first:
            old = model.get_input_embeddings()
            scale = getattr(old, "embed_scale", None)
            blocks = load.blocks(embedding_name)
            rows = BlockEmbedding(blocks.rows(v0, v1), load.dtype) if blocks else load.rows(embedding_name, v0, v1)
            embedding = VocabParallelEmbedding(rows, v0, tp, float(scale) if scale is not None else None)
            model.set_input_embeddings(embedding)
        if last:
            tied = bool(getattr(text, "tie_word_embeddings", False))
            # a quantized model stores its head quantized, tied or not (orion quantize names it by its role)
            head_blocks = load.blocks(f"{head_attr}.weight") or load.blocks(HEAD_WEIGHT)
            if head_blocks:
                weight = load.matmul(head_blocks.rows(v0, v1))
            elif tied and embedding is not None and embedding.weight is not None:
                weight = embedding.weight
            else:
                weight = load.matmul(load.rows(embedding_name if tied else f"{head_attr}.weight", v0, v1))
            bias = load.rows(f"{head_attr}.bias", v0, v1) if load.has(f"{head_attr}.bias") else None
            setattr(model, head_attr, VocabParallelLMHead(weight, bias, self.shape.vocab_size, per_rank, tp))
        self._load_beside_the_base(load, last)

        for name, child in list(self.base.named_children()):
            if getattr(child, "rope_type", None) == "longrope":
                setattr(self.base, name, PerSequenceRotary(child))
        self._shard_and_load(layers_name, layer_range, load)
        if tp.size > 1:
            self._heads_per_rank(layers)
        setattr(self.base, layers_name, nn.ModuleList(layers[i] for i in layer_range))
        self._check_materialized()
        if not first:
            getattr(self.base, layers_name)[0].register_forward_pre_hook(self._take_received, with_kwargs=True)
        if last:
            self.base.register_forward_hook(self._keep_last_positions)
        self.cache = SlotCache(max_slots, max_len, load.dtype, load.device)
        self._check_every_layer_attends(layer_range, load.dtype)

    @torch.inference_mode()  # as the engine's steps run, so the cache rows it writes are the engine's
    def _check_every_layer_attends(self, layer_range: range, dtype: torch.dtype) -> None:
        """A short prompt through this stage at load, each call of the attention function recorded. A layer that
        makes none keeps a state of its own the slot cache does not hold (linear attention, a convolution: remote code
        the config's layer_types do not describe), and one that hands it a mask other than the plain causal one
        (Doge's dynamic mask; Persimmon's own causal mask is fine) would have that mask ignored: either would
        decode wrong tokens, so both are refused before any request. The probe writes slot 0's first positions,
        which every request's prefill overwrites."""
        width = PROBE_TOKENS
        step = Step.make(True, 0, [width], [0], self.device)
        hidden = None if self.first else torch.zeros(1, width, self.shape.hidden_size, dtype=dtype, device=self.device)
        calls: list[tuple[int, bool]] = []
        self.step(step, torch.arange(width, device=self.device).view(1, width), hidden, calls=calls)
        attending = {layer for layer, _ in calls}
        silent = [layer for layer in layer_range if layer not in attending]
        name = type(self.model).__name__
        if silent:
            raise ModelDirError(f"MODEL_DIR: {name}'s layer {silent[0]} does not call the attention function, so "
                                "its state is not a key/value cache the torch engine holds (linear attention, "
                                "convolution); serve it in one process with --engine onnxruntime")
        masked = sorted({layer for layer, causal in calls if not causal})
        if masked:
            raise ModelDirError(f"MODEL_DIR: {name}'s layer {masked[0]} hands the attention function a mask of its "
                                "own that is not the plain causal one, which the torch engine (masking by position "
                                "only) would ignore")

    def _heads_per_rank(self, layers: nn.ModuleList) -> None:
        """Attention modules that view their projections with a head count of their own (OPT's `num_heads`,
        where most of transformers' view with -1) get this rank's share of it, as the projections were split."""
        for module in layers.modules():
            if getattr(module, "num_heads", None) == self.shape.num_heads and hasattr(module, "layer_idx"):
                module.num_heads = self.shape.num_heads // self.tp.size

    def _stage_modules(self) -> tuple[str, list[str], list[str]]:
        """The layer list's name, and the base model's modules before and after it, in execution order."""
        names = self.plan.pp or [name for name, child in self.base.named_children()
                                 if next(child.parameters(), None) is not None]
        lists = [n for n in names if isinstance(getattr(self.base, n, None), nn.ModuleList)]
        if len(lists) != 1:
            raise ModelDirError(f"MODEL_DIR: {type(self.base).__name__} has {len(lists)} layer lists; orion serves "
                                "decoders with one")
        index = names.index(lists[0])
        return lists[0], names[:index], names[index + 1:]

    def _shard_and_load(self, layers_name: str, layer_range: range, load: WeightLoader) -> None:
        """Linears of this stage become ParallelLinears: this rank's share where the plan splits them, whole
        elsewhere, each on its kernel; every other weight is read whole."""
        kept_layers = {f"{layers_name}.{i}" for i in layer_range}

        def on_this_stage(qualname: str) -> bool:
            if not qualname.startswith(layers_name + "."):
                return True
            return ".".join(qualname.split(".")[:2]) in kept_layers

        for qualname, module in list(self.base.named_modules()):
            if not qualname or not on_this_stage(qualname):
                continue
            if not _is_linear(module):
                continue
            style = self.plan.style_of(qualname) if self.tp.size > 1 else None
            if style in STYLES and style != "replicate":
                in_features, out_features = _features(module)
                check_split_features(qualname, style, out_features, in_features, self.tp.size, self.shape)
            else:
                style = "replicate"  # whole on every rank, multiplied by the rank's kernel (kernels.py)
            parent, _, child = qualname.rpartition(".")
            replacement = parallel_linear(module, f"{self.prefix}.{qualname}", style, self.tp, load, self.shape)
            setattr(self.base.get_submodule(parent) if parent else self.base, child, replacement)
        self._read_whole(self.base, self.prefix, load, on_this_stage)

    def _read_whole(self, root: nn.Module, prefix: str, load: WeightLoader,
                    wanted: Callable[[str], bool] = lambda qualname: True) -> None:
        """Every parameter still on the meta device under `root` (checkpoint names under `prefix`), read whole."""
        for qualname, module in root.named_modules():
            if not wanted(qualname):
                continue
            for name, param in list(module._parameters.items()):
                if param is None or not param.is_meta:
                    continue
                checkpoint_name = ".".join(filter(None, (prefix, qualname, name)))
                if not load.has(checkpoint_name):
                    raise ModelDirError(f"MODEL_DIR: the checkpoint has no tensor {checkpoint_name}, which "
                                        f"{type(self.model).__name__} needs")
                module._parameters[name] = nn.Parameter(load.full(checkpoint_name), requires_grad=False)

    def _load_beside_the_base(self, load: WeightLoader, last: bool) -> None:
        """The CausalLM's modules beside its base model and head (ModernBERT-decoder's dense layer and norm before
        its decoder): read whole on the last stage, which runs them; dropped on the others."""
        if not self.prefix:  # the CausalLM is its own base model: nothing beside it
            return
        holder = self.prefix.split(".")[0]
        for name, child in list(self.model.named_children()):
            if name == holder:
                continue
            if last:
                self._read_whole(child, name, load)
            else:
                setattr(self.model, name, nn.Identity())

    def _check_materialized(self) -> None:
        left = [name for name, param in self.named_parameters() if param.is_meta]
        if left:
            raise ModelDirError(f"MODEL_DIR: no weight was loaded for {left[0]}")

    def _take_received(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (self.handover.received, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.handover.received}

    def _keep_last_positions(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self.handover.last_index is None:  # scoring prompts: every position goes to the head
            return output
        hidden = output[0]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        output["last_hidden_state"] = hidden[rows, self.handover.last_index].unsqueeze(1)
        return output

    @property
    def weight_bytes(self) -> int:
        """Parameters, and the quantized weights' buffers (rotary tables among them: a few KiB)."""
        tensors = [*self.parameters(), *self.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def step(self, step: Step, tokens: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
             every_position: bool = False, calls: list | None = None) -> torch.Tensor:
        """Run one step: logits [rows, vocab] on the last stage ([rows, width, vocab] with `every_position`),
        else the hidden states to send on; `calls` records the attention function's calls."""
        self.cache.reserve(step.key_length if not step.prefill else step.width)
        context = CURRENT.set(Context(self.cache, step, calls))
        try:
            if not self.first:
                self.handover.received = hidden
                tokens = torch.zeros(step.rows, step.width, dtype=torch.long, device=self.device)
            if self.last:
                lengths = torch.tensor(step.lengths, device=self.device)
                if every_position:
                    self.handover.last_index = None
                    out = self.model(input_ids=tokens, position_ids=step.positions, use_cache=False, logits_to_keep=0)
                    return out.logits.float()
                self.handover.last_index = lengths - 1 if step.prefill else torch.zeros_like(lengths)
                out = self.model(input_ids=tokens, position_ids=step.positions, use_cache=False, logits_to_keep=1)
                return out.logits[:, -1].float()
            return self.base(input_ids=tokens, position_ids=step.positions, use_cache=False)[0]
        finally:
            CURRENT.reset(context)
            self.handover.received = None


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of an nn.Linear ([out, in] weight) or a Conv1D ([in, out] weight)."""
    rows, cols = module.weight.shape
    return (rows, cols) if type(module).__name__ == "Conv1D" else (cols, rows)
