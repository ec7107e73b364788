"""quantize_model(): export the graph, quantize a layer at a time, check, evaluate, write OUT atomically.

OUT/quantized/    model.onnx + model.onnx_data, config, generation config, tokenizer
OUT/onnx/         the fp32 model, only with keep_intermediate
OUT/metadata.json provenance, the recipe, bits of every tensor, sizes, durations, versions, quality

Memory is bounded by a layer, not the model: the graph is exported without
weights (onnx_export/graph.py), each weight is read from the checkpoint a
row block at a time and written quantized straight into the external data
file (sites.py), and calibration runs transformers' model a decoder layer at
a time (layerwise.py, calibration.py), quantizing each layer while its
Hessians exist.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import CheckpointReader
from ..config import QuantizeSettings, override, shipped_config
from ..errors import ModelDirError, UnsupportedModelError, UsageError
from ..heap import return_large_blocks_to_the_system
from ..onnx_decoder import OnnxDecoder
from ..onnx_export.float_model import check_shapes, save_model, write_float_model
from ..onnx_export.graph import EXPERT_COUNTS, EXTERNAL_DATA_FILE, MODEL_FILE, check_supported, export_graph
from ..onnx_export.parameters import ExternalData, parameter_inputs
from ..onnx_export.tensors import ModelTensors
from ..producing import Output, producing, recorded_provenance, resolve_source
from ..progress import NULL_PROGRESS, ProgressReporter, Stopwatch
from .budget import CalibrationPlan, calibration_cost, plan_calibration
from .calibration import collect_hessians
from .evaluate import evaluate_quantized
from .graph import QuantizedGraph, WeightSite, find_weight_sites, tied_embedding_node, tied_sites
from .layerwise import LayerwiseModel
from .allocate import allocate_sites, site_formats
from .levels import ACCURACY_LEVEL, Format, Level, get_level, resolve_methods
from .sensitivity import SAMPLE_WINDOWS, Probe, Sensitivity, head_kl, sample_embedding_rows, weights_swapped
from .report import quantize_metadata, tensor_record
from .sites import Candidate, CandidateStore, quantize_site
from .texts import TextPlan, plan_texts

log = logging.getLogger(__name__)

QUANTIZED_DIR = "quantized"
ONNX_DIR = "onnx"
SCRATCH_DIR = ".scratch"
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
    --eval-text) all happen before the export starts; what optimum cannot
    export fails at the export with its reason.
    """
    started = time.perf_counter()
    return_large_blocks_to_the_system()  # else the resident set grows with depth (heap.py)
    settings = override(settings or shipped_config().quantize, **overrides)
    output = Output.of(output).resolved()
    recipe = get_level(settings.level)
    source = resolve_source("--model", model, output.registry)
    check_supported(source.model)
    eval_path = Path(settings.eval_text) if settings.eval_text else None
    if eval_path is not None and not eval_path.is_file():
        raise UsageError(f"--eval-text {eval_path}: no such file")

    watch = Stopwatch()
    with producing("quantize", [source], output, default_name=f"{source.model.root.absolute().name}-{settings.level}",
                   parameters=settings.model_dump(), extra_inputs=[("--eval-text", eval_path)] if eval_path else [],
                   progress=progress) as out:
        scratch = out.tmp / SCRATCH_DIR
        scratch.mkdir()
        with watch.time("export"), progress.stage("Exporting the graph (optimum's export config, no weights)"):
            graph_path = export_graph(source.path, scratch / MODEL_FILE)
        job = _QuantizeJob(source.path, graph_path, out.tmp / QUANTIZED_DIR, scratch, recipe, settings, eval_path,
                           test, watch, progress)
        tensors, allocation = job.run()
        with watch.time("check"), progress.stage("Checking the quantized model runs in onnxruntime"):
            decoder = _smoke_test(job.quant_path)
        quality, completions = None, {}
        if test:
            quality, completions = job.evaluate(decoder, settings.prompt)
        del decoder
        if settings.keep_intermediate:
            with watch.time("write_fp32"), progress.stage("Writing the fp32 model (--keep-intermediate)"):
                job.write_fp32(out.tmp / ONNX_DIR)
        shutil.rmtree(scratch)
        watch.durations["total"] = round(time.perf_counter() - started, 3)
        out.metadata.update(quantize_metadata(
            source=source.model, recipe=recipe, block=job.block, method=settings.method, plan=job.plan,
            embedding_method=job.embedding_method, tensors=tensors, allocation=allocation, texts=job.texts,
            parameter_count=job.parameter_count, quant_dir=job.quant_path.parent, quality=quality, watch=watch,
            accuracy_level=ACCURACY_LEVEL,
        ))
    metadata = {"provenance": recorded_provenance(out.output), **out.metadata}
    return QuantizeResult(out.output, out.output / QUANTIZED_DIR, metadata, out.registered, completions)


