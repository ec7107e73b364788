"""A pipeline file: variables, steps, and the ${...} references between them.

    vars: {model: "${builtin.reference}", out: outputs/production}
    steps:
      - id: quantize
        quantize: {model: "${vars.model}", output: "${vars.out}/quantized", level: q4}
      - id: shard
        shard: {model: "${steps.quantize.output}", output: "${vars.out}/production", shards: 4}
      - id: register
        register: {model: "${steps.shard.output}", key: production}

Everything is checked when the file is loaded, before any step runs: keys,
references (a step refers only to earlier steps), and every step's parameters,
with a placeholder standing in for references not known yet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from ..config import read_yaml_mapping
from ..errors import ConfigError
from .steps import STEP_KINDS, StepKind, StepParams

REFERENCE = re.compile(r"\$\{([^}]+)\}")


@dataclass
class Step:
    id: str
    kind: StepKind
    raw: dict[str, Any]  # as written, references unresolved
    params: StepParams | None = None  # resolved and validated
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
    for step in pipeline.steps:
        values = substituted(step.raw, pipeline.variables, lambda: "<reference model>",
                             lambda step_id: f"<output of {step_id}>")
        validated(step, values, where)
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
        for ref in REFERENCE.findall(str(value)):
            if ref != "builtin.reference":
                raise ConfigError(f"{where}: key 'vars.{name}': unknown reference ${{{ref}}} "
                                  "(a variable may only refer to ${builtin.reference})")
    seen: set[str] = set()
    for step in pipeline.steps:
        for text in _strings(step.raw):
            for ref in REFERENCE.findall(text):
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


def substituted(value: Any, variables: dict[str, Any], builtin: Callable[[], str],
                step_output: Callable[[str], str]) -> Any:
    """`value` with every ${...} reference replaced, in strings nested at any depth."""

    def one(match: re.Match) -> str:
        parts = match.group(1).split(".")
        if parts[0] == "vars":
            # a variable's value may itself name ${builtin.reference}
            return REFERENCE.sub(one, str(variables[parts[1]]))
        if parts[0] == "builtin":
            return builtin()
        return step_output(parts[1])

    if isinstance(value, str):
        return REFERENCE.sub(one, value)
    if isinstance(value, dict):
        return {k: substituted(v, variables, builtin, step_output) for k, v in value.items()}
    if isinstance(value, list):
        return [substituted(v, variables, builtin, step_output) for v in value]
    return value


def validated(step: Step, values: dict[str, Any], where: str) -> StepParams:
    try:
        return step.kind.params.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        key = f"'{step.kind.name}.{loc}'" if loc else f"'{step.kind.name}'"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{where}: step '{step.id}': key {key}: {message}") from None
