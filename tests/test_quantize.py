"""orion quantize, fast: bad input, the block layout against onnxruntime's own kernels, GPTQ, the q3 allocation.

The layout tests build one-node ONNX graphs around the arrays orion writes and
run them in onnxruntime, so a packing or ordering mistake shows up as wrong
numbers from the real MatMulNBits / GatherBlockQuantized kernels.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from orion_cli.onnx_weights import unpack_codes as unpack
from orion_cli.quantize.blockwise import BlockQuantized, pack, quantize_weight
from orion_cli.quantize.gptq import quantize_gptq
from orion_cli.quantize.allocate import Option, allocate


def _session(node: onnx.NodeProto, inputs, outputs, initializers):
    import onnxruntime as ort

    graph = helper.make_graph([node], "g", inputs, outputs, initializers)
    model = helper.make_model(graph, ir_version=10,
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run_matmul_nbits(q: BlockQuantized, x: np.ndarray) -> np.ndarray:
    node = helper.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft",
                            K=q.k, N=q.n, bits=q.bits, block_size=q.block_size)
    inits = [numpy_helper.from_array(q.packed, "b"), numpy_helper.from_array(q.scales, "s"),
             numpy_helper.from_array(q.zero_points, "z")]
    session = _session(node, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return session.run(None, {"x": x})[0]


def run_gather_block_quantized(q: BlockQuantized, ids: np.ndarray) -> np.ndarray:
    """q quantizes a [hidden, vocab] weight, as graph.replace_site sees the embedding table."""
    node = helper.make_node("GatherBlockQuantized", ["w", "ids", "s", "z"], ["y"], domain="com.microsoft",
                            bits=q.bits, block_size=q.block_size, gather_axis=0, quantize_axis=1)
    inits = [numpy_helper.from_array(q.packed.reshape(q.n, -1), "w"), numpy_helper.from_array(q.scales, "s"),
             numpy_helper.from_array(q.zero_points, "z")]
    session = _session(node, [helper.make_tensor_value_info("ids", TensorProto.INT64, list(ids.shape))],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return session.run(None, {"ids": ids})[0]


@pytest.fixture
def weight():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((96, 40)) * 0.05).astype(np.float32)  # K=96: blocks of 64 need padding


# --- the block layout, checked by onnxruntime's kernels ---------------------------------------------------


def test_pack_and_unpack_are_inverse():
    rng = np.random.default_rng(1)
    for bits in (2, 4, 8):
        codes = rng.integers(0, 1 << bits, size=(3, 5, 32), dtype=np.uint8)
        packed = pack(codes, bits)
        assert packed.shape == (3, 5, 32 * bits // 8)
        np.testing.assert_array_equal(unpack(packed, bits), codes)
    # lowest bits first: codes 1, 2 at 4 bits pack to 0x21
    assert pack(np.array([1, 2], np.uint8), 4).tolist() == [0x21]


@pytest.mark.parametrize("method,bits,block", [
    (method, bits, block) for method in ("rtn", "kquant", "hqq") for bits, block in ((4, 32), (2, 32), (2, 64), (8, 16))
    if not (method == "hqq" and bits == 8)
])
def test_matmul_nbits_computes_what_dequantize_says(weight, method, bits, block):
    q = quantize_weight(weight, bits, block, method)
    assert (q.bits, q.block_size, q.k, q.n, q.method) == (bits, block, 96, 40, method)
    dequantized = q.dequantize()
    assert dequantized.shape == weight.shape
    x = np.random.default_rng(2).standard_normal((3, 96)).astype(np.float32)
    np.testing.assert_allclose(run_matmul_nbits(q, x), x @ dequantized, rtol=1e-4, atol=1e-5)
    # and it is a quantization of `weight`: the error is a fraction of a step, shrinking with more bits
    step = np.abs(weight).max() * 2 / ((1 << bits) - 1)
    assert np.abs(dequantized - weight).max() <= step


@pytest.mark.parametrize("method", ["rtn", "kquant"])
@pytest.mark.parametrize("bits", [4, 2])
def test_gather_block_quantized_reads_the_same_layout(method, bits):
    rng = np.random.default_rng(3)
    table = (rng.standard_normal((50, 64)) * 0.1).astype(np.float32)  # [vocab, hidden]
    q = quantize_weight(np.ascontiguousarray(table.T), bits, 32, method)  # along hidden, as graph.py does
    ids = np.array([[0, 7, 49], [3, 3, 12]], dtype=np.int64)
    np.testing.assert_allclose(run_gather_block_quantized(q, ids), q.dequantize().T[ids], rtol=1e-6, atol=1e-7)


def test_gather_block_quantized_refuses_float_zero_points():
    """Why --method hqq keeps k-quant for the embedding: onnxruntime rejects HQQ's float zero points there."""
    table = (np.random.default_rng(5).standard_normal((50, 64)) * 0.1).astype(np.float32)
    q = quantize_weight(np.ascontiguousarray(table.T), 4, 32, "hqq")
    with pytest.raises(Exception, match="GatherBlockQuantized"):
        run_gather_block_quantized(q, np.array([[1, 2]], dtype=np.int64))


