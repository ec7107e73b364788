"""ONNX models: their weights split into shard files, the graph pointed at them.

ONNX keeps large initializers outside the graph as "external data": each tensor
names a file, an offset and a length relative to the .onnx file. Sharding an
ONNX model (what `orion quantize` writes) is therefore copying those byte ranges
into shard_NN.onnx_data files and rewriting each tensor's location, offset and
length; the graph itself is otherwise saved unchanged, so onnxruntime computes
exactly what it computed before.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import ModelDirError, UnsupportedModelError
from ..modeldir import ModelDir
from .io import SourceTensor
from .plan import GROUP_EMBEDDINGS, GROUP_FINAL, GROUP_HEAD, GROUP_LAYERS, layer_index, tensor_group

# Inline initializers at least this large move into the shards too (onnx's own
# default threshold for external data); smaller ones stay in the graph.
INLINE_THRESHOLD_BYTES = 1024
SHARD_SUFFIX = ".onnx_data"


@dataclass
class OnnxSource:
    """A loaded ONNX graph (weights left on disk) and the tensors to shard, in execution order."""

    model_file: Path
    proto: Any  # onnx.ModelProto, external data not loaded
    tensors: list[SourceTensor]
    _protos: dict[str, Any]  # SourceTensor.name -> the TensorProto it came from

    def write_model(self, destination: Path, placements: dict[str, tuple[str, int]]) -> None:
        """Save the graph with each placed tensor pointing at (shard file, offset)."""
        import onnx

        lengths = {t.name: t.nbytes for t in self.tensors}
        for name, (location, offset) in placements.items():
            proto = self._protos[name]
            proto.ClearField("raw_data")
            del proto.external_data[:]
            proto.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", offset), ("length", lengths[name])):
                entry = proto.external_data.add()
                entry.key, entry.value = key, str(value)
        # Every moved tensor is external and has no raw_data left, so onnx writes the graph alone.
        onnx.save_model(self.proto, str(destination))


def read_onnx_source(model: ModelDir, flag: str = "--model") -> OnnxSource:
    import onnx

    if len(model.onnx_files) != 1:
        names = ", ".join(p.name for p in model.onnx_files)
        raise UnsupportedModelError(f"{flag} {model.root}: {len(model.onnx_files)} ONNX graphs ({names}); orion shard takes one")
    model_file = model.onnx_files[0]
    try:
        proto = onnx.load(str(model_file), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError, ...
        raise ModelDirError(f"{model_file}: not a readable ONNX model ({exc})") from None

    found = list(_shardable_tensors(proto.graph))
    by_name = {name: tensor for name, tensor in found}
    first_use = _first_uses(proto.graph, set(by_name))
    first_layer_use = min((pos for pos, node in first_use.values() if layer_index(node) is not None), default=math.inf)
    # Tensors no node reads (rare) go last, in graph order.
    order = sorted(by_name, key=lambda n: (0, first_use[n][0]) if n in first_use else (1, 0))

    tensors = []
    for name in order:
        proto_tensor = by_name[name]
        position, node_name = first_use.get(name, (math.inf, ""))
        layer = layer_index(node_name) if layer_index(node_name) is not None else layer_index(name)
        if layer is not None:
            group = GROUP_LAYERS
        elif GROUP_HEAD in (tensor_group(name), tensor_group(node_name)):
            group = GROUP_HEAD
        else:
            group = GROUP_EMBEDDINGS if position < first_layer_use else GROUP_FINAL
        tensors.append(_source_tensor(model_file.parent, name, proto_tensor, layer, group))
    return OnnxSource(model_file, proto, tensors, by_name)


def _source_tensor(base: Path, name: str, proto: Any, layer: int | None, group: int) -> SourceTensor:
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    dtype = onnx.TensorProto.DataType.Name(proto.data_type)
    shape = tuple(proto.dims)
    if not uses_external_data(proto):
        raw = proto.raw_data
        return SourceTensor(name, dtype, shape, len(raw), layer, group, load=lambda: memoryview(raw))
    info = ExternalDataInfo(proto)
    file = (base / info.location).resolve()
    if not file.is_file():
        raise ModelDirError(f"{base}: external data file {info.location} of tensor {name} is missing")
    offset = info.offset or 0
    length = info.length if info.length is not None else _packed_size(proto)
    if offset + length > file.stat().st_size:
        raise ModelDirError(f"{file}: shorter than tensor {name} needs (offset {offset}, length {length}); truncated?")
    return SourceTensor(name, dtype, shape, length, layer, group, file=file, start=offset)


def _packed_size(proto: Any) -> int:
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    count = math.prod(proto.dims)
    sub_byte = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, getattr(onnx.TensorProto, "FLOAT4E2M1", -1)}
    if proto.data_type in sub_byte:
        return (count + 1) // 2
    return count * tensor_dtype_to_np_dtype(proto.data_type).itemsize


def _shardable_tensors(graph: Any) -> Iterator[tuple[str, Any]]:
    """(name, TensorProto) of every tensor whose bytes go to the shards, subgraphs included.

    Tensors already stored externally must move (the output has no old data file);
    inline initializers move when they hold at least INLINE_THRESHOLD_BYTES of raw data.
    """
    from onnx.external_data_helper import uses_external_data

    for tensor in graph.initializer:
        if uses_external_data(tensor) or len(tensor.raw_data) >= INLINE_THRESHOLD_BYTES:
            yield tensor.name, tensor
    for node in graph.node:
        for attribute in node.attribute:
            attribute_tensors = ([attribute.t] if attribute.HasField("t") else []) + list(attribute.tensors)
            for index, tensor in enumerate(attribute_tensors):
                if uses_external_data(tensor):  # graph attributes are left inline unless already external
                    yield tensor.name or f"{node.name}.{attribute.name}.{index}", tensor
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _shardable_tensors(subgraph)


def _first_uses(graph: Any, names: set[str]) -> dict[str, tuple[int, str]]:
    """For each tensor in `names`, (position, node name) of the first node that computes with it.

    Nodes are visited in graph order, which ONNX requires to be topological,
    subgraphs where their parent node runs. An Identity that merely forwards an
    initializer (exporters emit them for weights shared by several layers) is
    not a use: the nodes reading its output are.
    """
    first: dict[str, tuple[int, str]] = {}
    alias: dict[str, str] = {}
    counter = itertools.count()

    def visit(current: Any) -> None:
        for node in current.node:
            position = next(counter)
            if node.op_type == "Identity" and node.input and alias.get(node.input[0], node.input[0]) in names:
                alias[node.output[0]] = alias.get(node.input[0], node.input[0])
                continue
            for value in node.input:
                source = alias.get(value, value)
                if source in names and source not in first:
                    first[source] = (position, node.name)
            for attribute in node.attribute:
                for index, tensor in enumerate(([attribute.t] if attribute.HasField("t") else []) + list(attribute.tensors)):
                    key = tensor.name or f"{node.name}.{attribute.name}.{index}"
                    if key in names and key not in first:
                        first[key] = (position, node.name)
                for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                    visit(subgraph)

    visit(graph)
    return first


def tensor_layout(model_file: Path) -> dict[str, list[tuple[str, str, tuple[int, ...], int, int]]]:
    """External tensors of an ONNX model by data file: (name, dtype, shape, offset, length), in file order."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    proto = onnx.load(str(model_file), load_external_data=False)
    layout: dict[str, list[tuple[str, str, tuple[int, ...], int, int]]] = {}
    for name, tensor in _shardable_tensors(proto.graph):
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        length = info.length if info.length is not None else _packed_size(tensor)
        layout.setdefault(info.location, []).append(
            (name, onnx.TensorProto.DataType.Name(tensor.data_type), tuple(tensor.dims), info.offset or 0, length)
        )
    for entries in layout.values():
        entries.sort(key=lambda entry: entry[3])
    return layout
