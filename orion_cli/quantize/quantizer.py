"""quantize_model(): export, quantize, check, evaluate and write OUT atomically.

OUT/quantized/    model.onnx (+ model.onnx_data), config, generation config, tokenizer
OUT/onnx/         the fp32 export, only with keep_intermediate
OUT/metadata.json provenance, the recipe, bits of every tensor, sizes, durations, versions, quality
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np

from ..config import QuantizeSettings, override, shipped_config
from ..errors import ModelDirError, UnsupportedModelError, UsageError
from ..modeldir import copy_support_files, hash_files
from ..producing import Output, producing, recorded_provenance, resolve_source
from ..progress import NULL_PROGRESS, ProgressReporter, Stopwatch
from .blockwise import BlockQuantized, quantize_weight
from .evaluate import OnnxLM, QualityFigures, compare
from .export import EXTERNAL_DATA_FILE, MODEL_FILE, check_supported, export_onnx
from .gptq import quantize_gptq
from .graph import WeightSite, embedding_block_size, find_weight_sites, read_weight, replace_site
from .hessians import iter_hessians, site_inputs
from .levels import ACCURACY_LEVEL, Level, allocate_bits, average_bits, get_level, resolve_methods
from .sensitivity import SensitivityProbe, measure_gains
from .texts import TextPlan, plan_texts

log = logging.getLogger(__name__)

QUANTIZED_DIR = "quantized"
ONNX_DIR = "onnx"
# Quantized weights above this are written as external data (model.onnx_data); protobuf caps a file at 2 GiB.
EXTERNAL_DATA_THRESHOLD = 1 << 30
TOOLS = ("onnxruntime", "onnx", "optimum", "optimum-onnx", "transformers", "torch", "numpy")
COMPLETION_TOKENS = 32


@dataclass
class QuantizeResult:
    output: Path
    model_dir: Path
    metadata: dict[str, Any]
    registered: str | None = None
    completions: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The metadata summary: everything but the per-tensor and per-file lists."""
        summary = {k: v for k, v in self.metadata.items() if k not in ("tensors", "files")}
        return {"output": str(self.output), "model_dir": str(self.model_dir), "registered": self.registered, **summary}


