"""The decoder graph, exported with past key values and without a single weight.

optimum knows how to export each architecture for ORTModelForCausalLM: the
input and output names, the dynamic axes, and the patches some models need
(a traceable MoE block, for one). orion takes that knowledge from optimum's
export config (for a model type optimum does not list, the description its
decoder entries share: generic_decoder_config) and runs torch.onnx's exporter
itself, on transformers' model built from its config with every parameter a
zero page (stand_in_parameters): the trace records the graph,
`export_params=False` makes each parameter a graph input named as in the
checkpoint, and no weight is ever materialized.
Each parameter gets its own first value, so the exporter does not merge equal
ones, and constant folding is off, so none is renamed; onnxruntime folds the
graph when it loads it. Llama-3-8B's graph exports in about 20 s and 0.5 GB.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from ..errors import OrionError, UnsupportedModelError
from ..modeldir import ModelDir

log = logging.getLogger(__name__)

TASK = "text-generation-with-past"
# What optimum's main_export hands the export config for TASK: the task without its suffix, and use_past.
# The config adds position_ids only for "text-generation", and ORTModelForCausalLM feeds them when present.
CONFIG_TASK = "text-generation"
# config attributes that count a mixture-of-experts layer's experts, across transformers' MoE families
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx_data"


class ExportError(OrionError):
    """The model cannot be exported to ONNX."""


def check_supported(model: ModelDir, flag: str = "--model") -> None:
    """Refuse, before any work, an input that is not a Hugging Face checkpoint. Architectures are not
    listed: what neither optimum nor the standard-decoder description exports fails at the export, saying why."""
    if model.format == "onnx":
        raise UnsupportedModelError(
            f"{flag} {model.root}: already an ONNX model; orion quantize takes a Hugging Face checkpoint "
            "(*.safetensors or pytorch_model.bin)"
        )


def export_graph(model_dir: Path, output_file: Path, trust_remote_code: bool = False, flag: str = "--model") -> Path:
    """Write the weightless graph of `model_dir` to `output_file`; errors name `model_dir` after `flag`."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings are about Python control flow, expected here
            _export(Path(model_dir), Path(output_file), trust_remote_code, flag)
    except OrionError:
        raise
    except Exception as exc:  # torch and optimum raise anything; its first line is the reason
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"{flag} {model_dir}: ONNX export failed: {type(exc).__name__}: {first}") from None
    return output_file


def _export(model_dir: Path, output_file: Path, trust_remote_code: bool, flag: str) -> None:
    from itertools import chain

    import torch
    from transformers import AutoConfig

    import optimum.exporters.onnx.model_configs  # noqa: F401 - registers the export configs
    from optimum.exporters.tasks import TasksManager

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = meta_model(config, trust_remote_code)
    stand_in_parameters(model)
    model.eval()
    try:
        constructor = TasksManager.get_exporter_config_constructor(model=model, exporter="onnx", task=TASK,
                                                                   library_name="transformers")
    except (KeyError, ValueError) as exc:
        constructor, why_not = generic_decoder_config(model)
        if constructor is None:
            arch = (getattr(config, "architectures", None) or [config.model_type])[0]
            raise ExportError(f"{flag} {model_dir}: optimum cannot export {arch} with past key values "
                              f"({_first_sentence(exc)}), and {why_not}") from None
        log.info("optimum has no ONNX export entry for %s: exporting it as a standard decoder", config.model_type)
    constructor = _with_orion_patches(constructor, config)
    export_config = constructor(model.config, task=CONFIG_TASK, use_past=True, use_past_in_inputs=True,
                                int_dtype="int64", float_dtype="fp32")
    dummy = export_config.rename_ambiguous_inputs(export_config.generate_dummy_inputs(framework="pt"))
    with torch.no_grad(), export_config.patch_model_for_export(model, model_kwargs={"logits_to_keep": 0}), \
            _parameter_values_hidden(), _native_stdout_to_stderr():
        inputs = export_config.ordered_inputs(model)
        torch.onnx.export(
            model, (dummy,), str(output_file), input_names=list(inputs), output_names=list(export_config.outputs),
            dynamic_axes=dict(chain(inputs.items(), export_config.outputs.items())), do_constant_folding=False,
            opset_version=export_config.DEFAULT_ONNX_OPSET, export_params=False, dynamo=False,
        )


def meta_model(config, trust_remote_code: bool = False):
    """The CausalLM of `config`, parameters on the meta device (buffers such as rotary frequencies real), each expert
    stack split into one linear layer per expert (experts.py): the model the export traces and the one quantize
    calibrates (quantize/layerwise.py), built here once so both name every weight alike."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .experts import split_stacked_experts

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    split_stacked_experts(model)
    return model


@contextlib.contextmanager
def _native_stdout_to_stderr():
    """The TorchScript exporter's C++ side prints the whole IR graph (100+ KB) to the process's stdout when an
    export fails; stdout is the CLI's JSON document, so file descriptor 1 points at stderr for the export."""
    import os
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def _parameter_values_hidden():
    """The exporter's ONNX shape inference serializes every parameter it is given into protobuf, node by
    node (gigabytes and minutes for an 8B model); with none given it infers from the inputs' declared
    shapes, which is all a weightless graph has anyway."""
    from torch.onnx._internal.torchscript_exporter import utils

    original = utils._get_named_param_dict
    utils._get_named_param_dict = lambda graph, params: {}
    try:
        yield
    finally:
        utils._get_named_param_dict = original


