"""What every command shares: option aliases, the resolved config, and output.

Commands are plain annotated functions; options used by more than one command
are declared once here. Human output goes to stdout as rich tables; with --json
stdout carries exactly one JSON document and everything else goes to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

from ..config import OrionConfig, load_config
from .progress import RichProgress

# -- option aliases ----------------------------------------------------------

ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", metavar="FILE", help="YAML file overriding configs/default.yaml (or ORION_CONFIG).", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout; logs and progress go to stderr.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs, and tracebacks on errors.")]
RegistryOpt = Annotated[
    Optional[Path],
    typer.Option("--registry", metavar="PATH", help="Registry file (default: models.json in the current directory, or ORION_REGISTRY).", show_default=False),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
RegisterOpt = Annotated[
    Optional[str],
    typer.Option("--register", metavar="KEY", help="Register the output in the registry under KEY.", show_default=False),
]
OutputOpt = Annotated[
    Optional[Path],
    typer.Option("--output", "-o", metavar="DIR", help="Output directory, written atomically (default: <output_root>/<derived name>).", show_default=False),
]
ModelOpt = Annotated[str, typer.Option("--model", "-m", metavar="DIR|KEY", help="Model directory or registry key.", show_default=False)]


# -- state shared by the error boundary and the commands -----------------------


@dataclass
class CliState:
    config_file: Path | None = None
    json: bool = False
    verbose: bool = False
    _config: OrionConfig | None = field(default=None, repr=False)

    def config(self) -> OrionConfig:
        if self._config is None:
            self._config = load_config(self.config_file)
        return self._config

    def registry_path(self, flag: Path | None) -> Path:
        return flag if flag is not None else Path(self.config().registry)


STATE = CliState()


def reset_state() -> None:
    STATE.__init__()


def use(json_output: bool = False, verbose: bool = False) -> CliState:
    """Fold a command's own --json/--verbose into the global ones and set up logging."""
    STATE.json = STATE.json or json_output
    STATE.verbose = STATE.verbose or verbose
    setup_logging(STATE.verbose)
    return STATE


# -- output --------------------------------------------------------------------


def stdout_console() -> Console:
    # Piped output is read by programs and wide terminals; don't cut tables at 80 columns.
    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)


def stderr_console() -> Console:
    return Console(stderr=True)


def progress() -> RichProgress:
    return RichProgress(stderr_console())


def emit(result: Any, render: Callable[[Console], None] | None = None) -> None:
    """The command's result: JSON on stdout with --json, else `render` (or a plain dump)."""
    if STATE.json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
        sys.stdout.flush()
        return
    console = stdout_console()
    if render is not None:
        render(console)
    else:
        console.print_json(json.dumps(result, default=str))


def info(message: str) -> None:
    """A status line for humans, on stderr (never mixed into --json output)."""
    stderr_console().print(message, highlight=False)


def setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logger = logging.getLogger("orion_cli")
    logger.setLevel(level)
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        handler = RichHandler(console=stderr_console(), show_time=False, show_path=verbose, markup=False)
        logger.addHandler(handler)
        logger.propagate = False
    if not verbose:
        _quiet_libraries()


def _quiet_libraries() -> None:
    """transformers, optimum and onnxruntime are chatty; their warnings are noise for our users."""
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("transformers", "optimum", "onnxruntime", "mergekit", "torch", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
