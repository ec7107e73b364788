"""A merge described by flags: models, ratios, a base and the merge settings, planned as a mergekit config.

linear: weighted average, ratios normalized to sum to 1. slerp: two models,
t = ratios[1] / sum(ratios), so t=0 is the first model. ties, dare (mergekit's
dare_ties) and dare_linear: task vectors against `base` (default: the first
model, whose own ratio is then unused), `density` of each kept, dare's random
drop seeded by `seed`. `dtype` is the dtype written; arithmetic is float32.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

from ..config import MergeMethod, MergeSettings, choices, override, shipped_config
from ..errors import UnsupportedModelError, UsageError
from ..producing import Output, Source, resolve_source
from ..progress import NULL_PROGRESS, ProgressReporter
from .execute import MergePlan, MergeResult, execute
from .refs import model_ref

# orion's method names and the mergekit methods behind them
MERGEKIT_METHODS = {"linear": "linear", "slerp": "slerp", "ties": "ties", "dare": "dare_ties", "dare_linear": "dare_linear"}
assert set(MERGEKIT_METHODS) == set(choices(MergeMethod)), "config.MergeMethod and MERGEKIT_METHODS disagree"
TASK_VECTOR_METHODS = ("ties", "dare", "dare_linear")
RANDOM_METHODS = ("dare", "dare_linear")


def merge_models(
    models: Sequence[str | Path],
    output: str | Path | Output | None = None,
    *,
    ratios: Sequence[float] | None = None,
    base: str | Path | None = None,
    settings: MergeSettings | None = None,
    progress: ProgressReporter = NULL_PROGRESS,
    **overrides: Any,
) -> MergeResult:
    """Merge local models (directories or registry keys) with one of orion's methods.

    `settings` (default: configs/default.yaml's merge section) with any of its
    fields given as keyword `overrides` (method="ties", density=0.3, ...).
    """
    started = time.perf_counter()
    settings = override(settings or shipped_config().merge, **overrides)
    output = Output.of(output).resolved()
    parameters = merge_parameters(models, ratios, base, settings)
    sources = [resolve_source("--models", str(ref), output.registry) for ref in models]
    _check_distinct(sources)
    base_source = resolve_source("--base", str(base), output.registry) if base is not None else sources[0]
    plan = _plan(sources, base_source, parameters, settings)
    return execute(plan, output, settings=settings, progress=progress, started=started)


def merge_parameters(models: Sequence[str | Path], ratios: Sequence[float] | None, base: str | Path | None,
                     settings: MergeSettings) -> dict[str, Any]:
    """What provenance records of a merge asked for by flags (and what `orion run` compares it with)."""
    checked = _check_flags(models, ratios, base, settings)
    parameters: dict[str, Any] = {"method": settings.method, "mergekit_method": MERGEKIT_METHODS[settings.method],
                                  "models": [str(m) for m in models], "ratios": checked, "dtype": settings.dtype,
                                  "allow_crimes": settings.allow_crimes}
    if settings.method in TASK_VECTOR_METHODS:
        parameters["base"] = str(base) if base is not None else str(models[0])
        parameters["density"] = settings.density
    if settings.method in RANDOM_METHODS:
        parameters["seed"] = settings.seed
    return parameters


def _check_flags(models, ratios, base, settings: MergeSettings) -> list[float]:
    method = settings.method
    if not models:
        raise UsageError("--models: name the models to merge (--models A B ...), or pass --config FILE")
    if method == "slerp" and len(models) != 2:
        raise UsageError(f"--method slerp interpolates between exactly two models; --models names {len(models)}")
    if method == "linear" and len(models) < 2:
        raise UsageError("--method linear needs at least two --models")
    if base is not None and method not in TASK_VECTOR_METHODS:
        raise UsageError(f"--base applies to ties, dare and dare_linear, not to --method {method}")
    if ratios is None or len(ratios) == 0:
        return [1.0] * len(models)
    ratios = [float(r) for r in ratios]
    if len(ratios) != len(models):
        raise UsageError(f"--ratios: {len(ratios)} ratios for {len(models)} models; give one ratio per model")
    for ratio in ratios:
        if not math.isfinite(ratio) or ratio < 0:
            raise UsageError(f"--ratios {ratio:g}: ratios are weights and must be finite and >= 0")
    if sum(ratios) <= 0:
        raise UsageError("--ratios: all ratios are 0; at least one model must have weight")
    return ratios


def _same(a: Source, b: Source) -> bool:
    return a.path.resolve() == b.path.resolve()


def _check_distinct(sources: list[Source]) -> None:
    for index, later in enumerate(sources):
        if later.model.format == "onnx":
            raise UnsupportedModelError(f"{later.label}: ONNX weights cannot be merged; merge the safetensors model "
                                        "it was exported from")
        for earlier in sources[:index]:
            if _same(earlier, later):
                what = f"{later.ref} is listed twice" if earlier.ref == later.ref else f"{earlier.ref} and {later.ref} are the same model"
                raise UsageError(f"--models: {what}")


def _plan(sources: list[Source], base: Source, parameters: dict[str, Any], settings: MergeSettings) -> MergePlan:
    method, ratios = settings.method, parameters["ratios"]
    config: dict[str, Any] = {"merge_method": MERGEKIT_METHODS[method]}
    if method == "linear":
        # base_model only fixes which model's config.json the output takes: mergekit
        # otherwise picks one from a set, which differs between runs.
        config["base_model"] = model_ref(sources[0].path)
        config["models"] = [{"model": model_ref(s.path), "parameters": {"weight": r}} for s, r in zip(sources, ratios)]
        parameters["weights"] = [r / sum(ratios) for r in ratios]
    elif method == "slerp":
        t = ratios[1] / sum(ratios)
        config["base_model"] = model_ref(sources[0].path)
        config["models"] = [{"model": model_ref(s.path)} for s in sources]
        config["parameters"] = {"t": t}
        parameters["t"] = t
    else:
        others = [(s, r) for s, r in zip(sources, ratios) if not _same(s, base)]
        if not others:
            raise UsageError(f"--method {method}: --models names only the base model; add models whose task vectors to merge")
        if not any(r > 0 for _, r in others):
            raise UsageError(f"--ratios: every model but the base has ratio 0, so --method {method} would return the base")
        config["base_model"] = model_ref(base.path)
        config["models"] = [{"model": model_ref(base.path)}] + [
            {"model": model_ref(s.path), "parameters": {"weight": r, "density": settings.density}} for s, r in others
        ]
    config["dtype"] = "float32"
    if settings.dtype != "float32":
        config["out_dtype"] = settings.dtype
    distinct = list(sources) + ([base] if not any(_same(base, s) for s in sources) else [])
    donor = base if method in TASK_VECTOR_METHODS else sources[0]
    names = "-".join(Path(s.ref).name or s.ref for s in sources)
    return MergePlan(config, distinct, donor, parameters, whole_models=True, mergekit_tokenizer=False,
                     default_name=f"merge-{method}-{names}")
