"""Every tensor of the inputs reaches the merged model, or the merge fails naming it.

mergekit merges the tensors its architecture description lists. Some of its
JSON descriptions miss tensors the models have (OLMo2's q/k norms, Gemma's
untied lm_head), which mergekit then drops without a word, and transformers
later fills with random values; others require tensors transformers no
longer saves (GPT-NeoX's attention mask buffers). Two defences:

- before the merge, when the description misses tensors every input holds or
  requires tensors they lack,
  mergekit is given the architecture it infers from the checkpoints' own tensor
  names instead (its `infer_architecture_info`), so mergekit merges those
  tensors too, with the method asked for;
- mergekit's inference refuses a tensor name with two indices (an expert's
  weight, `layers.3.mlp.experts.7.up_proj`), so during a merge only a name's
  first index is read as its layer (first_index_is_the_layer);
- after the merge, the output is compared with what its config needs: every
  tensor of the model transformers builds from the output's config.json (tied
  heads excepted), with the inputs' shapes, and, for whole-model merges, every
  tensor the inputs share. Anything missing fails the merge before the output
  is put in place.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import OrionError
from ..weights import read_safetensors_header

log = logging.getLogger(__name__)


class IncompleteMergeError(OrionError):
    """The merged model would load with missing or misshapen weights."""


def tensor_shapes(files: Iterable[Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        shapes.update({name: info.shape for name, info in read_safetensors_header(file)[0].items()})
    return shapes


def uncovered_tensors(merge_config, options, shared: set[str]) -> set[str]:
    """Where the architecture mergekit would use does not fit the inputs: tensors every input holds that it does
    not list, and tensors it requires that the inputs do not hold (GPT-NeoX's `attention.bias`, a mask buffer
    transformers no longer saves, on which mergekit fails)."""
    from mergekit.architecture import get_architecture_info

    architecture = get_architecture_info(merge_config, options)
    config = merge_config.base_model or merge_config.referenced_models()[0]
    listed: set[str] = set()
    stale: set[str] = set()
    for weight in architecture.all_weights(config.config()):
        names = {weight.name, *(weight.aliases or ()), *(weight.tied_names or ())}
        listed |= names
        if not weight.optional and not names & shared:
            stale.add(weight.name)
    return (shared - listed) | stale


@contextlib.contextmanager
def inferred_architecture(merge_config, options) -> Iterator[None]:
    """run_merge with the architecture mergekit infers from the checkpoints' tensor names.

    run_merge looks its architecture up through the name it imported; that one
    name is swapped for the duration of the merge.
    """
    import mergekit.merge
    from mergekit.architecture.auto import infer_architecture_info

    models = tuple(merge_config.referenced_models())
    architecture = infer_architecture_info(models, merge_config.base_model, options)
    every_model = models + ((merge_config.base_model,) if merge_config.base_model else ())
    architecture = _optional_where_a_layer_lacks_it(architecture, every_model, options)
    original = mergekit.merge.get_architecture_info
    mergekit.merge.get_architecture_info = lambda *args, **kwargs: architecture
    try:
        yield
    finally:
        mergekit.merge.get_architecture_info = original


def _optional_where_a_layer_lacks_it(architecture, models, options):
    """The inferred architecture with every layer template some layer lacks made optional.

    mergekit's inference makes a template optional only when layer 0 lacks it, and then requires it of every
    layer: a model whose first layers differ from the rest (DeepSeek's dense MLPs before its experts) fails on
    the first layer without the template. An optional tensor no model has is skipped; one every model has is
    merged as before."""
    from mergekit.architecture.auto import get_model_tensor_names

    in_all = set.intersection(*(set(get_model_tensor_names(model, options)) for model in models))
    modules = {}
    for key, module in architecture.modules.items():
        definition = module.architecture.definition
        layers = range(definition.override_num_layers or 0)
        weights = [weight if weight.optional or all(weight.name.replace("${layer_index}", str(i)) in in_all
                                                    for i in layers)
                   else weight.model_copy(update={"optional": True})
                   for weight in definition.layer_templates.weights]
        templates = definition.layer_templates.model_copy(update={"weights": weights})
        inferred = module.architecture.model_copy(
            update={"definition": definition.model_copy(update={"layer_templates": templates})})
        modules[key] = module.model_copy(update={"architecture": inferred})
    return architecture.model_copy(update={"modules": modules})


@contextlib.contextmanager
def first_index_is_the_layer() -> Iterator[None]:
    """mergekit infers an architecture it has no description of (OLMoE, Qwen2-MoE, PhiMoE) from tensor names,
    reading `.N.` as the layer index, and refuses a name with two. For the duration of a merge, only a name's
    first index is its layer: an expert's index stays literal in the layer's template, one template per expert,
    so each expert is merged with the same expert of the other models."""
    import mergekit.architecture.auto as auto

    original = auto.RE_LAYER_INDEX
    auto.RE_LAYER_INDEX = _FirstIndexOnly(original)
    try:
        yield
    finally:
        auto.RE_LAYER_INDEX = original


class _FirstIndexOnly:
    """The three uses mergekit's inference makes of its layer-index pattern, each on a name's first match."""

    def __init__(self, pattern):
        self.pattern = pattern

    def findall(self, name: str) -> list[str]:
        return self.pattern.findall(name)[:1]

    def search(self, name: str):
        return self.pattern.search(name)

    def sub(self, replacement: str, name: str) -> str:
        return self.pattern.sub(replacement, name, count=1)


def expected_tensors(output_dir: Path) -> dict[str, tuple[int, ...]] | None:
    """The tensors (and shapes) transformers' model for the output's config.json holds, tied heads left out.

    None when transformers has no class for the config (custom code).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(output_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError, ImportError) as exc:
        log.debug("no transformers class for %s: %s", output_dir, exc)
        return None
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if getattr(config.get_text_config(), "tie_word_embeddings", False):
        for key in _tied_keys(model):
            shapes.pop(key, None)
    return shapes


def _tied_keys(model: Any) -> list[str]:
    keys = getattr(model, "_tied_weights_keys", None) or []
    return list(keys.keys()) if isinstance(keys, dict) else list(keys)


def check_complete(output_dir: Path, input_shapes: list[dict[str, tuple[int, ...]]], whole_models: bool) -> None:
    """Raise IncompleteMergeError naming the first tensor the merged model lacks or has in the wrong shape."""
    written = tensor_shapes(sorted(Path(output_dir).glob("*.safetensors")))
    expected = expected_tensors(Path(output_dir)) or {}
    for name, shape in expected.items():
        if name not in written:
            raise IncompleteMergeError(f"the merged model lacks tensor {name}, which its config.json needs; "
                                       "nothing was written")
        if written[name] != shape:
            raise IncompleteMergeError(f"the merged tensor {name} has shape {list(written[name])} but its "
                                       f"config.json needs {list(shape)}; nothing was written")
    if whole_models and input_shapes:
        shared = set.intersection(*(set(shapes) for shapes in input_shapes))
        optional = set(_tied_names(output_dir)) if not expected else set()
        for name in sorted(shared - set(written) - optional):
            if expected and name not in expected:
                continue  # a tied head the output's config does not store, as transformers saves it
            raise IncompleteMergeError(f"the merged model lacks tensor {name}, which every input has; "
                                       "nothing was written")


def _tied_names(output_dir: Path) -> list[str]:
    import json

    config = json.loads((Path(output_dir) / "config.json").read_text())
    return ["lm_head.weight"] if config.get("tie_word_embeddings", True) else []