def stand_in_parameters(model) -> None:
    """Every meta parameter becomes a tensor over an anonymous memory map: contiguous, so no operator
    copies it, and all zeros, which the kernel serves from its shared zero page without committing memory.
    Its first element is written (one page) with a number of its own, so the exporter never takes two
    parameters of equal shape for the same tensor."""
    import mmap

    import torch

    count = 0
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                count += 1
                nbytes = max(param.numel() * param.element_size(), 1)
                buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                value = torch.frombuffer(buffer, dtype=param.dtype, count=param.numel()).view(param.shape)
                value.view(-1)[0] = count * 1e-6
                module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    model.tie_weights()


def _with_orion_patches(constructor, config):
    """The export config (optimum's entry, or the standard-decoder description), its patcher extended with orion's
    swaps (patching.py): every-expert blocks and complex rotaries, including where optimum has an entry but no such
    patch (DeepSeek-V3's experts: its export would fix the routing to the traced batch's)."""
    import functools

    from .patching import export_patcher

    config_class = constructor.func if isinstance(constructor, functools.partial) else constructor
    patcher = export_patcher(config.model_type, getattr(config_class, "_MODEL_PATCHER", None))
    if patcher is None:
        return constructor
    patched = type(config_class.__name__, (config_class,), {"_MODEL_PATCHER": patcher})
    return functools.partial(patched, *constructor.args, **constructor.keywords) \
        if isinstance(constructor, functools.partial) else patched


def generic_decoder_config(model) -> tuple[type | None, str]:
    """(optimum's export description of a standard decoder, "") for a model type optimum does not list; (None,
    why not) when the model is not one.

    Most of optimum's decoder entries (OLMo, Qwen2/3, GLM, Helium, Arcee...) are this same description registered
    under another name: input ids, attention mask, position ids and a key/value cache of num_key_value_heads x
    head_dim (attention heads where the config has no key/value head count). A transformers class that takes
    attention functions (`_supports_attention_backend`) is built on that contract (the attention interface, the
    cache object, position ids), so StarCoder2 exports the same way. So is a class with transformers' older
    per-backend attention classes (`_supports_sdpa`) whose forward takes those inputs and a cache object (OLMoE,
    Qwen2-MoE, PhiMoE, GraniteMoE); a hybrid whose cache is not a key/value cache (Jamba, Bamba) fails in the
    trace, saying so. Experts need their block made traceable (experts.py, applied by _export with orion's other
    patches); a block not listed there is refused.
    Whether an export is right is checked, not assumed: every architecture of the test table is compared with
    transformers' logits.
    """
    from .experts import traceable

    config = model.config
    if not takes_standard_decoder_inputs(type(model)):
        return None, ("its transformers class neither takes attention functions nor has SDPA attention over "
                      "input ids, attention mask, position ids and past key values, so it is not a standard decoder")
    experts = [name for name in EXPERT_COUNTS if getattr(config, name, None)]
    if experts and not traceable(config.model_type):
        return None, (f"its config has experts ({experts[0]}={getattr(config, experts[0])}) of a block orion "
                      "has not made traceable, so their routing would be fixed to the traced shapes")
    from optimum.exporters.onnx.config import TextDecoderWithPositionIdsOnnxConfig
    from optimum.exporters.onnx.model_configs import DeepSeekV3OnnxConfig, LlamaOnnxConfig
    from optimum.utils import NormalizedTextConfig, NormalizedTextConfigWithGQA

    # A config without num_key_value_heads (Persimmon, BioGPT) caches as many key/value heads as query heads: the
    # description GPT-NeoX's and Phi's entries share, whose dummy cache is sized by the attention heads.
    grouped = getattr(config, "num_key_value_heads", None) is not None
    # Multi-head latent attention (DeepSeek-V2) caches keys of the no-rope and rope parts and values of a head size
    # of their own, per head: the cache optimum's DeepSeek-V3 entry describes.
    latent = all(getattr(config, name, None) for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    base = DeepSeekV3OnnxConfig if latent else LlamaOnnxConfig if grouped else TextDecoderWithPositionIdsOnnxConfig

    class StandardDecoderOnnxConfig(base):
        NORMALIZED_CONFIG_CLASS = NormalizedTextConfigWithGQA if grouped else NormalizedTextConfig

    return StandardDecoderOnnxConfig, ""


def takes_standard_decoder_inputs(model_class: type) -> bool:
    """Whether a transformers class is built on the standard decoder contract (generic_decoder_config)."""
    import inspect

    if getattr(model_class, "_supports_attention_backend", False):
        return True
    parameters = inspect.signature(model_class.forward).parameters
    return bool(getattr(model_class, "_supports_sdpa", False)) and all(
        name in parameters for name in ("input_ids", "attention_mask", "position_ids", "past_key_values"))


def _first_sentence(exc: Exception) -> str:
    """optimum's refusal without the list of every model type it supports that follows it."""
    return str(exc).splitlines()[0].split(" Only [")[0]
