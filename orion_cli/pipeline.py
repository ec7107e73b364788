"""orion run: a declared sequence of steps (merge, quantize, shard, register, serve) from a YAML file.

Each step names its inputs, usually the output of an earlier step by reference:

    vars: {model: "${builtin.reference}", out: outputs/production}
    steps:
      - id: quantize
        quantize: {model: "${vars.model}", output: "${vars.out}/quantized", level: q4}
      - id: shard
        shard: {model: "${steps.quantize.output}", output: "${vars.out}/production", shards: 4}
      - id: register
        register: {model: "${steps.shard.output}", key: production}

A step whose output already exists and whose metadata records the same inputs
(by sha256) and parameters is skipped unless forced. A failing step stops the
run; the outputs of earlier steps stay in place (each was written atomically).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import read_yaml_mapping
from .errors import ConfigError, OrionError, describe
from .modeldir import inspect_model_dir, weights_digest
from .progress import NULL_PROGRESS, ProgressReporter
from .registry import Registry, resolve_model_ref

_REFERENCE = re.compile(r"\$\{([^}]+)\}")


class StepFailedError(OrionError):
    """A step of a pipeline failed; earlier steps' outputs stay in place."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# -- step kinds ------------------------------------------------------------------


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantizeParams(_Params):
    model: str
    output: str | None = None
    level: Literal["q4", "q3", "q2"] | None = None
    block_size: int | None = None
    method: Literal["auto", "gptq", "rtn", "kquant", "hqq"] | None = None
    test: bool = False
    eval_text: str | None = None
    low_cpu_mem: bool | None = None
    keep_intermediate: bool | None = None


class MergeParams(_Params):
    models: list[str] = Field(min_length=1)
    output: str | None = None
    ratios: list[float] | None = None
    method: Literal["linear", "slerp", "ties", "dare", "dare_linear"] | None = None
    base: str | None = None
    density: float | None = None
    seed: int | None = None
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    allow_crimes: bool | None = None


class ShardParams(_Params):
    model: str
    output: str | None = None
    shards: int | None = Field(default=None, ge=1)
    max_shard_size: str | int | None = None

    @model_validator(mode="after")
    def _one_strategy(self) -> "ShardParams":
        if (self.shards is None) == (self.max_shard_size is None):
            raise ValueError("give exactly one of shards or max_shard_size")
        return self


class RegisterParams(_Params):
    model: str
    key: str
    name: str | None = None
    description: str | None = None


class ServeParams(_Params):
    model: str
    tp: int | None = Field(default=None, ge=1)
    pp: int | None = Field(default=None, ge=1)
    host: str | None = None
    port: int | None = None
    api_key: str | None = None
    activation_codec: str | None = None


# The library arguments that never decide whether an output is stale: where things
# are read and written, and whether quality was also measured.
_NOT_PARAMETERS = {"model", "models", "base", "output", "force", "registry", "registry_path", "progress", "test",
                   "eval_text"}


@dataclass(frozen=True)
class StepKind:
    name: str
    params: type[_Params]
    # the keyword arguments of the library call, config defaults filled in
    arguments: Callable[[Any, "Step", "RunContext"], dict[str, Any]]
    call: Callable[[dict[str, Any]], Path | None]
    operation: str | None  # provenance operation of its output, when it writes one
    inputs: Callable[[Any], list[str]]  # the model references it reads


STEP_KINDS: dict[str, StepKind] = {}


def step_kind(name: str, params: type[_Params], operation: str | None, inputs: Callable[[Any], list[str]],
              call: Callable[[dict[str, Any]], Path | None]):
    """Declare a step kind by the function that turns its parameters into the library call's arguments."""

    def register(arguments):
        STEP_KINDS[name] = StepKind(name, params, arguments, call, operation, inputs)
        return arguments

    return register


# -- the pipeline file -------------------------------------------------------------


@dataclass
class Step:
    id: str
    kind: StepKind
    raw: dict[str, Any]  # as written, references unresolved
    params: _Params | None = None  # resolved and validated
    output: Path | None = None


@dataclass
class Pipeline:
    path: Path
    name: str
    description: str
    variables: dict[str, Any]
    steps: list[Step]
    output_root: Path


def is_pipeline_file(data: dict[str, Any]) -> bool:
    return "steps" in data