def quantize_model(
    model: str | Path,
    output: str | Path | Output | None = None,
    *,
    settings: QuantizeSettings | None = None,
    test: bool = False,
    progress: ProgressReporter = NULL_PROGRESS,
    **overrides: Any,
) -> QuantizeResult:
    """Quantize a Hugging Face causal LM (directory or registry key) to a weight-only ONNX model in `output`.

    `settings` (default: configs/default.yaml's quantize section) with any of its
    fields given as keyword `overrides` (level="q3", method="rtn", ...). `output`
    (a path, or an Output with --force/--register/--registry) defaults to
    <output_root>/<model directory name>-<level>. Cheap checks (level,
    method, block size, output, registry key, model directory and weights,
    architecture, --eval-text) all happen before the export starts.
    """
    started = time.perf_counter()
    settings = override(settings or shipped_config().quantize, **overrides)
    output = Output.of(output).resolved()
    recipe = get_level(settings.level)
    linear_method, embedding_method = resolve_methods(settings.method)
    block = settings.block_size or recipe.block_size
    source = resolve_source("--model", model, output.registry)
    check_supported(source.model)
    eval_path = Path(settings.eval_text) if settings.eval_text else None
    if eval_path is not None and not eval_path.is_file():
        raise UsageError(f"--eval-text {eval_path}: no such file")

    needs_calibration = linear_method == "gptq" or len(recipe.bits) > 1
    tokenizer = _tokenizer(source.path) if (needs_calibration or test) else None
    texts = plan_texts(tokenizer, source.path, eval_path, settings.calibration_tokens if needs_calibration else 0,
                       settings.eval_tokens if test else 0, _window(source.model.config)) \
        if tokenizer is not None else None

    watch = Stopwatch()
    with producing("quantize", [source], output, default_name=f"{source.model.root.absolute().name}-{settings.level}",
                   parameters=settings.model_dump(), extra_inputs=[("--eval-text", eval_path)] if eval_path else [],
                   progress=progress) as out:
        tmp = out.tmp
        with watch.time("export"), progress.stage("Exporting to ONNX (optimum, with past key values)"):
            fp32_path = export_onnx(source.path, tmp / ONNX_DIR, settings.low_cpu_mem, source.model.config)
        quant_dir = tmp / QUANTIZED_DIR
        quant_dir.mkdir()
        job = _QuantizeJob(fp32_path, source.model.config or {}, recipe, block, linear_method, embedding_method,
                           texts, watch, progress)
        graph, tensors, allocation = job.run()
        external = settings.low_cpu_mem or sum(t["bytes"] for t in tensors) > EXTERNAL_DATA_THRESHOLD
        with watch.time("write"), progress.stage("Writing the quantized model"):
            quant_path = _save(graph, fp32_path.parent, quant_dir, external)
            del graph
            copy_support_files(source.path, quant_dir)
        with watch.time("check"), progress.stage("Checking the quantized model runs in onnxruntime"):
            _smoke_test(quant_path)
        quality, completions = None, {}
        if test:
            quality, completions = _evaluate(fp32_path.parent, quant_dir, tokenizer, texts, settings.prompt, watch,
                                             progress)
        watch.durations["total"] = round(time.perf_counter() - started, 3)
        out.metadata.update(_metadata(
            source=source.model, recipe=recipe, block=block, method=settings.method, linear_method=linear_method,
            embedding_method=embedding_method, tensors=tensors, allocation=allocation, texts=texts,
            fp32_dir=fp32_path.parent, quant_dir=quant_dir, quality=quality, watch=watch,
        ))
        if not settings.keep_intermediate:
            shutil.rmtree(tmp / ONNX_DIR)
    metadata = {"provenance": recorded_provenance(out.output), **out.metadata}
    return QuantizeResult(out.output, out.output / QUANTIZED_DIR, metadata, out.registered, completions)


def _window(config: dict[str, Any] | None) -> int:
    limit = (config or {}).get("max_position_embeddings") or (config or {}).get("n_positions") or 2048
    return int(min(128, limit - 1))


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelDirError(
            f"--model {model_dir}: no usable tokenizer ({str(exc).splitlines()[0]}); calibration and --test need one"
        ) from None


