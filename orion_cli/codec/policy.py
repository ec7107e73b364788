"""Codec names and the `auto` policy: raw for small tensors, the link's codec for the rest.

Below the threshold a frame is dominated by fixed costs (header, zstd context,
Python calls), so compression costs more time than the bytes it saves; the
users' serialization guide draws the line at 1 KB. Lossy codecs are used only
when the link is configured with one: `auto` on its own means exact (zstd).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import CodecUsageError, UnknownCodecError

if TYPE_CHECKING:
    from ..config import OrionConfig

EXACT_CODECS = ("raw", "zstd", "json")
LOSSY_CODECS = ("fp16", "bf16", "int8", "fp16+zstd", "bf16+zstd", "int8+zstd")
CODECS = ("raw", "zstd", "fp16", "bf16", "int8", "fp16+zstd", "bf16+zstd", "int8+zstd", "json")
LINK_CODECS = CODECS + ("auto",)

# Library defaults; configs/default.yaml's `codec:` section holds the same values
# (a test keeps them equal) and is what `orion serve` passes in.
DEFAULT_AUTO_THRESHOLD_BYTES = 1024
DEFAULT_INT8_BLOCK_SIZE = 32
DEFAULT_ZSTD_LEVEL = 1
DEFAULT_STREAM_CHUNK_BYTES = 4 * 2**20


def check_codec(name: str, allowed: tuple[str, ...] = CODECS, what: str = "codec") -> str:
    if name not in allowed:
        raise UnknownCodecError(f"{what} {name!r}: not a codec; choose one of {', '.join(allowed)}")
    return name


def is_lossy(codec: str) -> bool:
    return check_codec(codec, LINK_CODECS) in LOSSY_CODECS


def split_codec(name: str) -> tuple[str, bool]:
    """'int8+zstd' -> ('int8', True); 'zstd' -> ('raw', True); 'fp16' -> ('fp16', False)."""
    check_codec(name)
    if name == "zstd":
        return "raw", True
    transform, _, stage = name.partition("+")
    return transform, stage == "zstd"


def choose_codec(nbytes: int, link_codec: str, threshold_bytes: int = DEFAULT_AUTO_THRESHOLD_BYTES) -> str:
    """The codec `auto` sends a tensor of `nbytes` raw bytes with, on a link configured with `link_codec`.

    raw below `threshold_bytes`; above it the link's codec, where 'auto' (no codec
    chosen by the user) means zstd, so lossy codecs appear only when asked for.
    """
    check_codec(link_codec, LINK_CODECS, "link codec")
    if nbytes < threshold_bytes:
        return "raw"
    return "zstd" if link_codec == "auto" else link_codec


@dataclass(frozen=True)
class CodecPolicy:
    """A link's codec settings; pass one to encode() as `codec` to apply the auto policy with them."""

    link_codec: str = "auto"
    threshold_bytes: int = DEFAULT_AUTO_THRESHOLD_BYTES
    int8_block_size: int = DEFAULT_INT8_BLOCK_SIZE
    zstd_level: int = DEFAULT_ZSTD_LEVEL

    def __post_init__(self) -> None:
        check_codec(self.link_codec, LINK_CODECS, "link codec")
        check_settings(self.int8_block_size, self.zstd_level)

    def choose(self, nbytes: int) -> str:
        return choose_codec(nbytes, self.link_codec, self.threshold_bytes)

    @classmethod
    def from_config(cls, config: OrionConfig, link_codec: str | None = None) -> CodecPolicy:
        """The policy of a serve link: its codec (default serve.activation_codec) and the `codec:` section."""
        return cls(
            link_codec=link_codec or config.serve.activation_codec,
            threshold_bytes=config.codec.auto_threshold_bytes,
            int8_block_size=config.codec.int8_block_size,
            zstd_level=config.codec.zstd_level,
        )


MAX_INT8_BLOCK_SIZE = 2**20
MAX_ZSTD_LEVEL = 22


def check_settings(int8_block_size: int, zstd_level: int) -> None:
    if not (isinstance(int8_block_size, int) and 1 <= int8_block_size <= MAX_INT8_BLOCK_SIZE):
        raise CodecUsageError(f"int8 block size {int8_block_size!r}: "
                              f"must be an integer from 1 to {MAX_INT8_BLOCK_SIZE}")
    if not (isinstance(zstd_level, int) and 1 <= zstd_level <= MAX_ZSTD_LEVEL):
        raise CodecUsageError(f"zstd level {zstd_level!r}: must be an integer from 1 to {MAX_ZSTD_LEVEL}")
