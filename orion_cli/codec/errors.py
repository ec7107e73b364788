"""The codec's errors: every way encoding or decoding a frame can fail.

Decoding never returns numbers it cannot vouch for: a frame that is short,
damaged, from another program or from a newer orion raises one of these, each
a CodecError (and so an OrionError) with a one-line message.
"""

from __future__ import annotations

from ..errors import EXIT_USAGE, OrionError


class CodecError(OrionError):
    """A tensor that cannot be encoded, or a frame that cannot be decoded."""


class TruncatedFrameError(CodecError):
    """The frame (or chunk stream) ends before the length its header promises."""


class CorruptFrameError(CodecError):
    """A checksum does not match, or header fields contradict each other."""


class ForeignFrameError(CodecError):
    """The bytes do not start with the orion frame magic: not a frame at all."""


class UnsupportedVersionError(CodecError):
    """An intact frame written by a newer frame format than this orion reads."""


class CodecUsageError(CodecError):
    """A codec setting that is not valid (block size, zstd level, chunk size)."""

    exit_code = EXIT_USAGE


class UnknownCodecError(CodecUsageError):
    """A codec name that is not one of CODECS (or 'auto')."""


class UnsupportedTensorError(CodecError):
    """An object or dtype the codec does not carry (lists, strings, sparse tensors, float8)."""


class CodecRangeError(CodecError):
    """Values a lossy codec cannot represent: fp16 overflow, NaN or infinity under int8."""
