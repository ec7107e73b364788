"""Read a checkpoint's tensors one at a time, whatever its layout.

A model directory may hold a single model.safetensors, a Hugging Face sharded
checkpoint (model.safetensors.index.json), an orion sharded directory
(shard_manifest.json), or pytorch_model*.bin files. CheckpointReader hides the
difference: tensors come through safetensors' memory map (or torch.load with
weights_only=True and mmap for .bin files, which never unpickles arbitrary
objects), so reading one tensor, or one slice of it, costs that tensor's bytes
and not the model's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from .errors import ModelDirError
from .modeldir import MANIFEST_FILE
from .weights import TensorInfo, read_safetensors_header

HF_INDEX_FILE = "model.safetensors.index.json"


class _TensorSlice:
    """A loaded tensor behind the interface of safetensors' lazy slice."""

    def __init__(self, tensor):
        self._tensor = tensor

    def get_shape(self) -> list[int]:
        return list(self._tensor.shape)

    def __getitem__(self, index):
        return self._tensor[index]


class CheckpointReader:
    """Tensors of a model directory, by name, read lazily."""

    def __init__(self, model_dir: str | Path, flag: str = "--model"):
        self.model_dir = Path(model_dir)
        self.flag = flag
        self.files = self._weight_files()
        self._location: dict[str, Path] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._bin_state: dict[Path, dict[str, Any]] = {}
        self._handles: dict[Path, Any] = {}
        for file in self.files:
            if file.suffix == ".safetensors":
                infos, _ = read_safetensors_header(file)
                self._infos.update(infos)
                names = list(infos)
            else:
                names = list(self._load_bin(file))
            for name in names:
                self._location.setdefault(name, file)

    def _weight_files(self) -> list[Path]:
        directory = self.model_dir
        manifest = directory / MANIFEST_FILE
        if manifest.is_file():
            shards = json.loads(manifest.read_text()).get("shards", [])
            files = [directory / s["file"] for s in shards if str(s.get("file", "")).endswith(".safetensors")]
            if files:
                return self._existing(files, MANIFEST_FILE)
        index = directory / HF_INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            return self._existing(sorted({directory / f for f in weight_map.values()}), HF_INDEX_FILE)
        files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
        if not files:
            raise ModelDirError(f"{self.flag} {directory}: no *.safetensors or pytorch_model*.bin weights")
        return files

    def _existing(self, files: list[Path], listed_in: str) -> list[Path]:
        for file in files:
            if not file.is_file():
                raise ModelDirError(f"{self.flag} {self.model_dir}: {file.name}, listed in {listed_in}, is missing")
        return files

    def _load_bin(self, file: Path) -> dict[str, Any]:
        if file not in self._bin_state:
            import torch

            try:
                self._bin_state[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ...
                raise ModelDirError(f"{file}: cannot be read as a weights-only PyTorch checkpoint ({exc})") from None
        return self._bin_state[file]

    # -- queries ---------------------------------------------------------------

    def names(self) -> list[str]:
        """Tensor names, file by file, in the order their bytes are stored."""
        return list(self._location)

    def __contains__(self, name: str) -> bool:
        return name in self._location

    def __len__(self) -> int:
        return len(self._location)

    def info(self, name: str) -> TensorInfo | None:
        """Header facts of a safetensors tensor (None for .bin checkpoints)."""
        return self._infos.get(name)

    def file_of(self, name: str) -> Path:
        return self._location[name]

    def get_slice(self, name: str):
        """A lazy view: .get_shape(), and indexing reads only the bytes of the slice asked for."""
        file = self._location[name]
        if file.suffix == ".safetensors":
            return self._handle(file).get_slice(name)
        return _TensorSlice(self._load_bin(file)[name])

    def get_tensor(self, name: str):
        file = self._location[name]
        if file.suffix == ".safetensors":
            return self._handle(file).get_tensor(name)
        return self._load_bin(file)[name]

    def iter_tensors(self) -> Iterator[tuple[str, Any]]:
        for name in self.names():
            yield name, self.get_tensor(name)

    def _handle(self, file: Path):
        if file not in self._handles:
            from safetensors import safe_open

            self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        return self._handles[file]

    def close(self) -> None:
        self._handles.clear()
        self._bin_state.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
