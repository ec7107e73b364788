"""Chunked frames: large tensors in bounded pieces, and every way a chunk stream can go wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orion_cli.codec import (CODECS, CodecMetrics, CodecUsageError, CorruptFrameError, StreamDecoder,
                             TruncatedFrameError, UnknownCodecError, decode, decode_chunks, encode, encode_chunks,
                             inspect_frame)

from test_codec import activation, as_numpy, assert_bit_exact, assert_same_values, tensors


@settings(max_examples=80, deadline=None)
@given(tensor=tensors(), codec=st.sampled_from(["raw", "zstd", "json"]), chunk_bytes=st.integers(1, 64))
def test_exact_chunk_streams_round_trip_bit_for_bit(tensor, codec, chunk_bytes):
    frames = list(encode_chunks(tensor, codec, chunk_bytes))
    array = as_numpy(tensor)
    per_chunk = max(1, chunk_bytes // array.itemsize)
    assert len(frames) == max(1, -(-array.size // per_chunk))
    decoded = decode_chunks(frames)
    (assert_same_values if codec == "json" else assert_bit_exact)(tensor, decoded)


@pytest.mark.parametrize("codec", [c for c in CODECS if c not in ("raw", "zstd", "json")])
def test_lossy_chunk_streams_give_the_same_numbers_as_one_frame(codec):
    x = activation(8, 1000)  # 8000 elements: the last int8 block and the last chunk are partial
    whole = decode(encode(x, codec))
    streamed = decode_chunks(encode_chunks(x, codec, chunk_bytes=3000))
    assert torch.equal(streamed, whole)


def test_non_contiguous_tensors_are_chunked_without_copying_them_whole():
    base = torch.arange(6 * 7 * 8, dtype=torch.float64).reshape(6, 7, 8)
    for view in (base.permute(2, 0, 1), base[:, ::2, 1::3], base.transpose(0, 1)[1:]):
        for chunk_bytes in (8, 24, 80, 1000, 10**6):
            assert torch.equal(decode_chunks(encode_chunks(view, "raw", chunk_bytes)), view)
    array = np.arange(5 * 9, dtype=np.int32).reshape(5, 9).T[::2]
    assert np.array_equal(decode_chunks(encode_chunks(array, "zstd", 12)), array)


def test_chunks_are_encoded_as_they_are_consumed():
    metrics = CodecMetrics()
    frames = encode_chunks(np.zeros(1000, np.float32), "raw", 400, metrics=metrics)
    assert metrics.snapshot()["total"]["encode"]["frames"] == 0
    first = next(frames)
    assert metrics.snapshot()["total"]["encode"]["frames"] == 1
    header = inspect_frame(first)
    assert (header.chunk.index, header.chunk.count, header.element_count, header.shape) == (0, 10, 100, (1000,))
    with pytest.raises(UnknownCodecError):  # arguments fail at the call, not at the first next()
        encode_chunks(np.zeros(3), "gzip")
    with pytest.raises(CodecUsageError, match="chunk_bytes 0"):
        encode_chunks(np.zeros(3), "raw", 0)


def _stream(n_chunks: int = 4):
    x = torch.arange(n_chunks * 10, dtype=torch.float32)
    return x, list(encode_chunks(x, "zstd", chunk_bytes=40))


@pytest.mark.parametrize("mangle, error, message", [
    (lambda c, o: c[:-1], TruncatedFrameError, "ended after 3 of 4 chunks"),
    (lambda c, o: [], TruncatedFrameError, "ended after 0 of"),
    (lambda c, o: c[1:], CorruptFrameError, "starts with chunk 2/4"),
    (lambda c, o: [c[0], c[2], c[1], c[3]], CorruptFrameError, "missing, repeated or reordered"),
    (lambda c, o: [c[0], c[1], c[1], c[2], c[3]], CorruptFrameError, "missing, repeated or reordered"),
    (lambda c, o: [c[0], o[1], c[2], c[3]], CorruptFrameError, "belongs to another stream"),
    (lambda c, o: c + [c[3]], CorruptFrameError, "after the last chunk"),
    (lambda c, o: [encode(torch.zeros(3))], CorruptFrameError, "a whole frame, not a chunk"),
])
def test_broken_streams_raise_specific_errors(mangle, error, message):
    _, chunks = _stream()
    _, other = _stream()
    with pytest.raises(error, match=message):
        decode_chunks(mangle(chunks, other))


def test_decode_refuses_a_lone_chunk_but_takes_a_one_chunk_stream():
    _, chunks = _stream()
    with pytest.raises(CodecUsageError, match="one chunk of a stream"):
        decode(chunks[1])
    (only,) = encode_chunks(torch.ones(5), "raw", 10**6)
    assert torch.equal(decode(only), torch.ones(5))


def test_stream_decoder_fills_one_output_tensor():
    x, chunks = _stream(6)
    decoder = StreamDecoder()
    for chunk in chunks:
        assert not decoder.done
        decoder.feed(memoryview(chunk))
    assert decoder.done
    result = decoder.result()
    assert torch.equal(result, x) and result.is_contiguous()
    result[0] = 99.0  # the caller owns a writable tensor