def load_pipeline(path: str | Path, overrides: dict[str, str] | None = None) -> Pipeline:
    """Parse and check a pipeline file; references are resolved when the run reaches each step."""
    path = Path(path)
    data = read_yaml_mapping(path, what="pipeline file")
    where = f"pipeline file {path}"
    unknown = set(data) - {"pipeline", "description", "vars", "output_root", "steps"}
    if unknown:
        raise ConfigError(f"{where}: key '{sorted(unknown)[0]}': unknown key")
    variables = dict(data.get("vars") or {})
    for key, value in (overrides or {}).items():
        if key not in variables:
            raise ConfigError(f"--set {key}={value}: the pipeline declares no variable '{key}' (it has: {', '.join(variables) or 'none'})")
        variables[key] = value
    name = str(data.get("pipeline") or path.stem)
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ConfigError(f"{where}: key 'steps': a list of at least one step is required")
    steps: list[Step] = []
    for index, raw in enumerate(raw_steps):
        steps.append(_parse_step(raw, index, where, {s.id for s in steps}))
    for step in steps[:-1]:
        if step.kind.name == "serve":
            raise ConfigError(f"{where}: step '{step.id}': serve can only be the last step")
    pipeline = Pipeline(path, name, str(data.get("description", "")), variables, steps,
                        Path(str(data.get("output_root") or f"outputs/{name}")))
    _check_references(pipeline, where)
    _check_parameters(pipeline, where)
    return pipeline


def _parse_step(raw: Any, index: int, where: str, earlier: set[str]) -> Step:
    at = f"{where}: steps[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{at}: a step is a mapping with an 'id' and one step kind")
    kinds = [k for k in raw if k in STEP_KINDS]
    others = set(raw) - set(kinds) - {"id"}
    if others:
        raise ConfigError(f"{at}: key '{sorted(others)[0]}': unknown key (step kinds: {', '.join(STEP_KINDS)})")
    if len(kinds) != 1:
        raise ConfigError(f"{at}: give exactly one step kind of {', '.join(STEP_KINDS)}")
    kind = STEP_KINDS[kinds[0]]
    step_id = str(raw.get("id") or kind.name)
    if step_id in earlier:
        raise ConfigError(f"{at}: step id '{step_id}' is used twice")
    body = raw[kind.name] or {}
    if not isinstance(body, dict):
        raise ConfigError(f"{at}: '{kind.name}' must hold a mapping of parameters")
    unknown = set(body) - set(kind.params.model_fields)
    if unknown:
        raise ConfigError(f"{where}: step '{step_id}': key '{kind.name}.{sorted(unknown)[0]}': unknown key")
    return Step(step_id, kind, body)


def _check_references(pipeline: Pipeline, where: str) -> None:
    for name, value in pipeline.variables.items():
        for ref in _REFERENCE.findall(str(value)):
            if ref != "builtin.reference":
                raise ConfigError(f"{where}: key 'vars.{name}': unknown reference ${{{ref}}} "
                                  "(a variable may only refer to ${builtin.reference})")
    seen: set[str] = set()
    for step in pipeline.steps:
        for text in _strings(step.raw):
            for ref in _REFERENCE.findall(text):
                parts = ref.split(".")
                ok = (
                    (parts[0] == "vars" and len(parts) == 2 and parts[1] in pipeline.variables)
                    or (parts[0] == "steps" and len(parts) == 3 and parts[1] in seen and parts[2] == "output")
                    or ref == "builtin.reference"
                )
                if not ok:
                    raise ConfigError(
                        f"{where}: step '{step.id}': unknown reference ${{{ref}}} "
                        "(use ${vars.NAME}, ${steps.EARLIER_STEP.output} or ${builtin.reference})"
                    )
        seen.add(step.id)


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


# -- running ---------------------------------------------------------------------


@dataclass
class RunContext:
    pipeline: Pipeline
    registry_path: Path
    cache_dir: Path
    settings: Any  # the resolved OrionConfig, for defaults the step leaves out
    force: bool = False
    dry_run: bool = False
    progress: ProgressReporter = NULL_PROGRESS
    _reference: Path | None = None

    def reference_model(self) -> Path:
        """The built-in reference model; a dry run names its cache directory without building it."""
        from .reference.model import ensure_reference_model, reference_model_dir

        if self.dry_run:
            return reference_model_dir(self.cache_dir)
        if self._reference is None:
            self._reference = ensure_reference_model(self.cache_dir, progress=self.progress)
        return self._reference


@dataclass
class StepReport:
    id: str
    kind: str
    action: Literal["run", "skip", "plan"]
    output: str | None
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "action": self.action, "output": self.output,
                "seconds": round(self.seconds, 2), "detail": self.detail}