def _window(config) -> int:
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    return int(min(128, limit - 1))


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelDirError(
            f"--model {model_dir}: no usable tokenizer ({str(exc).splitlines()[0]}); calibration and --test need one"
        ) from None


def _routers(parameters: dict[str, tuple[int, ...]], config) -> set[str]:
    """MoE router weights ([experts, hidden]): kept in fp32, as llama.cpp keeps ffn_gate_inp, since every
    token's choice of experts goes through them."""
    experts = next((getattr(config, k) for k in EXPERT_COUNTS if getattr(config, k, None)), None)
    return {name for name, shape in parameters.items() if experts and len(shape) == 2 and shape[0] == experts}


class _QuantizeJob:
    """The weightless graph filled with quantized weights read from the checkpoint, per the level's recipe."""

    def __init__(self, source_dir: Path, graph_path: Path, quant_dir: Path, scratch: Path, recipe: Level,
                 settings: QuantizeSettings, eval_path: Path | None, test: bool, watch: Stopwatch,
                 progress: ProgressReporter):
        import onnx

        self.source_dir, self.graph_path, self.scratch = source_dir, graph_path, scratch
        self.recipe, self.settings, self.eval_path, self.test = recipe, settings, eval_path, test
        self.watch, self.progress = watch, progress
        quant_dir.mkdir()
        self.quant_path = quant_dir / MODEL_FILE
        self.tensors = ModelTensors(CheckpointReader(source_dir))
        self.reference = LayerwiseModel(str(source_dir), self.tensors)
        self.onnx_model = onnx.load(str(graph_path), load_external_data=False)
        parameters = parameter_inputs(self.onnx_model)
        check_shapes(self.tensors, parameters)
        self.parameter_count = sum(int(np.prod(shape)) for shape in parameters.values())
        self.sites = find_weight_sites(self.onnx_model, _routers(parameters, self.reference.text_config))
        if not any(s.op != "Gather" for s in self.sites):
            raise UnsupportedModelError(f"--model {source_dir}: no linear layer with a weight matrix to quantize")
        self.linear_method, self.embedding_method = resolve_methods(settings.method)
        self.formats_of = {site.node: site_formats(site, recipe.with_block(settings.block_size))
                           for site in self.sites}
        # A tied embedding reads the head's blocks, so the table is stored once (graph.tied_embedding_node), in
        # formats both operators run; not with hqq, whose float zero points GatherBlockQuantized cannot read.
        self.tied = tied_sites(self.sites) if self.linear_method != "hqq" else {}
        for head, embedding in self.tied.items():
            self.formats_of[head] = self.formats_of[embedding.node]
        formats = recipe.with_block(settings.block_size)
        self.block = formats[0].block  # the cheapest format's, for the registry
        inputs = {node.name: node.input[0] for node in self.onnx_model.graph.node if node.input}
        self.plan: CalibrationPlan = plan_calibration(
            calibration_cost(self.sites, inputs, self.linear_method, formats, len(self.reference.layers),
                             SAMPLE_WINDOWS * _window(self.reference.text_config)), requested=settings.method,
            linear_method=self.linear_method, widths=formats, tokens=settings.calibration_tokens,
            minutes=settings.calibration_minutes, window=_window(self.reference.text_config),
            sample_tokens=SAMPLE_WINDOWS * _window(self.reference.text_config))
        if self.plan.tokens or len(formats) > 1 or self.linear_method == "gptq":
            log.info("calibration: %s (estimated %.0f s at %.0f GFLOPS)", self.plan.reason,
                     self.plan.estimated_seconds, self.plan.matmul_gflops)
        self.linear_method = self.plan.linear_method
        self.texts: TextPlan | None = None
        if self.plan.tokens or test:
            self.texts = plan_texts(_tokenizer(source_dir), source_dir, eval_path, self.plan.tokens,
                                    settings.eval_tokens if test else 0, _window(self.reference.text_config))

    # -- quantizing ------------------------------------------------------------------------------------------

    def run(self) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        data = ExternalData(self.quant_path.with_name(EXTERNAL_DATA_FILE))
        store = CandidateStore(self.scratch / "candidates.bin")
        errors: dict[str, dict[Format, float]] = {}
        placing = {"seconds": 0.0}

        def place(site: WeightSite, method: str, hessian) -> dict[Format, Candidate]:
            started = time.perf_counter()
            candidates = quantize_site(self.tensors, site, self.formats_of[site.node], method, hessian)
            for candidate in candidates.values():
                store.put(site.node, candidate.quantized)
            errors[site.node] = {f: c.relative_error for f, c in candidates.items()}
            placing["seconds"] += time.perf_counter() - started
            return candidates

        with self.watch.time("quantize"), self.progress.stage(
                f"Quantizing {len(self.sites)} weight tensors ({self._describe()})", total=len(self.sites)) as advance:
            if self.plan.tokens:
                measured = self._calibrated(place, advance)
            else:
                measured = Sensitivity()
                for site in self.sites:
                    place(site, self._method_of(site, None), None)
                    advance(1)
        # how the time split, for the calibration budget's estimate (budget.py) to be checked against
        self.watch.durations["quantize_weights"] = round(placing["seconds"], 3)
        if self.plan.tokens:
            self.watch.durations["calibration_forward"] = round(self.watch.durations["quantize"] - placing["seconds"], 3)
        records: dict[str, dict[str, Any]] = {}
        tied_embeddings = {embedding.node for embedding in self.tied.values()}
        with self.watch.time("allocate"):
            allocation = self._allocate(errors, measured, store)
            prefixes = {}
            rewrite = QuantizedGraph(self.onnx_model, data, ACCURACY_LEVEL)
            for site in self.sites:
                if site.node in tied_embeddings:  # written with its head, below
                    continue
                chosen = store.get(site.node, allocation["format_of"][site.node])
                prefixes[site.node] = rewrite.quantize(site, chosen)
                records[site.node] = tensor_record(site, chosen, allocation["predicted_kl"][site.node])
            rewrite.finish()
            for head, embedding in self.tied.items():
                chosen = store.get(head, allocation["format_of"][head])
                tied_embedding_node(self.onnx_model, embedding, prefixes[head], chosen)
                records[embedding.node] = tensor_record(embedding, chosen, allocation["predicted_kl"][embedding.node],
                                                        tied_to=records[head]["name"])
            store.close()
            (self.scratch / "candidates.bin").unlink()
        with self.watch.time("write"), self.progress.stage("Writing the quantized model"):
            save_model(self.onnx_model, self.tensors, data, self.quant_path, self.source_dir)
        return [records[s.node] for s in self.sites], allocation

    def _calibrated(self, place, advance) -> Sensitivity:
        """Calibrate a layer at a time, quantizing each layer's tensors while its Hessians exist, and measure
        each group's KL on a sample carried beside the batch (sensitivity.py) when there is a choice to make."""
        by_layer: dict[int | None, list[WeightSite]] = {}
        for site in self.sites:
            layer = self.reference.layer_of(site.param) if site.op != "Gather" else None
            by_layer.setdefault(layer, []).append(site)
        outside = by_layer.get(None, [])
        windows = self.texts.calibration[:, :-1]
        choosing = any(len(f) > 1 for f in self.formats_of.values())
        probe = Probe(min(SAMPLE_WINDOWS, len(windows))) if choosing else None
        embedding_sample = None  # (rows, quantized rows) of the sample's tokens, for the embedding's stream
        for site in outside:  # the embedding first (it needs no Hessian), so its stream starts at layer 0
            if site.role == "embedding":
                candidates = place(site, self._method_of(site, None), None)
                if probe is not None and embedding_sample is None:
                    embedding_sample = sample_embedding_rows(self.reference, windows[: probe.sample],
                                                             candidates[self.formats_of[site.node][0]].quantized)
                del candidates  # a 128k vocabulary's candidates are a GiB: only the sample's rows are kept
                advance(1)
        last_layer = len(self.reference.layers) - 1
        last_hidden: torch.Tensor | None = None  # the sample's rows out of the last layer, to check the final norm
        measured_skips: dict[str, str] = {}

        def on_layer(index, hessians, layer, call):
            nonlocal probe, last_hidden
            if probe is not None and index == 0 and not probe.verify(layer, call):
                measured_skips.update(probe.skipped)
                probe = None
            if probe is not None and index == 0 and embedding_sample is not None:
                probe.start_embedding(call, *embedding_sample)
            if probe is not None:
                probe.advance(layer, call)
            placed = {}
            for site in by_layer.get(index, []):
                hessian = hessians.get(site.param)
                matrix = hessian.matrix() if hessian is not None else None
                placed[site] = place(site, self._method_of(site, matrix), matrix)
                advance(1)
            if probe is not None and placed:
                cheapest = {site: (candidates[self.formats_of[site.node][0]].quantized, site.param, site.stored_nk)
                            for site, candidates in placed.items()}
                probe.start_layer(f"layer {index}", layer, call,
                                  lambda: weights_swapped(layer, self.reference.layer_prefix(index), cheapest.values()))
            if index == last_layer and probe is not None:
                last_hidden = call.hidden_out[: probe.sample].clone()

        wanted = {site.param for site in self.sites if site.op != "Gather"} if self.linear_method == "gptq" else set()
        head, hidden = collect_hessians(self.reference, windows, wanted, on_layer)
        measured = Sensitivity(skipped=measured_skips)
        reference_logits = None
        if probe is not None:
            reference_hidden = hidden[: probe.sample]
            reference_logits = self.reference.logits(reference_hidden)
            if last_hidden is not None and torch.allclose(self.reference.final(last_hidden), reference_hidden,
                                                 rtol=1e-4, atol=1e-4):
                probe.finish(self.reference.final, self.reference.logits, reference_logits)
                measured.groups.update(probe.measured)
            else:
                probe.skipped["all"] = "the final norm could not be found and run again on other hidden states"
            measured.skipped.update(probe.skipped)
        for site in outside:
            if site.role == "embedding":
                continue
            matrix = head.matrix() if site.role == "lm_head" else None
            candidates = place(site, self._method_of(site, matrix), matrix)
            advance(1)
            if probe is not None and site.role == "lm_head":
                measured.exact[site.node] = {
                    f: head_kl(self.reference, hidden[: probe.sample], c.quantized, reference_logits)
                    for f, c in candidates.items()}
        return measured

    def _method_of(self, site: WeightSite, hessian) -> str:
        if site.op == "Gather":
            return self.embedding_method
        if self.linear_method == "gptq" and hessian is None:  # an expert no calibration token was routed to
            return "rtn"
        return self.linear_method

    def _describe(self) -> str:
        if self.linear_method == self.embedding_method:
            return self.linear_method
        return f"{self.linear_method}, {self.embedding_method} for the embedding"

    def _allocate(self, errors: dict[str, dict[Format, float]], measured: Sensitivity,
                  store: CandidateStore) -> dict[str, Any]:
        predicted = measured.predict(self.sites, errors, self.formats_of, self.reference.layer_of)
        fraction = self.settings.size_budget or self.recipe.size_budget
        allocation = allocate_sites(self.sites, self.formats_of, predicted, store.nbytes,
                                    int(fraction * 4 * self.parameter_count), self._fixed_bytes(), self.tied)
        if not allocation["within_budget"]:
            log.warning("the cheapest format of every tensor already exceeds %s's budget of %.3fx the fp32 size",
                        self.recipe.name, fraction)
        return {"size_budget": fraction, **allocation,
                "formats": [str(f) for f in self.recipe.with_block(self.settings.block_size)],
                "criterion": measured.criterion(), "sensitivity": measured.as_dict()}

    def _fixed_bytes(self) -> int:
        """What the files hold besides the quantized tensors: the graph (with a margin for the quantized
        nodes and initializer entries) and every parameter left in fp32."""
        quantized = {site.param for site in self.sites}
        left = sum(4 * int(np.prod(shape)) for name, shape in parameter_inputs(self.onnx_model).items()
                   if name not in quantized)
        return self.onnx_model.ByteSize() + 160 * (4 * len(self.sites)) + left

    def write_fp32(self, onnx_dir: Path) -> None:
        onnx_dir.mkdir()
        write_float_model(self.source_dir, self.graph_path, onnx_dir, self.tensors)

    def evaluate(self, decoder: OnnxDecoder, prompt: str) -> tuple[dict[str, Any], dict[str, str]]:
        with self.watch.time("evaluate"):
            return evaluate_quantized(self.reference, decoder, self.texts, _tokenizer(self.source_dir), prompt,
                                      COMPLETION_TOKENS, self.progress)


def _smoke_test(model_path: Path) -> OnnxDecoder:
    """One short forward pass, so a model onnxruntime cannot run is never put in place."""
    decoder = OnnxDecoder(model_path)
    logits, _ = decoder.run(np.zeros((1, 4), dtype=np.int64), None, None, None)
    if not np.isfinite(logits).all():
        raise UnsupportedModelError(f"{model_path}: the quantized model produces non-finite logits")
    return decoder