class _QuantizeJob:
    """The fp32 graph's weights, quantized per the level's recipe, swapped into the graph."""

    def __init__(self, fp32_path: Path, config: dict, recipe: Level, block: int, linear_method: str,
                 embedding_method: str, texts: TextPlan | None, watch: Stopwatch, progress: ProgressReporter):
        self.fp32_path = fp32_path
        self.base_dir = fp32_path.parent
        self.config = config
        self.recipe = recipe
        self.block = block
        self.linear_method = linear_method
        self.embedding_method = embedding_method
        self.texts = texts
        self.watch = watch
        self.progress = progress

    def run(self):
        import onnx

        graph = onnx.load(str(self.fp32_path), load_external_data=False)
        sites = find_weight_sites(graph, self.config.get("vocab_size"))
        if not any(s.op != "Gather" for s in sites):
            raise UnsupportedModelError(f"{self.fp32_path}: no linear layer with a constant weight found to quantize")
        with self.watch.time("quantize"):
            candidates = self._candidates(graph, sites)
        allocation = None
        if len(self.recipe.bits) > 1:
            with self.watch.time("allocate"):
                bits, allocation = self._allocate(sites, candidates)
        else:
            bits = {s.node: self.recipe.bits[0] for s in sites}
        tensors = []
        for site in sites:
            chosen = candidates[site.node][bits[site.node]]
            replace_site(graph, site, chosen, accuracy_level=ACCURACY_LEVEL)
            tensors.append(_tensor_record(site, chosen, allocation))
        return graph, tensors, allocation

    def _candidates(self, graph, sites: list[WeightSite]) -> dict[str, dict[int, BlockQuantized]]:
        widths = self.recipe.bits
        candidates: dict[str, dict[int, BlockQuantized]] = {s.node: {} for s in sites}
        embeddings = [s for s in sites if s.op == "Gather"]
        linears = [s for s in sites if s.op != "Gather"]
        with self.progress.stage(f"Quantizing {len(sites)} weight tensors ({self._describe()})",
                                 total=len(sites)) as advance:
            for site in embeddings:
                weight = read_weight(graph, site, self.base_dir)
                size = embedding_block_size(site.k, self.block)
                for bits in widths:
                    candidates[site.node][bits] = quantize_weight(weight, bits, size, self.embedding_method)
                advance(1)
            if self.linear_method == "gptq":
                by_input: dict[str, list[WeightSite]] = {}
                for site, tensor in zip(linears, (site_inputs(graph, linears)[s.node] for s in linears)):
                    by_input.setdefault(tensor, []).append(site)
                for tensor, hessian in iter_hessians(self.fp32_path, graph, linears, self.texts.calibration):
                    for site in by_input[tensor]:
                        weight = read_weight(graph, site, self.base_dir)
                        for bits in widths:
                            candidates[site.node][bits] = quantize_gptq(weight, hessian, bits, self.block)
                        advance(1)
                    del hessian
            else:
                for site in linears:
                    weight = read_weight(graph, site, self.base_dir)
                    for bits in widths:
                        candidates[site.node][bits] = quantize_weight(weight, bits, self.block, self.linear_method)
                    advance(1)
        return candidates

    def _describe(self) -> str:
        if self.linear_method == self.embedding_method:
            return self.linear_method
        return f"{self.linear_method}, {self.embedding_method} for the embedding"

    def _allocate(self, sites, candidates):
        low, high = min(self.recipe.bits), max(self.recipe.bits)
        with self.progress.stage("Measuring each tensor's sensitivity (KL on calibration text)",
                                 total=len(sites)) as advance:
            probe = SensitivityProbe(self.fp32_path, sites, self.texts.calibration)
            gains, kls = measure_gains(probe, candidates, low, high, advance)
            del probe
        bits = allocate_bits(sites, gains, self.recipe.target_bits, low, high)
        allocation = {
            "target_bits": self.recipe.target_bits,
            "bits": round(average_bits(sites, bits), 4),
            "criterion": f"KL divergence saved per weight by {high} instead of {low} bits, each tensor measured "
                         "alone with the rest in fp32, greedy within the budget",
            "kl": {s.node: kls[s.node] for s in sites},
            "gain": gains,
            "raised": [s.name for s in sites if bits[s.node] == high],
        }
        return bits, allocation


def _tensor_record(site: WeightSite, quantized: BlockQuantized, allocation: dict | None) -> dict[str, Any]:
    record = {
        "name": site.name,
        "initializer": site.initializer,
        "op": site.op,
        "role": site.role,
        "shape": [site.k, site.n],
        "bits": quantized.bits,
        "block_size": quantized.block_size,
        "method": quantized.method,
        "bytes": quantized.nbytes,
        "fp32_bytes": site.elements * 4,
    }
    if allocation:
        record["kl_by_bits"] = {str(b): round(v, 6) for b, v in allocation["kl"][site.node].items()}
    return record


def _save(graph, fp32_dir: Path, quant_dir: Path, external: bool) -> Path:
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    # What was not quantized (norms, biases) may still point into the fp32 export's data file.
    load_external_data_for_model(graph, str(fp32_dir))
    path = quant_dir / MODEL_FILE
    if external:
        onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(graph, str(path))
    return path


def _smoke_test(model_path: Path) -> None:
    """One short forward pass, so a model onnxruntime cannot run is never put in place."""
    lm = OnnxLM(model_path)
    logits = lm.logits(np.zeros((1, 4), dtype=np.int64))
    if not np.isfinite(logits).all():
        raise UnsupportedModelError(f"{model_path}: the quantized model produces non-finite logits")


