"""Truncated, damaged, foreign, forged or newer frames: specific CodecErrors, never wrong numbers."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orion_cli.codec import (CODECS, MAGIC, CodecError, CorruptFrameError, ForeignFrameError, TruncatedFrameError,
                             UnsupportedVersionError, decode, encode, encode_chunks, frame_length, inspect_frame)

from test_codec import activation, assert_bit_exact

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _samples():
    tensors = [activation(2, 96), np.arange(-20, 20, dtype=np.int64).reshape(4, 10), torch.tensor(True),
               torch.zeros(0, 3, dtype=torch.bfloat16), np.linspace(-3, 3, 50, dtype=np.float16)]
    return [(encode(t, codec), t) for t in tensors for codec in CODECS]


SAMPLES = _samples()


def _rewrite_header(frame: bytes, **fields) -> bytes:
    """A copy of `frame` with header bytes replaced and the header CRC recomputed, as a forger would."""
    data = bytearray(frame)
    length = int.from_bytes(data[6:8], "little")
    for offset, value in fields.values():
        data[offset : offset + len(value)] = value
    data[length - 4 : length] = struct.pack("<I", zlib.crc32(data[: length - 4]))
    return bytes(data)


def test_every_truncation_is_reported_as_truncated():
    for frame, _ in SAMPLES[::3]:
        for length in range(len(frame)):
            with pytest.raises(TruncatedFrameError):
                decode(frame[:length])


def test_every_single_bit_flip_is_caught():
    frame = encode(activation(1, 64), "int8+zstd")
    header_length = inspect_frame(frame).header_nbytes
    for position in range(len(frame)):
        for bit in (0, 3, 7):
            damaged = bytearray(frame)
            damaged[position] ^= 1 << bit
            expected = (ForeignFrameError if position < 4 else
                        (CorruptFrameError, TruncatedFrameError) if position in (6, 7) else CorruptFrameError)
            with pytest.raises(expected):
                decode(bytes(damaged))
            if position >= header_length:
                with pytest.raises(CorruptFrameError, match="payload checksum mismatch"):
                    decode(bytes(damaged))


@pytest.mark.parametrize("foreign", [
    b"", b"{\"data\": [1.0, 2.0], \"shape\": [2]}", b"\x28\xb5\x2f\xfd" + bytes(40),  # JSON, a zstd frame
    b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'}", bytes(range(256)), b"\x89PNG\r\n\x1a\n" + bytes(60),
])
def test_foreign_bytes_are_named_foreign(foreign):
    error = TruncatedFrameError if foreign == b"" else ForeignFrameError
    with pytest.raises(error):
        decode(foreign)


def test_a_newer_format_version_is_refused_by_name():
    frame = _rewrite_header(encode(np.arange(4), "raw"), version=(4, b"\x02"))
    with pytest.raises(UnsupportedVersionError, match="version 2: this orion reads up to version 1"):
        decode(frame)


@pytest.mark.parametrize("field, offset, value, message", [
    ("codec", 8, b"\x0f", "unknown codec byte"),
    ("dtype", 9, b"\x63", "unknown dtype code 99"),
    ("reserved", 11, b"\x01", "reserved byte"),
    ("block size", 12, b"\x05\x00\x00\x00", "block size 5 with codec raw"),
    ("original bytes", 16, struct.pack("<Q", 31), "original size 31 bytes"),
    ("payload bytes", 24, struct.pack("<Q", 8), "stray bytes after its end"),
])
def test_contradictory_fields_behind_a_valid_crc_are_corrupt(field, offset, value, message):
    frame = _rewrite_header(encode(np.arange(4, dtype=np.int64), "raw"), field=(offset, value))
    with pytest.raises(CorruptFrameError, match=message):
        decode(frame)


def test_stray_bytes_after_a_frame_are_refused():
    frame = encode(torch.ones(3), "fp16")
    with pytest.raises(CorruptFrameError, match="1 stray bytes"):
        decode(frame + b"\0")


def test_frame_length_reads_a_frame_off_a_byte_stream():
    frames = [encode(activation(2, 32, seed=i), codec) for i, codec in enumerate(CODECS)]
    stream, decoded = b"".join(frames), []
    while stream:
        size = frame_length(stream[:40])
        decoded.append(decode(stream[:size]))
        stream = stream[size:]
    assert len(decoded) == len(CODECS)
    with pytest.raises(TruncatedFrameError):
        frame_length(frames[0][:20])


def _decodes_only_to_a_sent_tensor(frame: bytes) -> None:
    try:
        decoded = decode(frame)
    except CodecError:
        return
    except Exception as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"decode raised {type(exc).__name__} (not a CodecError): {exc}")
    for candidate, _ in SAMPLES:
        if candidate == frame:  # mutations that changed nothing must give back exactly what was sent
            assert_bit_exact(decode(candidate), decoded)
            return
    pytest.fail("a mutated frame decoded to numbers")


@FUZZ
@given(data=st.data())
def test_mutated_frames_only_ever_raise_codec_errors(data):
    frame, _ = data.draw(st.sampled_from(SAMPLES))
    kind = data.draw(st.sampled_from(["flip", "set", "truncate", "extend", "insert", "delete", "splice"]))
    position = data.draw(st.integers(0, len(frame) - 1))
    mutated = bytearray(frame)
    if kind == "flip":
        mutated[position] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "set":
        mutated[position] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        del mutated[position:]
    elif kind == "extend":
        mutated += data.draw(st.binary(min_size=1, max_size=64))
    elif kind == "insert":
        mutated[position:position] = data.draw(st.binary(min_size=1, max_size=16))
    elif kind == "delete":
        del mutated[position : position + data.draw(st.integers(1, 16))]
    else:  # splice in bytes from another frame
        other, _ = data.draw(st.sampled_from(SAMPLES))
        mutated[position:] = other[position:]
    _decodes_only_to_a_sent_tensor(bytes(mutated))


@FUZZ
@given(noise=st.binary(max_size=600), with_magic=st.booleans())
def test_random_bytes_only_ever_raise_codec_errors(noise, with_magic):
    with pytest.raises(CodecError):
        decode(MAGIC + noise if with_magic else noise)


@FUZZ
@given(
    codec_byte=st.integers(0, 0x3F), dtype_code=st.integers(0, 16), flags=st.integers(0, 3),
    shape=st.lists(st.integers(0, 6), max_size=3), block=st.sampled_from([0, 1, 4, 32]),
    payload=st.binary(max_size=300), honest_size=st.booleans(),
)
def test_forged_frames_with_valid_checksums_raise_codec_errors_or_decode(codec_byte, dtype_code, flags, shape,
                                                                          block, payload, honest_size):
    """Headers with arbitrary fields, CRC and payload checksum right: validation, not checksums, must hold."""
    from orion_cli.codec.dtypes import BY_CODE
    from orion_cli.codec.frame import header_nbytes

    numel = int(np.prod(shape)) if shape else 1
    itemsize = BY_CODE[dtype_code].itemsize if dtype_code in BY_CODE else 1
    original = numel * itemsize if honest_size else len(payload)
    chunked = bool(flags & 2)
    length = header_nbytes(len(shape), chunked)
    body = struct.pack("<4sBBHBBBBIQQQ", MAGIC, 1, flags, length, codec_byte, dtype_code, len(shape), 0, block,
                       original, len(payload), xxhash.xxh3_64_intdigest(payload))
    body += b"".join(struct.pack("<Q", d) for d in shape)
    if chunked:
        body += struct.pack("<QIIQQ", 7, 0, 1, 0, numel)
    body += bytes(length - 4 - len(body))
    frame = body + struct.pack("<I", zlib.crc32(body)) + payload
    try:
        decoded = decode(frame)
    except CodecError:
        return
    assert tuple(decoded.shape) == tuple(shape)
    assert inspect_frame(frame).dtype.code == dtype_code


def test_chunks_fuzzed_like_frames_only_raise_codec_errors():
    from orion_cli.codec import decode_chunks

    chunks = list(encode_chunks(activation(4, 256), "bf16+zstd", chunk_bytes=1024))
    for i in range(len(chunks)):
        for damage in (lambda c: c[:-1], lambda c: c[:10] + bytes([c[10] ^ 1]) + c[11:]):
            broken = chunks[:i] + [damage(chunks[i])] + chunks[i + 1 :]
            with pytest.raises(CodecError):
                decode_chunks(broken)
