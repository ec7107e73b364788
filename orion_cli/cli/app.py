"""The `orion` command: assembles the subcommands and holds the error boundary.

Exit codes: 0 success, 1 failure, 2 usage error (bad flags, bad config), 130 interrupted.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional, Sequence

import typer
from typer._click.exceptions import NoArgsIsHelpError

from .. import __version__
from ..errors import EXIT_INTERRUPTED
from . import errors as cli_errors
from .common import STATE, ConfigOpt, JsonOpt, VerboseOpt, reset_state
from .demo_cmd import demo
from .merge_cmd import MergeCommand, merge
from .quantize_cmd import quantize
from .registry_cmd import models_app, register
from .serve_cmd import serve
from .run_cmd import run as run_command
from .shard_cmd import shard

app = typer.Typer(
    name="orion",
    help="Prepare large language models (quantize, merge, shard, register) and serve them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Exit codes: 0 success, 1 failure, 2 usage error, 130 interrupted. Docs: docs/README.md",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"orion {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    config: ConfigOpt = None,
    json_output: JsonOpt = False,
    verbose: VerboseOpt = False,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """Prepare large language models and serve them.

    Options before the subcommand apply to all of them; --json and --verbose are
    also accepted after it.
    """
    STATE.config_file = config
    STATE.json = json_output
    STATE.verbose = verbose


# In the order `orion --help` lists them: the preparation steps, the registry, serving, then the wrappers.
app.command("quantize")(quantize)
app.command("merge", cls=MergeCommand)(merge)
app.command("shard")(shard)
app.command("register")(register)
app.add_typer(models_app)
app.command("serve")(serve)
app.command("run")(run_command)
app.command("demo")(demo)


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code; every exception ends here as one line."""
    reset_state()
    command = typer.main.get_command(app)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = command.main(args=args, prog_name="orion", standalone_mode=False)
        if result == EXIT_INTERRUPTED:  # typer turns Ctrl-C into a silent return of 130
            return cli_errors.report(KeyboardInterrupt(), STATE.verbose, STATE.json)
        return result if isinstance(result, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except NoArgsIsHelpError as exc:  # `orion` or a group alone: the help is the answer
        exc.show()
        return exc.exit_code
    except typer.TyperException as exc:  # click's usage errors: one line naming the flag, like every other error
        return cli_errors.report(exc, STATE.verbose, STATE.json or _asks_for_json(args))
    except typer.Abort:
        return cli_errors.report(KeyboardInterrupt(), STATE.verbose, STATE.json)
    except BaseException as exc:  # noqa: BLE001 - the one error boundary
        if isinstance(exc, SystemExit):
            raise
        return cli_errors.report(exc, STATE.verbose, STATE.json)


def _asks_for_json(args: list[str]) -> bool:
    """--json on the command line, even when click failed before it reached that option."""
    return "--json" in (args[: args.index("--")] if "--" in args else args)


def main() -> None:
    sys.exit(run())