def _evaluate(fp32_dir: Path, quant_dir: Path, tokenizer, texts: TextPlan, prompt: str, watch: Stopwatch,
              progress: ProgressReporter) -> tuple[dict[str, Any], dict[str, str]]:
    with watch.time("evaluate"):
        with progress.stage("Evaluating against the fp32 model", total=len(texts.evaluation)) as advance:
            figures: QualityFigures = compare(OnnxLM(fp32_dir / MODEL_FILE), OnnxLM(quant_dir / MODEL_FILE),
                                              texts.evaluation, advance)
        with progress.stage("Greedy completion of the prompt"):
            completions = {"fp32": _complete(fp32_dir, tokenizer, prompt), "quantized": _complete(quant_dir, tokenizer, prompt)}
    quality = {
        **figures.as_dict(),
        "eval": texts.evaluation_source,
        "window_tokens": int(texts.evaluation.shape[1] - 1) if len(texts.evaluation) else 0,
        "completion": {"prompt": prompt, "max_new_tokens": COMPLETION_TOKENS, **completions},
    }
    return quality, completions


def _complete(model_dir: Path, tokenizer, prompt: str) -> str:
    from optimum.onnxruntime import ORTModelForCausalLM

    lm = ORTModelForCausalLM.from_pretrained(str(model_dir), provider="CPUExecutionProvider")
    inputs = tokenizer(prompt, return_tensors="pt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generated = lm.generate(**inputs, max_new_tokens=COMPLETION_TOKENS, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(generated[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def _onnx_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir()
               if p.is_file() and (p.suffix == ".onnx" or p.name.endswith(".onnx_data")))


def _versions() -> dict[str, str]:
    import orion_cli

    versions = {"orion": orion_cli.__version__}
    for name in TOOLS:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return versions


def _metadata(*, source, recipe, block, method, linear_method, embedding_method, tensors, allocation, texts,
              fp32_dir, quant_dir, quality, watch) -> dict[str, Any]:
    elements = sum(t["shape"][0] * t["shape"][1] for t in tensors)
    nominal = sum(t["bits"] * t["shape"][0] * t["shape"][1] for t in tensors) / elements
    stored = sum(t["bytes"] for t in tensors)
    source_bytes = source.weight_bytes
    quantized_bytes = _onnx_bytes(quant_dir)
    quantization: dict[str, Any] = {
        "level": recipe.name,
        "bits": round(nominal, 4),
        "method": linear_method,
        "block_size": block,
        "embedding_method": embedding_method,
        "requested_method": method,
        "recipe": recipe.summary,
        "effective_bits": round(8 * stored / elements, 4),
        "accuracy_level": ACCURACY_LEVEL,
        "operators": sorted({"GatherBlockQuantized" if t["op"] == "Gather" else "MatMulNBits" for t in tensors}),
        "tensors_quantized": len(tensors),
        "bits_histogram": {str(b): sum(1 for t in tensors if t["bits"] == b) for b in sorted({t["bits"] for t in tensors})},
        "calibration": texts.calibration_source if texts is not None and len(texts.calibration) else None,
    }
    if allocation:
        quantization["allocation"] = {k: allocation[k] for k in ("target_bits", "bits", "criterion", "raised")}
    document = {
        "quantization": quantization,
        "sizes": {
            "source_bytes": source_bytes,
            "onnx_fp32_bytes": _onnx_bytes(fp32_dir),
            "quantized_bytes": quantized_bytes,
            "fraction_of_source": round(quantized_bytes / source_bytes, 6),
            "reduction_percent": round(100 * (1 - quantized_bytes / source_bytes), 3),
            "quantized_weight_bytes": stored,
            "fp32_weight_bytes": elements * 4,
        },
        "durations": dict(watch.durations),
        "tools": _versions(),
        "tensors": tensors,
        "files": [
            {**record.as_dict(), "path": f"{QUANTIZED_DIR}/{record.path}"} for record in hash_files(quant_dir)
        ],
    }
    if quality is not None:
        document["quality"] = quality
    return document
