"""The activation codec: round trips for every codec x dtype x shape, lossy error bounds, auto policy."""

from __future__ import annotations

from math import prod

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from orion_cli.codec import (CODECS, LINK_CODECS, CodecError, CodecPolicy, CodecRangeError,
                             CodecUsageError, CorruptFrameError, UnknownCodecError, UnsupportedTensorError,
                             choose_codec, decode, encode, inspect_frame, is_lossy)
from orion_cli.codec.dtypes import DTYPES
from orion_cli.config import LinkCodec, load_config
from orion_cli.errors import EXIT_USAGE, OrionError

EXACT = ("raw", "zstd", "json")
SHIPPED = load_config(environ={}).codec  # what the library uses when given no setting
CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp16+zstd": torch.float16, "bf16+zstd": torch.bfloat16}
FLOATS = [d.name for d in DTYPES if d.is_float]
# Finite ranges each lossy codec carries without overflow (fp16 tops out at 65504).
LOSSY_RANGE = {"fp16": 6.0e4, "bf16": 2.0**126, "int8": 2.0**126}
EXAMPLES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _elements(name: str, bound: float | None):
    if name in ("float16", "float32", "float64", "bfloat16"):
        width = {"float16": 16, "float64": 64}.get(name, 32)
        if bound is None:
            return st.floats(width=width, allow_nan=True, allow_infinity=True)
        return st.floats(-min(bound, 6.0e4 if width == 16 else bound), min(bound, 6.0e4 if width == 16 else bound),
                         width=width)
    return hnp.from_dtype(np.dtype(name))


@st.composite
def tensors(draw, dtype_names=tuple(d.name for d in DTYPES), bound: float | None = None):
    """A torch tensor or numpy array of any supported dtype and small shape, possibly non-contiguous."""
    name = draw(st.sampled_from(dtype_names))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    layout = draw(st.sampled_from(["contiguous", "strided", "transposed"])) if shape else "contiguous"
    base_shape = {"strided": shape[:-1] + (shape[-1] * 2,) if shape else shape,
                  "transposed": shape[::-1]}.get(layout, shape)
    storage = "float32" if name == "bfloat16" else name
    base = draw(hnp.arrays(np.dtype(storage), base_shape, elements=_elements(name, bound)))
    if draw(st.booleans()):  # torch
        tensor = torch.from_numpy(base)
        tensor = tensor.to(torch.bfloat16) if name == "bfloat16" else tensor
        if layout == "strided":
            tensor = tensor[..., ::2]
        elif layout == "transposed":
            tensor = tensor.permute(*reversed(range(tensor.dim())))
        return tensor
    array = base.astype(ml_dtypes.bfloat16) if name == "bfloat16" else base
    if layout == "strided":
        array = array[..., ::2]
    elif layout == "transposed":
        array = array.T
    return array


def as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.contiguous()
        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if x.dtype == torch.bfloat16 else x.numpy()
    return np.ascontiguousarray(x)


def as_torch(x) -> torch.Tensor:
    array = np.array(as_numpy(x))  # a writable copy
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def assert_same_kind(original, decoded) -> None:
    assert type(decoded) is (torch.Tensor if isinstance(original, torch.Tensor) else np.ndarray)
    assert tuple(decoded.shape) == tuple(original.shape)
    assert decoded.dtype == original.dtype


def assert_bit_exact(original, decoded) -> None:
    assert_same_kind(original, decoded)
    assert as_numpy(decoded).tobytes() == as_numpy(original).tobytes()


def test_codec_names_are_the_configs():
    assert set(LinkCodec.__args__) == set(LINK_CODECS)


def test_library_defaults_are_the_shipped_config():
    settings_ = load_config(environ={}).codec
    policy = CodecPolicy()
    assert (policy.threshold_bytes, policy.int8_block_size, policy.zstd_level) == (
        settings_.auto_threshold_bytes, settings_.int8_block_size, settings_.zstd_level)


@pytest.mark.parametrize("codec", ["raw", "zstd"])
@EXAMPLES
@given(tensor=tensors())
def test_exact_codecs_round_trip_bit_for_bit(codec, tensor):
    assert_bit_exact(tensor, decode(encode(tensor, codec)))


