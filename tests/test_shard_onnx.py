"""orion shard on an ONNX model with external data, as `orion quantize` writes it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from orion_cli.errors import VerificationError
from orion_cli.modeldir import copy_support_files
from orion_cli.shard import iter_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def quantized_onnx(tiny_llama, tmp_path_factory) -> Path:
    """A tiny Llama exported by optimum, 4-bit MatMulNBits-quantized, weights in model.onnx_data.

    Laid out as `orion quantize` lays out its output: ROOT/quantized/model.onnx
    and ROOT/metadata.json; built here so these tests do not depend on that command.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from optimum.exporters.onnx import main_export

    root = tmp_path_factory.mktemp("onnx") / "tiny-q4"
    export = root.parent / "export"
    main_export(str(tiny_llama), output=str(export), task="text-generation-with-past", do_validation=False)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(export / "model.onnx")), block_size=32, is_symmetric=True, bits=4)
    quantizer.process()
    model_dir = root / "quantized"
    model_dir.mkdir(parents=True)
    onnx.save_model(quantizer.model.model, str(model_dir / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=1024)
    copy_support_files(tiny_llama, model_dir)
    quantization = {"level": "q4", "bits": 4, "method": "rtn", "block_size": 32}
    (root / "metadata.json").write_text(json.dumps({"quantization": quantization}))
    return root


def run_onnx(model_file: Path) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    batch, new, past = 2, 7, 3
    feeds = {
        "input_ids": rng.integers(0, 512, (batch, new)),
        "attention_mask": np.ones((batch, past + new), np.int64),
        "position_ids": np.tile(np.arange(past, past + new), (batch, 1)),
    }
    for value in session.get_inputs():
        if value.name.startswith("past_key_values"):
            heads, head_dim = value.shape[1], value.shape[3]
            feeds[value.name] = rng.standard_normal((batch, heads, past, head_dim)).astype(np.float32)
    return session.run(None, feeds)


def test_sharded_onnx_runs_bit_identically(orion, quantized_onnx):
    result = orion("shard", "--model", quantized_onnx, "--output", "out", "--shards", "3", "--json")
    assert result.exit_code == 0, result.stderr
    out = Path("out")
    assert sorted(p.name for p in out.glob("shard_*.onnx_data")) == [f"shard_0{i}.onnx_data" for i in range(3)]
    assert not (out / "model.onnx_data").exists()

    source_outputs = run_onnx(quantized_onnx / "quantized" / "model.onnx")
    sharded_outputs = run_onnx(out / "model.onnx")
    assert len(source_outputs) == len(sharded_outputs) == 1 + 2 * 2  # logits, then a key and value per layer
    for expected, got in zip(source_outputs, sharded_outputs, strict=True):
        assert got.dtype == expected.dtype and np.array_equal(got, expected)

    manifest = json.loads((out / "shard_manifest.json").read_text())
    assert manifest["weight_format"] == "onnx"
    assert manifest["model_file"]["file"] == "model.onnx"
    assert manifest["shards"][0]["tensors"][0] == "model.embed_tokens.weight"
    assert "head" in manifest["shards"][-1]["contains"]
    assert [s["layers"]["first"] for s in manifest["shards"] if s["layers"]] == sorted(
        s["layers"]["first"] for s in manifest["shards"] if s["layers"])
    # the quantization the registry shows survives sharding
    assert json.loads((out / "metadata.json").read_text())["quantization"]["level"] == "q4"
    assert orion("shard", "--verify", out).exit_code == 0


def test_optimum_loads_the_sharded_model(orion, quantized_onnx):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    assert orion("shard", "-m", quantized_onnx, "-o", "out", "-n", "3").exit_code == 0
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    mask = torch.ones_like(ids)
    sharded = ORTModelForCausalLM.from_pretrained("out")(input_ids=ids, attention_mask=mask).logits
    source = ORTModelForCausalLM.from_pretrained(quantized_onnx / "quantized")(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(sharded, source)


def test_onnx_max_shard_size_and_resharding(orion, quantized_onnx):
    result = orion("shard", "-m", quantized_onnx, "-o", "out", "--max-shard-size", "40KB", "--json")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads(Path("out/shard_manifest.json").read_text())
    for shard in manifest["shards"]:
        assert shard["bytes"] <= 40_000 or len(shard["tensors"]) == 1
    assert [w.split()[1] for w in result.json()["warnings"]] == ["model.embed_tokens.weight"]
    expected = run_onnx(quantized_onnx / "quantized" / "model.onnx")
    assert all(np.array_equal(a, b) for a, b in zip(expected, run_onnx(Path("out/model.onnx")), strict=True))

    # a sharded ONNX model shards again (its data now spread over several files)
    assert orion("shard", "-m", "out", "-o", "again", "-n", "2").exit_code == 0
    assert all(np.array_equal(a, b) for a, b in zip(expected, run_onnx(Path("again/model.onnx")), strict=True))


def test_iter_shards_gives_the_onnx_initializers(orion, quantized_onnx):
    import onnx
    from onnx import numpy_helper

    assert orion("shard", "-m", quantized_onnx, "-o", "out", "-n", "2").exit_code == 0
    source = onnx.load(str(quantized_onnx / "quantized" / "model.onnx"))
    expected = {t.name: numpy_helper.to_array(t) for t in source.graph.initializer}
    loaded = {}
    for shard, arrays in iter_shards("out"):
        assert set(arrays) == set(shard.tensors)
        loaded.update(arrays)
    assert loaded.keys() <= expected.keys() and len(loaded) > 20
    for name, array in loaded.items():
        assert array.dtype == expected[name].dtype and np.array_equal(array, expected[name]), name


def test_damaged_onnx_graph_is_named(orion, quantized_onnx, tmp_path):
    assert orion("shard", "-m", quantized_onnx, "-o", "out", "-n", "2").exit_code == 0
    copy = tmp_path / "copy"
    shutil.copytree("out", copy)
    graph = copy / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[100] ^= 0x40
    graph.write_bytes(bytes(data))
    result = orion("shard", "--verify", copy)
    assert result.exit_code == 1 and f"{graph}: sha256 does not match" in result.stderr
    with pytest.raises(VerificationError, match="model.onnx"):
        next(iter_shards(copy))