def _substituted(value: Any, variables: dict[str, Any], builtin: Callable[[], str],
                 step_output: Callable[[str], str]) -> Any:
    """`value` with every ${...} reference replaced, in strings nested at any depth."""

    def one(match: re.Match) -> str:
        parts = match.group(1).split(".")
        if parts[0] == "vars":
            # a variable's value may itself name ${builtin.reference}
            return _REFERENCE.sub(one, str(variables[parts[1]]))
        if parts[0] == "builtin":
            return builtin()
        return step_output(parts[1])

    if isinstance(value, str):
        return _REFERENCE.sub(one, value)
    if isinstance(value, dict):
        return {k: _substituted(v, variables, builtin, step_output) for k, v in value.items()}
    if isinstance(value, list):
        return [_substituted(v, variables, builtin, step_output) for v in value]
    return value


def _validated(step: Step, values: dict[str, Any], where: str) -> _Params:
    try:
        return step.kind.params.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        key = f"'{step.kind.name}.{loc}'" if loc else f"'{step.kind.name}'"
        raise ConfigError(f"{where}: step '{step.id}': key {key}: {first['msg']}") from None


def _check_parameters(pipeline: Pipeline, where: str) -> None:
    """Validate every step before any runs; references not known yet are paths, so a placeholder stands in."""
    for step in pipeline.steps:
        values = _substituted(step.raw, pipeline.variables, lambda: "<reference model>",
                              lambda step_id: f"<output of {step_id}>")
        _validated(step, values, where)


def resolve_step(step: Step, ctx: RunContext, done: dict[str, Path | None]) -> None:
    """Substitute references and validate the step's parameters."""

    def step_output(step_id: str) -> str:
        if done.get(step_id) is None:
            raise OrionError(f"step '{step.id}': step '{step_id}' has no output to refer to")
        return str(done[step_id])

    values = _substituted(step.raw, ctx.pipeline.variables, lambda: str(ctx.reference_model()), step_output)
    step.params = _validated(step, values, f"pipeline file {ctx.pipeline.path}")
    output = getattr(step.params, "output", "unset")
    if output != "unset":
        step.output = Path(output) if output else ctx.pipeline.output_root / step.id


def run_pipeline(ctx: RunContext) -> list[StepReport]:
    """Run (or with ctx.dry_run, plan) every step in order."""
    reports: list[StepReport] = []
    done: dict[str, Path | None] = {}
    for step in ctx.pipeline.steps:
        try:
            resolve_step(step, ctx, done)
            if ctx.dry_run:
                reports.append(StepReport(step.id, step.kind.name, "plan", _out(step), detail=_shown(step, ctx)))
                done[step.id] = step.output
                continue
            started = time.perf_counter()
            if not ctx.force and _up_to_date(step, ctx):
                reports.append(StepReport(step.id, step.kind.name, "skip", _out(step), detail=_shown(step, ctx)))
                done[step.id] = step.output
                continue
            arguments = step.kind.arguments(step.params, step, ctx)
            with ctx.progress.stage(f"step {step.id} ({step.kind.name})"):
                produced = step.kind.call({**arguments, "progress": ctx.progress})
            done[step.id] = produced if produced is not None else step.output
            reports.append(StepReport(step.id, step.kind.name, "run", _out(step), time.perf_counter() - started,
                                      _shown(step, ctx)))
        except Exception as exc:  # noqa: BLE001 - any failure stops the run, named by its step
            message, exit_code = describe(exc)
            raise StepFailedError(f"step '{step.id}' ({step.kind.name}) failed: {message}", exit_code) from exc
    return reports


def _out(step: Step) -> str | None:
    return str(step.output) if step.output is not None else None


def _shown(step: Step, ctx: RunContext) -> dict[str, Any]:
    """The library call's arguments as the step resolved them, config defaults included."""
    arguments = step.kind.arguments(step.params, step, ctx)
    return {k: str(v) if isinstance(v, Path) else v for k, v in arguments.items()
            if v is not None and k not in ("force", "registry", "registry_path")}


def _up_to_date(step: Step, ctx: RunContext) -> bool:
    """The step's output exists and its metadata records these inputs (sha256) and parameters."""
    if step.kind.name == "register":
        return _registered_unchanged(step, ctx)
    if step.kind.operation is None or step.output is None or not step.output.exists():
        return False
    try:
        recorded = (inspect_model_dir(step.output).metadata or {}).get("provenance") or {}
    except OrionError:
        return False
    if recorded.get("operation") != step.kind.operation:
        return False
    wanted = sorted(_digest(ref, ctx) for ref in step.kind.inputs(step.params))
    have = sorted(source.get("sha256") for source in recorded.get("sources", []))
    if wanted != have:
        return False
    recorded_parameters = recorded.get("parameters", {})
    asked = step.kind.arguments(step.params, step, ctx)
    # None asks for the library's default, which the metadata records resolved.
    return all(recorded_parameters.get(key, value) == _plain(value) for key, value in asked.items()
               if key not in _NOT_PARAMETERS and value is not None)


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


