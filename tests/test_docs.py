"""The docs cannot drift from the code.

- docs/cli-reference.md is every command's --help, exactly as the CLI prints it.
- Every `orion ...` command line in a shell block of README.md or docs/ parses
  against the CLI: the subcommand, every flag and every choice exist.
- Every Python block compiles, and what it imports from orion_cli exists and is
  called with arguments its signature accepts.
- Blocks marked `<!-- doctest -->` on the line before them are executed for real,
  in a sandbox holding tiny models under the names the docs use (shell blocks
  with bash; a page's Python blocks in one namespace, in order).
- docs/registry.md's field table is generated from models.schema.json, and
  every registry shown in the docs validates against the schema.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from orion_cli.resources import configs_dir
from generate_docs import reference_page, registry_page

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"sh", "bash", "shell", "console"}
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
MARK = "<!-- doctest -->"


@dataclass
class Block:
    page: Path
    line: int
    language: str
    code: str
    marked: bool

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        marked = bool(before) and before[-1].strip() == MARK
        found.append(Block(page, text.count("\n", 0, match.start()) + 1, match.group(1), match.group(2), marked))
    return found


ALL = [b for page in PAGES for b in blocks(page)]


def block_id(block: Block) -> str:
    return block.where


# -- --help -------------------------------------------------------------------------


def test_cli_reference_page_matches_the_cli():
    page = REPO / "docs" / "cli-reference.md"
    assert page.read_text() == reference_page(), (
        "docs/cli-reference.md is out of date: python tools/generate_docs.py"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" not in target and not target.startswith("mailto:"):
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)}: broken link {target}"


# -- command lines --------------------------------------------------------------------


def orion_command_lines(code: str) -> list[list[str]]:
    """`orion ...` invocations in a shell block, continuations joined, split at && ; |."""
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        segment: list[str] = []
        redirected = False
        for word in [*words, "&&"]:
            if word in ("&&", "||", ";", "|"):
                while segment and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", segment[0]):
                    segment.pop(0)  # VAR=value before the command
                if segment and segment[0] == "orion":
                    commands.append(segment[1:])
                segment, redirected = [], False
            elif redirected or re.match(r"\d?>|<", word):
                redirected = True  # a redirection and what follows it are the shell's, not orion's
            else:
                segment.append(word)
    return commands


SHELL_COMMANDS = [(b, argv) for b in ALL if b.language in SHELL for argv in orion_command_lines(b.code)]


def test_the_docs_show_every_command():
    shown = {argv[0] for _, argv in SHELL_COMMANDS if argv and not argv[0].startswith("-")}
    assert {"quantize", "merge", "shard", "register", "models", "serve", "run", "demo"} <= shown


@pytest.mark.parametrize(("block", "argv"), SHELL_COMMANDS, ids=[f"{b.where} orion {' '.join(a)[:60]}" for b, a in SHELL_COMMANDS])
def test_documented_command_line_parses(block, argv):
    import typer

    from orion_cli.cli.app import app

    if "--help" in argv or "-h" in argv or "--version" in argv:
        argv = [a for a in argv if a not in ("--help", "-h", "--version")]
    def remaining(context) -> list[str]:
        # a group keeps its subcommand's name apart from the arguments after it
        return [*(getattr(context, "_protected_args", None) or []), *context.args]

    command = typer.main.get_command(app)
    context = command.make_context("orion", list(argv))
    args = remaining(context)
    while hasattr(command, "list_commands") and args:
        name, command, args = command.resolve_command(context, args)
        assert command is not None, f"{block.where}: orion has no command {name!r}"
        context = command.make_context(name, list(args), parent=context)
        args = remaining(context)


# -- Python blocks ------------------------------------------------------------------------


PYTHON = [b for b in ALL if b.language == "python"]


@pytest.mark.parametrize("block", PYTHON, ids=block_id)
def test_python_block_uses_orion_as_it_is(block):
    tree = ast.parse(block.code, filename=block.where)
    imported: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("orion_cli"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{block.where}: {node.module} has no {alias.name}"
                imported[alias.asname or alias.name] = getattr(module, alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in imported:
            target = imported[node.func.id]
            if not callable(target) or any(isinstance(a, ast.Starred) for a in node.args):
                continue
            signature = inspect.signature(target)
            try:
                signature.bind(*node.args, **{k.arg: k.value for k in node.keywords if k.arg})
            except TypeError as exc:
                pytest.fail(f"{block.where}: {node.func.id}(...) does not match its signature: {exc}")


# -- executed blocks --------------------------------------------------------------------------


EXECUTED_PAGES = sorted({b.page for b in ALL if b.marked})


@pytest.fixture(scope="module")
def docs_models(tmp_path_factory, tiny_models) -> Path:
    """The model names the docs' executed examples use, as tiny models."""
    from tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("docs-models")
    (root / "models").mkdir()
    build_tiny_model("llama", root / "models" / "base", seed=0)
    build_tiny_model("llama", root / "models" / "chat", seed=1)
    build_tiny_model("llama", root / "models" / "code", seed=2)
    return root


def sandbox(tmp_path: Path, docs_models: Path) -> Path:
    work = tmp_path / "docs-sandbox"
    work.mkdir()
    (work / "models").symlink_to(docs_models / "models", target_is_directory=True)
    (work / "configs").symlink_to(configs_dir(), target_is_directory=True)  # as in a checkout
    for name, target in {"my-llama": "base", "chat": "chat", "code": "code"}.items():
        (work / name).symlink_to(docs_models / "models" / target, target_is_directory=True)
    return work


@pytest.mark.slow
@pytest.mark.parametrize("page", EXECUTED_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_marked_examples_run(page, tmp_path, docs_models):
    work = sandbox(tmp_path, docs_models)
    namespace: dict[str, object] = {}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for block in [b for b in blocks(page) if b.marked]:
        if block.language in SHELL:
            script = "\n".join(l[2:] if l.startswith("$ ") else l for l in block.code.splitlines())
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env,
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{block.where} failed:\n{script}\n{done.stderr[-2000:]}"
        elif block.language == "python":
            cwd = Path.cwd()
            os.chdir(work)
            try:
                exec(compile(block.code, block.where, "exec"), namespace)
            finally:
                os.chdir(cwd)
        else:
            pytest.fail(f"{block.where}: only shell and python blocks can be marked {MARK}")


# -- the registry format ---------------------------------------------------------------------------


def test_registry_field_table_is_generated_from_the_schema():
    page = (REPO / "docs" / "registry.md").read_text()
    schema = json.loads((REPO / "models.schema.json").read_text())
    assert page == registry_page(page, schema), (
        "docs/registry.md's field table is out of date: python tools/generate_docs.py"
    )


@pytest.mark.parametrize("block", [b for b in ALL if b.language == "json" and '"models"' in b.code], ids=block_id)
def test_documented_registries_validate_against_the_schema(block):
    import jsonschema

    schema = json.loads((REPO / "models.schema.json").read_text())
    document = json.loads(re.sub(r"<64 hex digits>", "0" * 64, block.code))
    jsonschema.validate(document, schema)
