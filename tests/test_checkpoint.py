"""CheckpointReader: one interface over single, sharded and .bin checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from orion_cli.checkpoint import CheckpointReader
from orion_cli.weights import read_safetensors_header
from orion_cli.errors import ModelDirError


def test_reads_single_file_lazily(tiny_llama):
    reader = CheckpointReader(tiny_llama)
    expected = load_file(tiny_llama / "model.safetensors")
    assert set(reader.names()) == set(expected)
    name = "model.layers.0.self_attn.q_proj.weight"
    piece = reader.get_slice(name)
    assert piece.get_shape() == list(expected[name].shape)
    assert torch.equal(piece[16:32], expected[name][16:32])
    info = reader.info(name)
    assert info.dtype == "F32" and info.nbytes == expected[name].numel() * 4


def test_header_order_is_byte_order(tiny_llama):
    infos, _ = read_safetensors_header(tiny_llama / "model.safetensors")
    starts = [i.start for i in infos.values()]
    assert starts == sorted(starts)


def test_reads_hf_sharded_checkpoint(tiny_llama, tmp_path):
    tensors = load_file(tiny_llama / "model.safetensors")
    names = sorted(tensors)
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, tmp_path / file)
        weight_map.update({n: file for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    reader = CheckpointReader(tmp_path)
    assert sorted(reader.names()) == names
    assert all(torch.equal(reader.get_tensor(n), tensors[n]) for n in names)

    (tmp_path / "b.safetensors").unlink()
    with pytest.raises(ModelDirError, match="b.safetensors, listed in model.safetensors.index.json, is missing"):
        CheckpointReader(tmp_path)


def test_reads_pytorch_bin_weights_only(tiny_llama, tmp_path):
    tensors = load_file(tiny_llama / "model.safetensors")
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    reader = CheckpointReader(tmp_path)
    assert sorted(reader.names()) == sorted(tensors)
    name = "model.embed_tokens.weight"
    assert torch.equal(reader.get_slice(name)[:3], tensors[name][:3])


class NotATensor:
    """Any class: unpickling it would run code of the file's choosing."""


def test_refuses_pickled_objects(tmp_path):
    torch.save({"evil": NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelDirError, match="weights-only"):
        CheckpointReader(tmp_path)


def test_no_weights(tmp_path):
    shutil.rmtree(tmp_path, ignore_errors=True)
    tmp_path.mkdir()
    with pytest.raises(ModelDirError, match="no \\*.safetensors"):
        CheckpointReader(tmp_path)
