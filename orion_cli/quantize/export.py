"""The fp32 ONNX export, with past key values, by optimum.

With low_cpu_mem the export runs in a child process (python -m
orion_cli.quantize.export) and writes its weights as external data: the
PyTorch model and the exporter's buffers live and die in that process, and
everything after it reads single tensors from the external data file instead
of loading the whole graph.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..errors import OrionError, UnsupportedModelError
from ..modeldir import ModelDir

TASK = "text-generation-with-past"
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx_data"
CHILD_ERROR_PREFIX = "orion-export-error: "  # optimum's name, which ORTModelForCausalLM looks for
# model_type values exported, quantized and run through ORTModelForCausalLM.generate in the tests.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "phi3", "gpt2")


class ExportError(OrionError):
    """optimum could not export the model to ONNX."""


def check_supported(model: ModelDir, flag: str = "--model") -> None:
    """Refuse, before any work, what the quantizer does not handle."""
    if model.format == "onnx":
        raise UnsupportedModelError(
            f"{flag} {model.root}: already an ONNX model; orion quantize takes a Hugging Face checkpoint "
            "(*.safetensors or pytorch_model.bin)"
        )
    model_type = model.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        name = model.architecture or model_type or "unknown"
        raise UnsupportedModelError(
            f"{flag} {model.root}: architecture {name} (model_type {model_type!r}) is not supported; "
            f"orion quantize handles {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def export_onnx(model_dir: Path, output: Path, low_cpu_mem: bool = False, config: dict | None = None) -> Path:
    """Export `model_dir` into `output`; return the path of the fp32 model.onnx."""
    output.mkdir(parents=True, exist_ok=True)
    if low_cpu_mem:
        _export_in_child(model_dir, output)
    else:
        _export(model_dir, output, external_data=False)
    model_file = output / MODEL_FILE
    if not model_file.is_file():
        raise ExportError(f"--model {model_dir}: optimum wrote no {MODEL_FILE} into {output}")
    if _optimum_misjudges_cache_heads(config or {}):
        import onnx

        from .graph import symbolic_cache_heads

        graph = onnx.load(str(model_file), load_external_data=False)
        if symbolic_cache_heads(graph):
            onnx.save_model(graph, str(model_file))
    return model_file


def _optimum_misjudges_cache_heads(config: dict) -> bool:
    """Phi-3 with grouped-query attention (Phi-3-medium): see graph.symbolic_cache_heads."""
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    return config.get("model_type") == "phi3" and kv_heads is not None and kv_heads != heads


def _export(model_dir: Path, output: Path, external_data: bool) -> None:
    from optimum.exporters.onnx import main_export

    if external_data:
        os.environ["FORCE_ONNX_EXTERNAL_DATA"] = "1"  # read by optimum's exporter; only ever set in the child
    try:
        main_export(
            str(model_dir), output=str(output), task=TASK, framework="pt", library_name="transformers",
            local_files_only=True, do_validation=False,
        )
    except OrionError:
        raise
    except Exception as exc:  # optimum and torch raise anything; the message is what the user can act on
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"--model {model_dir}: ONNX export failed: {first}") from exc


def _export_in_child(model_dir: Path, output: Path) -> None:
    command = [sys.executable, "-m", "orion_cli.quantize.export", str(model_dir), str(output)]
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "FORCE_ONNX_EXTERNAL_DATA": "1"})
    if completed.returncode != 0:
        lines = [line for line in completed.stderr.splitlines() if line.strip()]
        message = lines[-1] if lines else f"exit code {completed.returncode}"
        if message.startswith(CHILD_ERROR_PREFIX):
            raise ExportError(message[len(CHILD_ERROR_PREFIX):])
        raise ExportError(f"--model {model_dir}: ONNX export failed in its child process: {message}")


def main(argv: list[str] | None = None) -> int:
    """The child process of a low-memory export: python -m orion_cli.quantize.export MODEL_DIR OUTPUT."""
    model_dir, output = (argv if argv is not None else sys.argv[1:])
    try:
        _export(Path(model_dir), Path(output), external_data=True)
    except ExportError as exc:
        print(f"{CHILD_ERROR_PREFIX}{exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