def assert_same_values(original, decoded) -> None:
    """Equal values, NaN matching NaN whatever its payload bits (JSON keeps every other bit, -0.0 included)."""
    assert_same_kind(original, decoded)
    expected, got = as_numpy(original), as_numpy(decoded)
    if expected.dtype.kind in "fc" or expected.dtype == ml_dtypes.bfloat16:
        wide = np.complex128 if expected.dtype.kind == "c" else np.float64
        nan = np.isnan(expected.astype(wide))
        assert np.array_equal(np.isnan(got.astype(wide)), nan)
        assert got[~nan].tobytes() == expected[~nan].tobytes()
    else:
        assert got.tobytes() == expected.tobytes()


@EXAMPLES
@given(tensor=tensors())
def test_json_round_trips_every_value(tensor):
    assert_same_values(tensor, decode(encode(tensor, "json")))


@pytest.mark.parametrize("codec", list(CASTS))
@EXAMPLES
@given(tensor=tensors(bound=LOSSY_RANGE["fp16"]))
def test_cast_codecs_equal_torch_cast(codec, tensor):
    decoded = decode(encode(tensor, codec))
    assert_same_kind(tensor, decoded)
    source = as_torch(tensor)
    if source.is_floating_point():
        expected = source.to(CASTS[codec]).to(source.dtype)
    else:
        expected = source  # lossy codecs leave integers, bools and complex numbers exact
    assert as_numpy(decoded).tobytes() == as_numpy(expected).tobytes()


