"""The activation transfer codec: tensors to self-describing, checksummed frames and back.

    from orion_cli.codec import encode, decode
    frame = encode(hidden_states, "int8+zstd")
    hidden_states = decode(frame)

Codecs: raw and zstd (exact), fp16 and bf16 (casts), int8 (blockwise absmax),
each cast or int8 optionally followed by zstd, json (debugging only). `auto` and
CodecPolicy pick raw for small tensors and the link's codec otherwise.
encode_chunks()/StreamDecoder stream large tensors in bounded memory; the
pipeline-stage link sends hidden states above codec.stream_chunk_bytes that way.
Frame layout and choices: docs/codec.md.
"""

from .core import decode, encode, inspect_frame
from .errors import (CodecError, CodecRangeError, CodecUsageError, CorruptFrameError, ForeignFrameError,
                     TruncatedFrameError, UnknownCodecError, UnsupportedTensorError, UnsupportedVersionError)
from .frame import FIXED_HEADER_BYTES, MAGIC, VERSION, FrameHeader, frame_length
from .metrics import METRICS, CodecMetrics, CodecMetricsCollector
from .policy import CODECS, EXACT_CODECS, LINK_CODECS, LOSSY_CODECS, CodecPolicy, choose_codec, is_lossy
from .stream import StreamDecoder, decode_chunks, encode_chunks

__all__ = [
    "CODECS", "EXACT_CODECS", "LOSSY_CODECS", "LINK_CODECS",
    "FIXED_HEADER_BYTES", "MAGIC", "VERSION", "METRICS",
    "CodecError", "CodecRangeError", "CodecUsageError", "CorruptFrameError", "ForeignFrameError",
    "TruncatedFrameError", "UnknownCodecError", "UnsupportedTensorError", "UnsupportedVersionError",
    "CodecMetrics", "CodecMetricsCollector", "CodecPolicy", "FrameHeader", "StreamDecoder",
    "choose_codec", "decode", "decode_chunks", "encode", "encode_chunks", "frame_length", "inspect_frame", "is_lossy",
]
