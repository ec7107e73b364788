"""The fp32 ONNX model: the weightless graph (graph.py) with every parameter an fp32 initializer.

Written tensor by tensor into one external data file, a row block at a time,
so memory stays bounded by a row block whatever the model's size. `orion
quantize --keep-intermediate` keeps it as OUT/onnx; `orion serve --engine
onnxruntime` on a checkpoint serves it from orion's cache (serve/onnx_cache.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checkpoint import CheckpointReader
from ..errors import ModelDirError
from ..modeldir import copy_support_files
from .graph import EXTERNAL_DATA_FILE, MODEL_FILE, export_graph
from .parameters import ExternalData, parameter_inputs, parameters_left, parameters_to_initializers, symbolic_cache_dims
from .tensors import ModelTensors, row_blocks

GRAPH_SCRATCH_FILE = ".graph.onnx"


def check_shapes(tensors: ModelTensors, parameters: dict[str, tuple[int, ...]], flag: str = "--model") -> None:
    """Every tensor the graph reads is in the checkpoint with the shape the config gives it."""
    for name, shape in parameters.items():
        stored = tensors.shape(name)
        if stored != shape:
            raise ModelDirError(f"{flag} {tensors.reader.model_dir}: tensor {tensors.key(name)} has shape "
                                f"{list(stored)} in the checkpoint, but config.json makes it {list(shape)}")


def write_float_model(source_dir: Path, graph_path: Path, onnx_dir: Path, tensors: ModelTensors) -> None:
    """`onnx_dir`/model.onnx(+ _data): the graph at `graph_path` with the checkpoint's weights in fp32, and the
    checkpoint's config and tokenizer files."""
    import onnx

    graph = onnx.load(str(graph_path), load_external_data=False)
    check_shapes(tensors, parameter_inputs(graph), tensors.flag)
    save_model(graph, tensors, ExternalData(onnx_dir / EXTERNAL_DATA_FILE), onnx_dir / MODEL_FILE, source_dir)


def save_model(model, tensors: ModelTensors, data: ExternalData, model_path: Path, source_dir: Path) -> None:
    """Save `model` at `model_path`: every parameter its nodes still read becomes an fp32 initializer in `data`
    (closed here), the cache's head axes are declared symbolic, and the checkpoint's config and tokenizer files
    go beside it. The end of both the fp32 export and orion quantize (whose quantized tensors are in `data`)."""
    import onnx

    parameters_to_initializers(model, [fp32_initializer(tensors, data, name) for name in parameters_left(model)])
    symbolic_cache_dims(model)
    data.close()
    onnx.save_model(model, str(model_path))
    copy_support_files(source_dir, model_path.parent)


def export_float_model(source_dir: Path, onnx_dir: Path, flag: str = "--model") -> None:
    """Export checkpoint `source_dir` to an fp32 ONNX model in the existing, empty directory `onnx_dir`."""
    graph_path = export_graph(source_dir, onnx_dir / GRAPH_SCRATCH_FILE, flag=flag)
    try:
        tensors = ModelTensors(CheckpointReader(source_dir, flag), base_model_prefix(source_dir), flag)
        write_float_model(source_dir, graph_path, onnx_dir, tensors)
    finally:
        graph_path.unlink(missing_ok=True)


def fp32_initializer(tensors: ModelTensors, data: ExternalData, name: str):
    shape = tensors.shape(name)
    if len(shape) != 2:
        return data.tensor(name, tensors.full(name).numpy())
    blocks = (tensors.rows(name, start, stop).numpy() for start, stop in row_blocks(shape[0], shape[1]))
    return data.tensor_from_blocks(name, shape, np.float32, blocks)


def base_model_prefix(source_dir: Path) -> str:
    """The prefix transformers' causal-LM class puts before the base model's parameter names ("model",
    "transformer"), which some checkpoints were saved without."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    config = AutoConfig.from_pretrained(source_dir)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    return getattr(model_class, "base_model_prefix", "") if model_class is not None else ""