def int8_error_bound(original: np.ndarray, block: int, out_dtype) -> np.ndarray:
    """Per-element bound: half a quantization step (absmax/254, widened by the bfloat16 scale's rounding),
    plus rounding into the output dtype."""
    x = original.astype(np.float32).astype(np.float64).reshape(-1)
    padded = np.zeros(-(-x.size // block) * block)
    padded[: x.size] = np.abs(x)
    step = np.repeat(padded.reshape(-1, block).max(axis=1), block)[: x.size] / 254 * (1 + 2**-8)
    finfo = np.finfo(np.float32 if out_dtype == ml_dtypes.bfloat16 else out_dtype)
    eps = 2**-8 if out_dtype == ml_dtypes.bfloat16 else finfo.eps
    return step + eps * (np.abs(x) + step) + 2**-133 + float(finfo.smallest_subnormal)


@pytest.mark.parametrize("codec", ["int8", "int8+zstd"])
@EXAMPLES
@given(tensor=tensors(bound=LOSSY_RANGE["int8"]), block=st.sampled_from([1, 3, 32, 64]))
def test_int8_error_stays_within_half_a_step(codec, tensor, block):
    frame = encode(tensor, codec, int8_block_size=block)
    decoded = decode(frame)
    assert_same_kind(tensor, decoded)
    original, got = as_numpy(tensor), as_numpy(decoded)
    if original.dtype.kind not in "f" and original.dtype != ml_dtypes.bfloat16:
        assert got.tobytes() == original.tobytes()
        assert inspect_frame(frame).transform == "raw"
        return
    error = np.abs(original.astype(np.float64) - got.astype(np.float64)).reshape(-1)
    assert (error <= int8_error_bound(original, block, original.dtype)).all()


def activation(rows: int, hidden: int, seed: int = 0) -> torch.Tensor:
    """Gaussian activations with a few outlier channels 20-60x larger, as LLM hidden states have."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=generator)
    channels = torch.randperm(hidden, generator=generator)[: max(4, hidden // 1024)]
    x[:, channels] *= torch.empty(len(channels)).uniform_(20, 60, generator=generator)
    return x


@pytest.mark.parametrize("codec, max_ratio, max_error", [
    ("raw", 1.01, 0.0), ("zstd", 0.93, 0.0), ("fp16", 0.51, 1e-3), ("bf16+zstd", 0.45, 5e-3),
    ("int8", 0.27, 0.015), ("int8+zstd", 0.26, 0.015),
])
def test_activation_sizes_and_errors_meet_the_issue_targets(codec, max_ratio, max_error):
    x = activation(16, 4096)
    frame = encode(x, codec)
    relative_error = ((decode(frame) - x).norm() / x.norm()).item()
    assert len(frame) / (x.numel() * 4) <= max_ratio
    assert relative_error <= max_error


def test_zero_dim_and_empty_tensors_keep_their_shape():
    for tensor in (torch.tensor(3.5), np.float32(2.0), torch.zeros(0, 7), np.zeros((3, 0, 2), np.int64)):
        for codec in CODECS:
            decoded = decode(encode(tensor, codec))
            assert tuple(decoded.shape) == tuple(np.shape(tensor))


def test_raw_decode_views_writable_buffers_and_never_lends_bytes_to_torch():
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    frame = encode(tensor, "raw")
    buffer = bytearray(frame)
    shared = decode(buffer)
    start = np.frombuffer(buffer, np.uint8).ctypes.data
    assert start <= shared.data_ptr() < start + len(buffer)  # a view into the bytearray, no copy
    shared[0, 0] = 42.0
    offset = inspect_frame(frame).header_nbytes
    assert np.frombuffer(buffer, np.float32, count=1, offset=offset)[0] == 42.0
    with pytest.raises(CorruptFrameError, match="payload checksum mismatch"):
        decode(buffer)  # the frame was changed through the view: its checksum says so
    copied = decode(frame)  # immutable bytes: torch gets a private, writable copy
    copied[0, 0] = -1.0
    assert decode(frame)[0, 0] == 0.0

    array = np.arange(6, dtype=np.int64)
    frame = encode(array, "raw")
    view = decode(frame)
    assert np.shares_memory(view, np.frombuffer(frame, np.uint8)) and not view.flags.writeable


def test_big_endian_arrays_arrive_with_their_values_in_native_order():
    array = np.arange(-3, 3, dtype=">i4").reshape(2, 3)
    for codec in ("raw", "zstd", "int8", "json"):
        decoded = decode(encode(array, codec))
        assert decoded.dtype == np.dtype("=i4") and np.array_equal(decoded, array)
    floats = np.linspace(-1, 1, 64, dtype=">f8")
    assert np.array_equal(decode(encode(floats, "fp16")), floats.astype(np.float16).astype(np.float64))


def test_decode_accepts_memoryviews_of_any_format():
    frame = encode(np.arange(5, dtype=np.int16), "zstd")
    assert np.array_equal(decode(memoryview(frame)), np.arange(5))
    padded = np.frombuffer(b"\0\0\0\0" + frame + b"\0" * (-len(frame) % 4), np.uint8)
    unaligned = memoryview(padded)[4 : 4 + len(frame)]
    assert np.array_equal(decode(unaligned), np.arange(5))


def test_frames_record_the_codec_actually_applied():
    assert inspect_frame(encode(np.arange(100), "int8+zstd")).codec == "zstd"  # integers stay exact
    assert inspect_frame(encode(np.ones(100, np.float16), "fp16")).codec == "raw"  # no cast to itself
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)
    assert inspect_frame(encode(noise, "zstd")).codec == "raw"  # zstd dropped: it did not shrink the bytes
    header = inspect_frame(encode(torch.ones(2, 3, dtype=torch.bfloat16), "int8"))
    assert (header.codec, header.dtype.name, header.shape, header.torch, header.block_size) == (
        "int8", "bfloat16", (2, 3), True, SHIPPED.int8_block_size)


def test_lossy_codecs_refuse_values_they_cannot_carry():
    with pytest.raises(CodecRangeError, match="fp16: values beyond"):
        encode(torch.tensor([1.0, 70000.0]), "fp16")
    with pytest.raises(CodecRangeError, match="int8 cannot carry"):
        encode(np.array([1.0, np.nan], np.float32), "int8+zstd")
    with pytest.raises(CodecRangeError):
        encode(np.array([1e300]), "bf16")
    infinite = torch.tensor([1.0, float("inf")])  # already infinite: the cast keeps it, nothing is lost
    assert torch.equal(decode(encode(infinite, "fp16")), infinite)


def test_bad_inputs_raise_codec_errors_with_one_line_messages():
    cases = [
        (lambda: encode([1.0, 2.0]), UnsupportedTensorError, "cannot encode a builtins.list"),
        (lambda: encode(np.array(["a"])), UnsupportedTensorError, "array dtype <U1"),
        (lambda: encode(torch.zeros(2, dtype=torch.float8_e4m3fn)), UnsupportedTensorError, "float8_e4m3fn"),
        (lambda: encode(torch.zeros(2).to_sparse()), UnsupportedTensorError, "only dense tensors"),
        (lambda: encode(torch.zeros(2), "int4"), UnknownCodecError, "codec 'int4': not a codec"),
        (lambda: encode(torch.zeros(2), "int8", int8_block_size=0), CodecUsageError, "int8 block size 0"),
        (lambda: encode(torch.zeros(2), "zstd", zstd_level=99), CodecUsageError, "zstd level 99"),
        (lambda: decode("text"), CodecUsageError, "cannot decode a str"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message) as caught:
            call()
        assert isinstance(caught.value, (CodecError, OrionError)) and "\n" not in str(caught.value)
    assert UnknownCodecError.exit_code == EXIT_USAGE


def test_auto_policy_sends_small_tensors_raw_and_large_ones_with_the_link_codec():
    assert choose_codec(100, "int8+zstd") == "raw"
    assert choose_codec(SHIPPED.auto_threshold_bytes - 1, "fp16") == "raw"
    assert choose_codec(SHIPPED.auto_threshold_bytes, "fp16") == "fp16"
    assert choose_codec(10**6, "int8+zstd", threshold_bytes=2 * 10**6) == "raw"
    assert choose_codec(10**6, "auto") == "zstd"  # the user asked for nothing lossy
    assert not any(is_lossy(choose_codec(n, "auto")) for n in (0, 10, 10**3, 10**9))
    with pytest.raises(UnknownCodecError, match="link codec 'fastest'"):
        choose_codec(10, "fastest")

    small, large = activation(1, 64), activation(16, 4096)
    assert inspect_frame(encode(small, "auto")).codec == "raw"
    assert inspect_frame(encode(large, "auto")).codec == "zstd"
    policy = CodecPolicy("int8+zstd", threshold_bytes=1024, int8_block_size=64)
    assert inspect_frame(encode(small, policy)).codec == "raw"
    header = inspect_frame(encode(large, policy))
    assert (header.codec, header.block_size) == ("int8+zstd", 64)


def test_policy_comes_from_the_config(tmp_path):
    path = tmp_path / "link.yaml"
    path.write_text("serve:\n  activation_codec: bf16+zstd\ncodec:\n  auto_threshold_bytes: 4096\n")
    config = load_config(path, environ={"ORION_CODEC_INT8_BLOCK_SIZE": "128"})
    policy = CodecPolicy.from_settings(config.serve.activation_codec, config.codec)
    assert policy == CodecPolicy("bf16+zstd", threshold_bytes=4096, int8_block_size=128, zstd_level=1)
    assert policy.choose(4095) == "raw" and policy.choose(4096) == "bf16+zstd"
    with pytest.raises(UnknownCodecError):
        CodecPolicy("zip")


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_carries_a_large_activation(codec):
    x = activation(64, 1024, seed=3).to(torch.bfloat16)[:, ::2]  # non-contiguous bf16, 32k elements
    decoded = decode(encode(x, codec))
    assert decoded.dtype == torch.bfloat16 and decoded.shape == x.shape
    # bf16 -> bf16 is exact; bf16 -> fp16 loses only values below fp16's normal range
    tolerance = {"int8": 0.02, "fp16": 1e-4}.get(codec.split("+")[0], 0.0)
    error = ((decoded.float() - x.float()).norm() / x.float().norm()).item()
    assert error <= tolerance
    assert prod(x.shape) == decoded.numel()


@pytest.mark.parametrize("codec", ["raw", "zstd", "json"])
def test_hidden_states_between_two_stages_reproduce_generate_exactly(tiny_llama, codec):
    """The benchmark's two-stage pipeline with an exact codec on the link gives model.generate's tokens."""
    import sys

    from transformers import AutoModelForCausalLM

    from conftest import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from bench_codec import TwoStagePipeline

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompt = torch.tensor([5, 17, 42, 7, 99, 3])
    with torch.inference_mode():
        expected = model.generate(prompt[None], attention_mask=torch.ones(1, 6, dtype=torch.long), max_new_tokens=8,
                                  min_new_tokens=8, do_sample=False)[0, 6:].tolist()
        tokens, _, wire, raw = TwoStagePipeline(model).run(prompt, 8, codec)
    assert tokens == expected
    assert wire > 0 and raw == (6 + 7) * model.config.hidden_size * 4
