"""orion: prepare large language models (quantize, merge, shard, register) and serve them."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("orion-cli")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
