"""CLI options generated from the config's section models, as mergekit generates its click options.

A command declares only what is its own (--model, --output, --test, ...) and
asks for a section's settings with @settings_options(QuantizeSettings, "quantize"):
each field of the section becomes an option (--block-size for block_size),
its help is the field's description plus the config key and the shipped
default, and the values given reach the command as `flags`, ready for
config.override(). Choices are validated there, so an error names the flag
the same way whether a value came from the command line or a pipeline.
"""

from __future__ import annotations

import functools
import inspect
import re
import types
import typing
from typing import Annotated, Any, Callable, Iterable, Literal, Optional

import typer
from pydantic import BaseModel
from typer.core import TyperCommand

from ..config import flag_of, shipped_config
from .common import STATE, ForceOpt, OutputOpt, RegisterOpt, RegistryOpt


def _scalar(annotation: Any) -> tuple[type, str | None]:
    """The click type of a field's annotation, and a metavar listing its choices (for Literals)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _scalar(typing.get_args(annotation)[0])
    if origin is Literal:
        return str, "|".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if all(m in (int, str) for m in members) and str in members:
            return str, None  # a size: 500, 500MB
        return _scalar(members[0])
    return annotation, None


def _option(section_key: str, name: str, info: Any) -> Any:
    kind, choices = _scalar(info.annotation)
    extra = info.json_schema_extra or {}
    flag = flag_of(name)
    names = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
    if extra.get("short"):
        names.append(extra["short"])
    default = getattr(getattr(shipped_config(), section_key), name)
    shown = "null" if default is None else str(default).replace("\n", "\\n")
    help_text = f"{info.description} (config: {section_key}.{name}, default {shown})"
    option = typer.Option(*names, metavar=extra.get("metavar") or choices, help=help_text, show_default=False)
    return Annotated[Optional[kind], option]


def settings_options(section: type[BaseModel], section_key: str, exclude: Iterable[str] = ()):
    """Add one option per field of `section` to the decorated command; it receives them as `flags`."""
    skip = set(exclude)
    fields = [name for name, info in section.model_fields.items()
              if name not in skip and (info.json_schema_extra or {}).get("cli", True)]
    generated = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                   annotation=_option(section_key, name, section.model_fields[name]))
                 for name in fields]

    def collect(kwargs: dict[str, Any]) -> dict[str, Any]:
        return {name: kwargs.pop(name) for name in fields}

    return _extend(generated, "flags", collect)


def producing_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--output, --force, --register and --registry for a command that writes a model; it receives an `output`
    (producing.Output) whose registry is the --registry flag, else the config's."""
    generated = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
                 for name, annotation, default in (("output", OutputOpt, None), ("force", ForceOpt, False),
                                                   ("register", RegisterOpt, None), ("registry", RegistryOpt, None))]

    def collect(kwargs: dict[str, Any]) -> Any:
        from ..producing import Output

        path, force, register, registry = (kwargs.pop(name) for name in ("output", "force", "register", "registry"))
        return Output(path, force, register, STATE.registry_path(registry), STATE.config().output_root)

    return _extend(generated, "output", collect)(command)


def _extend(generated: list[inspect.Parameter], receives: str, collect: Callable[[dict[str, Any]], Any]):
    """A decorator adding `generated` parameters to a command's signature (before --json/--verbose); `collect`
    takes their values out of the call and the command receives what it makes as its `receives` argument."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values()
               if p.name != receives]
        first = [p for p in own if p.name not in _TRAILING]
        last = [p for p in own if p.name in _TRAILING]
        parameters = first + generated + last

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            return command(**{receives: collect(kwargs)}, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate


_TRAILING = ("json_output", "verbose")
_NUMBER = re.compile(r"^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class VariadicCommand(TyperCommand):
    """A command whose `variadic` options take every value up to the next option: --models A B C.

    click gives an option one value per occurrence; here the parser's own option
    object takes the following values too, as the scripts users had did. A
    negative number counts as a value, so '--ratios 0.5 -0.5' reaches the check
    that names the negative ratio.
    """

    variadic: tuple[str, ...] = ()

    def make_parser(self, ctx):
        parser = super().make_parser(ctx)
        for name in self.variadic:
            option = parser._long_opt[name]  # click's parser has no public hook for this
            option.process = _greedy(option.process)
        return parser


def _greedy(process: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    def take_following(value: Any, state: Any) -> None:
        process(value, state)
        while state.rargs and (not state.rargs[0].startswith("-") or _NUMBER.match(state.rargs[0])):
            process(state.rargs.pop(0), state)

    return take_following


def variadic(*names: str) -> type[VariadicCommand]:
    return type("VariadicCommand", (VariadicCommand,), {"variadic": names})
