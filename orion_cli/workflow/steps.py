"""The step kinds of a pipeline, registered by decorator: each is one library call.

A step's parameters are derived from the config section its call takes: every
field of QuantizeSettings is a key of a `quantize:` step (left out: the
config's value), beside what the call itself needs (model, output, ...). The
step's function turns its parameters into a Prepared call, which also says
what provenance that call records, so `orion run` can tell an output that is
up to date from one that is not by what was really recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from ..config import (CodecSettings, MergeSettings, QuantizeSettings, ServeSettings, ShardSettings, override,
                      shipped_config)
from ..progress import ProgressReporter

RunCall = Callable[[ProgressReporter], Optional[Path]]


class StepParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    _section: ClassVar[type[BaseModel] | None] = None

    def given(self, section: type[BaseModel]) -> dict[str, Any]:
        """The settings of `section` this step sets (None: the config's value)."""
        return {name: getattr(self, name) for name in section.model_fields if getattr(self, name) is not None}

    @model_validator(mode="after")
    def _settings_are_valid(self) -> "StepParams":
        """What the section's own validators say of the values given (a block size of 48), before anything runs."""
        section = type(self)._section
        if section is not None and self.given(section):
            shipped = getattr(shipped_config(), _SECTION_KEYS[section])
            section.model_validate({**shipped.model_dump(), **self.given(section)})
        return self


def params_model(model_name: str, section: type[BaseModel] | None, parent: type[StepParams] = StepParams,
                 **own: Any) -> type[StepParams]:
    """A step's parameters: its own keys, plus every field of `section`, optional (None: the config's)."""
    fields: dict[str, Any] = dict(own)
    for field_name, info in (section.model_fields.items() if section else ()):
        annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        fields.setdefault(field_name, (Optional[annotation], Field(None, description=info.description)))
    model = create_model(model_name, __base__=parent, **fields)
    model._section = section
    return model


_SECTION_KEYS = {QuantizeSettings: "quantize", MergeSettings: "merge", ShardSettings: "shard", ServeSettings: "serve"}


@dataclass
class Prepared:
    """A step ready to run: its library call, and what that call records as its provenance parameters."""

    call: RunCall
    parameters: dict[str, Any] | None  # None: the step writes no provenance (register, serve)
    shown: dict[str, Any] = field(default_factory=dict)  # what the plan shows: the resolved arguments


@dataclass(frozen=True)
class StepKind:
    name: str
    params: type[StepParams]
    prepare: Callable[[Any, Path | None, Any], Prepared]  # (params, output, run context)
    operation: str | None  # the provenance operation of its output, when it writes one
    inputs: Callable[[Any], list[str]]  # the model references it reads
    has_output: bool


STEP_KINDS: dict[str, StepKind] = {}


def step_kind(name: str, params: type[StepParams], operation: str | None, inputs: Callable[[Any], list[str]]):
    """Declare a step kind by the function that prepares its call."""

    def register(prepare):
        STEP_KINDS[name] = StepKind(name, params, prepare, operation, inputs, "output" in params.model_fields)
        return prepare

    return register


def _shown(model: str | list[str], settings: BaseModel, **more: Any) -> dict[str, Any]:
    key = "models" if isinstance(model, list) else "model"
    return {key: model, **settings.model_dump(exclude_none=True), **{k: v for k, v in more.items() if v is not None}}


MergeParams = params_model("MergeParams", MergeSettings, models=(list[str], Field(min_length=1)),
                           output=(Optional[str], None), ratios=(Optional[list[float]], None),
                           base=(Optional[str], None))


@step_kind("merge", MergeParams, "merge", inputs=lambda p: list(p.models) + ([p.base] if p.base else []))
def _merge(p, output: Path | None, ctx) -> Prepared:
    from ..merge import merge_models, merge_parameters

    settings = override(ctx.config.merge, **p.given(MergeSettings))
    return Prepared(
        lambda progress: merge_models(p.models, ctx.output(output), ratios=p.ratios, base=p.base, settings=settings,
                                      progress=progress).output,
        merge_parameters(p.models, p.ratios, p.base, settings),
        _shown(list(p.models), settings, ratios=p.ratios, base=p.base))


QuantizeParams = params_model("QuantizeParams", QuantizeSettings, model=(str, ...), output=(Optional[str], None),
                              test=(bool, False))


@step_kind("quantize", QuantizeParams, "quantize", inputs=lambda p: [p.model])
def _quantize(p, output: Path | None, ctx) -> Prepared:
    from ..quantize import quantize_model

    settings = override(ctx.config.quantize, **p.given(QuantizeSettings))
    return Prepared(
        lambda progress: quantize_model(p.model, ctx.output(output), settings=settings, test=p.test,
                                        progress=progress).output,
        settings.model_dump(), _shown(p.model, settings, test=p.test or None))


class _OneStrategy(StepParams):
    @model_validator(mode="after")
    def _one_strategy(self) -> "_OneStrategy":
        if (self.shards is None) == (self.max_shard_size is None):
            raise ValueError("give exactly one of shards or max_shard_size")
        return self


ShardParams = params_model("ShardParams", ShardSettings, _OneStrategy, model=(str, ...), output=(Optional[str], None))


@step_kind("shard", ShardParams, "shard", inputs=lambda p: [p.model])
def _shard(p, output: Path | None, ctx) -> Prepared:
    from ..shard import shard_model

    # the step's strategy (one of the two, checked above) replaces the config's whole
    settings = ShardSettings(shards=p.shards, max_shard_size=p.max_shard_size)
    return Prepared(
        lambda progress: shard_model(p.model, ctx.output(output), settings=settings, progress=progress).output,
        settings.model_dump(), _shown(p.model, settings))


RegisterParams = params_model("RegisterParams", None, model=(str, ...), key=(str, ...),
                              name=(Optional[str], None), description=(Optional[str], None))


@step_kind("register", RegisterParams, None, inputs=lambda p: [p.model])
def _register(p, output: Path | None, ctx) -> Prepared:
    from ..registry import register_model, resolve_model_ref

    def call(progress: ProgressReporter) -> None:
        # The pipeline owns its key: a re-run with changed outputs updates the entry.
        path, _ = resolve_model_ref(p.model, ctx.registry)
        register_model(path, p.key, ctx.registry, force=True, name=p.name, description=p.description)

    return Prepared(call, None, {"model": p.model, "key": p.key})


ServeParams = params_model("ServeParams", ServeSettings, model=(str, ...))


@step_kind("serve", ServeParams, None, inputs=lambda p: [p.model])
def _serve(p, output: Path | None, ctx) -> Prepared:
    from ..serve import serve

    settings = override(ctx.config.serve, **p.given(ServeSettings))
    codec: CodecSettings = ctx.config.codec

    def call(progress: ProgressReporter) -> None:
        serve(p.model, settings, codec=codec, registry=ctx.registry, cache_dir=ctx.cache_dir, progress=progress)

    return Prepared(call, None, _shown(p.model, settings))
