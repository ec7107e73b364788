"""Weight files checked before any command uses them, from their headers and sizes alone.

A safetensors file must have a header that parses, every tensor's byte range
must match its dtype and shape and lie inside the file; a PyTorch zip
checkpoint must have an intact central directory; an ONNX model must parse and
every external-data tensor it names must be present and long enough. Nothing
here reads tensor data, so the check costs milliseconds whatever the model's
size, and a truncated, empty or foreign file is named before any work starts.
"""

from __future__ import annotations

import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelDirError

# safetensors dtype names -> bytes per element
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lies in a safetensors file, read from its header alone."""

    name: str
    file: Path
    dtype: str  # safetensors dtype name, e.g. "F32"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensors (in the order their bytes lie in the file) and the header's __metadata__.

    Raises ModelDirError naming the file when the header does not parse.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ValueError("the file is empty" if not prefix else f"the file has only {len(prefix)} bytes")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise ValueError(f"its first 8 bytes announce a {length}-byte header in a {size}-byte file")
            header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        base = 8 + length
        metadata = header.pop("__metadata__", None) or {}
        tensors = [
            TensorInfo(name, path, info["dtype"], tuple(int(d) for d in info["shape"]),
                       base + int(info["data_offsets"][0]), base + int(info["data_offsets"][1]))
            for name, info in header.items()
        ]
    except OSError as exc:
        raise ModelDirError(f"{path}: cannot read it ({exc.strerror})") from None
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        reason = "the header is not JSON" if isinstance(exc, json.JSONDecodeError) else str(exc) or type(exc).__name__
        raise ModelDirError(f"{path}: not a safetensors file ({reason})") from None
    tensors.sort(key=lambda t: t.start)
    return {t.name: t for t in tensors}, metadata


def check_safetensors_file(path: Path) -> dict[str, TensorInfo]:
    """The file's tensors, once every byte range is known to match its dtype and shape and to lie inside the file."""
    infos, _ = read_safetensors_header(path)
    size = Path(path).stat().st_size
    for info in infos.values():
        width = DTYPE_SIZES.get(info.dtype)
        count = 1
        for dim in info.shape:
            count *= dim
        if width is not None and count * width != info.nbytes:
            raise ModelDirError(f"{path}: tensor {info.name} has {info.nbytes} bytes for shape "
                                f"{list(info.shape)} of {info.dtype}")
        if info.start > info.end or info.end > size:
            raise ModelDirError(f"{path}: tensor {info.name} ends at byte {info.end} but the file has {size}; "
                                "truncated?")
    return infos


def check_pytorch_file(path: Path) -> None:
    """A torch.save zip archive must open (its central directory lies at the end, so truncation shows)."""
    size = Path(path).stat().st_size
    if size == 0:
        raise ModelDirError(f"{path}: the file is empty")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            if handle.read(2) != b"\x80\x02":  # torch's legacy (pre-1.6) format is a pickle stream
                raise ModelDirError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if member.header_offset + member.compress_size > size:
                    raise ModelDirError(f"{path}: member {member.filename} runs past the end of the file; truncated?")
    except zipfile.BadZipFile as exc:
        raise ModelDirError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None


def check_onnx_file(path: Path) -> None:
    """The graph parses and each external-data tensor lies inside its file."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others
        raise ModelDirError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    sizes: dict[str, int] = {}
    for tensor in _initializers(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = Path(path).parent / info.get("location", "")
        if location.name not in sizes:
            if not location.is_file():
                raise ModelDirError(f"{path}: tensor {tensor.name} is stored in {location.name}, which is missing")
            sizes[location.name] = location.stat().st_size
        offset, length = int(info.get("offset", 0)), info.get("length")
        if length is not None and offset + int(length) > sizes[location.name]:
            raise ModelDirError(f"{location}: tensor {tensor.name} ends at byte {offset + int(length)} but the file "
                                f"has {sizes[location.name]}; truncated?")


def _initializers(graph):
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.g.ByteSize():
                yield from _initializers(attribute.g)


def check_weight_files(files: list[Path]) -> None:
    """Check every weight file of a model directory by its kind; raises ModelDirError naming the first bad one."""
    for file in files:
        name = file.name
        if name.endswith(".safetensors"):
            check_safetensors_file(file)
        elif name.endswith(".bin"):
            check_pytorch_file(file)
        elif name.endswith(".onnx"):
            check_onnx_file(file)
