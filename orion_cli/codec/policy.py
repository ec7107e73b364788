"""Codec names and the `auto` policy: raw for small tensors, the link's codec for the rest.

Below the threshold a frame is dominated by fixed costs (header, zstd context,
Python calls), so compression costs more time than the bytes it saves; the
users' serialization guide draws the line at 1 KB. Lossy codecs are used only
when the link is configured with one: `auto` on its own means exact (zstd).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import CodecSettings, LinkCodec, choices, shipped_config
from .errors import CodecUsageError, UnknownCodecError

LINK_CODECS = choices(LinkCodec)  # declared once, in config.py
CODECS = tuple(name for name in LINK_CODECS if name != "auto")
EXACT_CODECS = ("raw", "zstd", "json")
LOSSY_CODECS = tuple(name for name in CODECS if name not in EXACT_CODECS)


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


def defaults() -> CodecSettings:
    """The codec settings of configs/default.yaml: what every argument left out means."""
    return shipped_config().codec


def choose_codec(nbytes: int, link_codec: str, threshold_bytes: int | None = None) -> str:
    """The codec `auto` sends a tensor of `nbytes` raw bytes with, on a link configured with `link_codec`.

    raw below `threshold_bytes`; above it the link's codec, where 'auto' (no codec
    chosen by the user) means zstd, so lossy codecs appear only when asked for.
    """
    check_codec(link_codec, LINK_CODECS, "link codec")
    threshold = defaults().auto_threshold_bytes if threshold_bytes is None else threshold_bytes
    if nbytes < threshold:
        return "raw"
    return "zstd" if link_codec == "auto" else link_codec


@dataclass(frozen=True)
class CodecPolicy:
    """A link's codec settings; pass one to encode() as `codec` to apply the auto policy with them.

    Settings left None take configs/default.yaml's `codec:` values.
    """

    link_codec: str = "auto"
    threshold_bytes: int | None = None
    int8_block_size: int | None = None
    zstd_level: int | None = None

    def __post_init__(self) -> None:
        check_codec(self.link_codec, LINK_CODECS, "link codec")
        shipped = defaults()
        for name, default in (("threshold_bytes", shipped.auto_threshold_bytes),
                              ("int8_block_size", shipped.int8_block_size), ("zstd_level", shipped.zstd_level)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        check_settings(self.int8_block_size, self.zstd_level)

    def choose(self, nbytes: int) -> str:
        return choose_codec(nbytes, self.link_codec, self.threshold_bytes)

    @classmethod
    def from_settings(cls, link_codec: str, settings: CodecSettings) -> CodecPolicy:
        """The policy of a serve link: its codec (serve.activation_codec) and the `codec:` section."""
        return cls(link_codec=link_codec, threshold_bytes=settings.auto_threshold_bytes,
                   int8_block_size=settings.int8_block_size, zstd_level=settings.zstd_level)


MAX_INT8_BLOCK_SIZE = 2**20
MAX_ZSTD_LEVEL = 22


def check_settings(int8_block_size: int, zstd_level: int) -> None:
    if not (isinstance(int8_block_size, int) and 1 <= int8_block_size <= MAX_INT8_BLOCK_SIZE):
        raise CodecUsageError(f"int8 block size {int8_block_size!r}: "
                              f"must be an integer from 1 to {MAX_INT8_BLOCK_SIZE}")
    if not (isinstance(zstd_level, int) and 1 <= zstd_level <= MAX_ZSTD_LEVEL):
        raise CodecUsageError(f"zstd level {zstd_level!r}: must be an integer from 1 to {MAX_ZSTD_LEVEL}")