def _digest(ref: str, ctx: RunContext) -> str:
    path, _ = resolve_model_ref(ref, ctx.registry_path)
    digest, _ = weights_digest(inspect_model_dir(path))
    return digest


def _registered_unchanged(step: Step, ctx: RunContext) -> bool:
    params: RegisterParams = step.params  # type: ignore[assignment]
    entries = Registry(ctx.registry_path).entries()
    if params.key not in entries:
        return False
    from .modeldir import hash_files

    model = inspect_model_dir(resolve_model_ref(params.model, ctx.registry_path)[0])
    current = {(f.path, f.sha256) for f in hash_files(model.path)}
    recorded = {(f["path"], f["sha256"]) for f in entries[params.key].get("files", [])}
    return current == recorded


# -- the step kinds, each one call into the library ---------------------------------


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _merge_call(arguments: dict[str, Any]) -> Path:
    from .merge import merge_models

    return merge_models(**arguments).output


@step_kind("merge", MergeParams, "merge", inputs=lambda p: list(p.models) + ([p.base] if p.base else []), call=_merge_call)
def _merge(p: MergeParams, step: Step, ctx: RunContext) -> dict[str, Any]:
    d = ctx.settings.merge
    return dict(models=list(p.models), output=step.output, ratios=p.ratios, method=_or(p.method, d.method),
                base=p.base, density=_or(p.density, d.density), seed=_or(p.seed, d.seed), dtype=_or(p.dtype, d.dtype),
                allow_crimes=_or(p.allow_crimes, d.allow_crimes), max_shard_size=d.max_shard_size, force=True,
                registry_path=ctx.registry_path)


def _quantize_call(arguments: dict[str, Any]) -> Path:
    from .quantize import quantize_model

    return quantize_model(**arguments).output


@step_kind("quantize", QuantizeParams, "quantize", inputs=lambda p: [p.model], call=_quantize_call)
def _quantize(p: QuantizeParams, step: Step, ctx: RunContext) -> dict[str, Any]:
    d = ctx.settings.quantize
    return dict(model=p.model, output=step.output, level=_or(p.level, d.level), method=_or(p.method, d.method),
                block_size=_or(p.block_size, d.block_size), test=p.test, eval_text=_or(p.eval_text, d.eval_text),
                low_cpu_mem=_or(p.low_cpu_mem, d.low_cpu_mem), keep_intermediate=_or(p.keep_intermediate, d.keep_intermediate),
                calibration_tokens=d.calibration_tokens, eval_tokens=d.eval_tokens, prompt=d.prompt, force=True,
                registry_path=ctx.registry_path)


def _shard_call(arguments: dict[str, Any]) -> Path:
    from .shard import shard_model

    return shard_model(**arguments).output


@step_kind("shard", ShardParams, "shard", inputs=lambda p: [p.model], call=_shard_call)
def _shard(p: ShardParams, step: Step, ctx: RunContext) -> dict[str, Any]:
    return dict(model=p.model, output=step.output, shards=p.shards, max_shard_size=p.max_shard_size, force=True,
                registry=ctx.registry_path)


def _register_call(arguments: dict[str, Any]) -> None:
    from .registry import register_model

    arguments.pop("progress", None)
    path, _ = resolve_model_ref(arguments.pop("model"), arguments["registry_path"])
    register_model(path, **arguments)


@step_kind("register", RegisterParams, None, inputs=lambda p: [p.model], call=_register_call)
def _register(p: RegisterParams, step: Step, ctx: RunContext) -> dict[str, Any]:
    # The pipeline owns its key: a re-run with changed outputs updates the entry.
    return dict(model=p.model, key=p.key, registry_path=ctx.registry_path, force=True, name=p.name,
                description=p.description)


def _serve_call(arguments: dict[str, Any]) -> None:
    from .serve import ServeOptions, serve

    arguments.pop("progress", None)
    serve(ServeOptions(**arguments))


@step_kind("serve", ServeParams, None, inputs=lambda p: [p.model], call=_serve_call)
def _serve(p: ServeParams, step: Step, ctx: RunContext) -> dict[str, Any]:
    import dataclasses

    from .serve import ServeOptions

    accepted = {f.name for f in dataclasses.fields(ServeOptions)}
    settings = {k: v for k, v in ctx.settings.serve.model_dump().items() if k in accepted}
    codec = ctx.settings.codec
    chosen = {k: v for k, v in p.model_dump(exclude_none=True).items()}
    return {**settings, "codec_threshold_bytes": codec.auto_threshold_bytes,
            "codec_int8_block_size": codec.int8_block_size, "codec_zstd_level": codec.zstd_level,
            **chosen, "registry": ctx.registry_path}