def test_more_bits_means_less_error(weight):
    errors = {bits: np.abs(quantize_weight(weight, bits, 32, "rtn").dequantize() - weight).mean() for bits in (2, 4, 8)}
    assert errors[8] < errors[4] < errors[2]


def test_quantize_weight_refuses_what_matmul_nbits_cannot_run(weight):
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(weight, 3, 32, "rtn")
    # float zero points (HQQ) run only on MatMulNBits' 2- and 4-bit unpacked path
    with pytest.raises(ValueError, match="hqq"):
        quantize_weight(weight, 8, 32, "hqq")


# --- GPTQ --------------------------------------------------------------------------------------------------


def correlated_inputs(k: int, n: int = 2048, seed: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    scale = np.exp(rng.standard_normal(k))  # a few dominant features, like real activations
    return (rng.standard_normal((n, k)) @ mixing * scale).astype(np.float32)


@pytest.mark.parametrize("bits", [4, 2])
def test_gptq_lowers_the_output_error_of_round_to_nearest(weight, bits):
    x = correlated_inputs(weight.shape[0])
    hessian = 2.0 / len(x) * (x.astype(np.float64).T @ x)
    gptq = quantize_gptq(weight, hessian, bits, 32)
    rtn = quantize_weight(weight, bits, 32, "rtn")
    error = lambda q: np.linalg.norm(x @ q.dequantize() - x @ weight)  # noqa: E731
    assert error(gptq) < 0.8 * error(rtn)
    # its arrays are valid MatMulNBits input: onnxruntime computes the same product
    np.testing.assert_allclose(run_matmul_nbits(gptq, x[:4]), x[:4] @ gptq.dequantize(), rtol=1e-4, atol=1e-4)


def test_gptq_pads_a_partial_block_to_exact_zeros(weight):
    x = correlated_inputs(weight.shape[0], 512)
    q = quantize_gptq(weight, x.T.astype(np.float64) @ x, 4, 64)  # K=96 is 1.5 blocks of 64
    codes = q.codes().reshape(q.n, q.k_blocks, q.block_size)
    zeros = unpack(q.zero_points, 4)[:, : q.k_blocks]
    np.testing.assert_array_equal(codes[:, 1, 32:], np.broadcast_to(zeros[:, 1:2], (q.n, 32)))


# --- the allocation: least predicted KL within a byte budget ---------------------------------------------


def test_allocation_buys_the_most_kl_per_byte_within_the_budget():
    options = {
        "head": {"2": Option(100, 0.030), "4": Option(200, 0.001)},  # 0.029 for 100 bytes
        "emb": {"2": Option(100, 0.040), "4": Option(200, 0.003)},   # 0.037 for 100 bytes
        "q": {"2": Option(10, 0.002), "4": Option(20, 0.0001)},      # 0.0019 for 10 bytes: the best per byte
    }
    chosen, fits = allocate(options, budget=320)
    assert fits and chosen == {"head": "2", "emb": "4", "q": "4"}  # 310 bytes; head's step no longer fits
    chosen, _ = allocate(options, budget=420)
    assert chosen == {"head": "4", "emb": "4", "q": "4"}
    chosen, _ = allocate(options, budget=220)
    assert chosen == {"head": "2", "emb": "2", "q": "4"}
    chosen, _ = allocate(options, budget=210)  # exactly the cheapest of each
    assert chosen == {"head": "2", "emb": "2", "q": "2"}


def test_allocation_skips_options_that_cost_more_for_no_less_kl_and_reports_an_impossible_budget():
    options = {"a": {"cheap": Option(10, 1.0), "dear": Option(30, 1.0), "mid": Option(20, 0.2),
                     "best": Option(40, 0.19)}}
    chosen, fits = allocate(options, budget=35)
    assert fits and chosen == {"a": "mid"}  # "dear" is never worth having; "best" does not fit
    chosen, fits = allocate(options, budget=5)
    assert not fits and chosen == {"a": "cheap"}


def test_allocation_takes_steps_along_a_tensors_hull_in_order():
    # from 10 bytes: +10 bytes saves 0.5, +20 more saves 0.4 (less per byte): a convex hull of three
    options = {"a": {"x": Option(10, 1.0), "y": Option(20, 0.5), "z": Option(40, 0.1)},
               "b": {"x": Option(10, 1.0), "y": Option(25, 0.7)}}  # 0.02 per byte
    chosen, _ = allocate(options, budget=45)
    # a's first step (0.05 per byte); a's second (0.02, first of the tie by name) does not fit; b's does
    assert chosen == {"a": "y", "b": "y"}
    chosen, _ = allocate(options, budget=100)
    assert chosen == {"a": "z", "b": "y"}


# --- bad input: one line, the right exit code, nothing written --------------------------------------------


def _one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orion: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("flags,code,needles", [
    (["--level", "q3.5"], 2, ["--level", "q3.5"]),
    (["--method", "awq"], 2, ["--method", "awq"]),
    (["--block-size", "48"], 2, ["--block-size"]),
    (["--size-budget", "1.5"], 2, ["--size-budget 1.5", "(0, 1]"]),
    (["--eval-text", "missing.txt"], 2, ["--eval-text", "missing.txt"]),
])
def test_bad_flags_are_refused_before_any_work(orion, tiny_llama, tmp_path, flags, code, needles):
    out = tmp_path / "out"
    _one_line_error(orion("quantize", "--model", tiny_llama, "--output", out, *flags), code, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"], "no output and no temporary sibling"


def test_a_directory_without_config_is_refused(orion, tmp_path):
    model = tmp_path / "noconfig"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\0" * 16)
    _one_line_error(orion("quantize", "--model", model, "--output", tmp_path / "out"), 1, "config.json", str(model))
    assert not (tmp_path / "out").exists()


def test_a_directory_without_weights_is_refused(orion, tiny_llama, tmp_path):
    model = tmp_path / "noweights"
    model.mkdir()
    (model / "config.json").write_text((tiny_llama / "config.json").read_text())
    result = orion("quantize", "--model", model, "--output", tmp_path / "out")
    assert result.exit_code in (1, 2) and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert str(model) in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_unknown_registry_key_is_refused(orion, tmp_path):
    result = orion("quantize", "--model", "no-such-model", "--output", tmp_path / "out")
    assert result.exit_code in (1, 2) and "no-such-model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_kept_without_force(orion, tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_line_error(orion("quantize", "--model", tiny_llama, "--output", out), 1, "--force", str(out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_taken_registry_key_is_refused_before_any_work(orion, tiny_llama, tmp_path):
    registry = tmp_path / "models.json"
    assert orion("register", tiny_llama, "--id", "taken", "--registry", registry).exit_code == 0
    before = registry.read_text()
    _one_line_error(orion("quantize", "--model", tiny_llama, "--output", tmp_path / "out", "--register", "taken",
                          "--registry", registry), 1, "taken")
    assert not (tmp_path / "out").exists()
    assert registry.read_text() == before


def test_config_file_supplies_the_level(orion, tiny_llama, tmp_path):
    """quantize.level comes from --config when --level is absent (an unknown one is refused, naming it)."""
    config = tmp_path / "orion.yaml"
    config.write_text("quantize:\n  level: q9\n")
    result = orion("--config", config, "quantize", "--model", tiny_llama, "--output", tmp_path / "out")
    assert result.exit_code == 2 and "q9" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_help_has_examples(orion):
    result = orion("quantize", "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.stdout and "--level" in result.stdout and "--low-cpu-mem" in result.stdout



def test_round_to_nearest_with_a_choice_of_formats_calibrates_only_the_sensitivity_sample():
    """RTN needs no Hessians; only the sensitivity streams (sensitivity.py) need tokens, and only their sample.
    Calibrating every configured token took TinyLlama's --method rtn q4 from about 1 minute to about 16."""
    from orion_cli.quantize.budget import CalibrationCost, plan_calibration
    from orion_cli.quantize.levels import Format

    cost = CalibrationCost(per_token_flops=1e6, fixed_flops=0.0, probe_flops=1e6)
    formats = (Format(4, 64), Format(8, 64))
    common = dict(widths=formats, tokens=8192, minutes=20, window=128, sample_tokens=512)
    assert plan_calibration(cost, requested="rtn", linear_method="rtn", **common).tokens == 512
    assert plan_calibration(cost, requested="gptq", linear_method="gptq", **common).tokens == 8192
    single = {**common, "widths": formats[:1]}
    assert plan_calibration(cost, requested="rtn", linear_method="rtn", **single).tokens == 0
