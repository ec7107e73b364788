"""The generated parts of docs/: every command's --help, and the registry's field table.

docs/cli-reference.md is every command's --help as the CLI prints it; the
field table of docs/registry.md (between its schema-table markers) comes from
models.schema.json. tests/test_docs.py fails when either no longer matches.
Regenerate both after changing a command's help or the schema:

    python tools/generate_docs.py
"""

from __future__ import annotations

import io
import json
import os
import re
from contextlib import redirect_stderr, redirect_stdout
from typing import Iterator

# Help is rendered at a fixed width without colour, so the page does not depend on the terminal.
HELP_ENV = {"TERMINAL_WIDTH": "100", "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "100"}

HEADER = """\
# CLI reference

Every command's `--help`, generated from the CLI itself
(`python tools/generate_docs.py`);
a test fails when this page and the CLI disagree.
"""


def command_paths() -> Iterator[tuple[str, ...]]:
    """Every command and subcommand of `orion`, depth first, in the order --help lists them."""
    import typer

    from orion_cli.cli.app import app

    def walk(command, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        if path:
            yield path
        if hasattr(command, "list_commands"):  # a group (typer vendors its own click)
            context = command.make_context("orion", [], resilient_parsing=True)
            for name in command.list_commands(context):
                yield from walk(command.get_command(context, name), path + (name,))

    yield from walk(typer.main.get_command(app), ())


def help_text(*path: str) -> str:
    """`orion PATH --help` as printed, at the reference width."""
    from orion_cli.cli.app import run

    saved = {k: os.environ.get(k) for k in HELP_ENV}
    os.environ.update(HELP_ENV)
    try:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = run([*path, "--help"])
        if code != 0:
            raise RuntimeError(f"orion {' '.join(path)} --help exited {code}: {err.getvalue()}")
        return "\n".join(line.rstrip() for line in out.getvalue().splitlines()).strip() + "\n"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def reference_page() -> str:
    sections = [HEADER]
    for path in [(), *command_paths()]:
        title = " ".join(("orion", *path))
        sections.append(f"## `{title}`\n\n```text\n{help_text(*path)}```\n")
    return "\n".join(sections)


TABLE_START = "<!-- schema-table:start (generated from models.schema.json) -->"
TABLE_END = "<!-- schema-table:end -->"


def schema_table(schema: dict) -> str:
    """One row per field of a registry entry: name, type, whether required, the schema's description."""
    rows = ["| field | type | required | meaning |", "| --- | --- | --- | --- |"]

    def resolve(node: dict) -> dict:
        while "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        return node

    def kind(node: dict) -> str:
        node = resolve(node)
        if "const" in node:
            return f"`{node['const']}`"
        if "enum" in node:
            return " \\| ".join(f"`{v}`" for v in node["enum"])
        if node.get("type") == "array":
            return f"array of {kind(node.get('items', {}))}"
        return node.get("type", "any") + (" (date-time)" if node.get("format") == "date-time" else "")

    def walk(node: dict, prefix: str) -> None:
        node = resolve(node)
        required = set(node.get("required", []))
        for name, child in node.get("properties", {}).items():
            child_resolved = resolve(child)
            description = child.get("description") or child_resolved.get("description", "")
            rows.append(f"| `{prefix}{name}` | {kind(child)} | {'yes' if name in required else ''} | {description} |")
            walk(child_resolved, f"{prefix}{name}.")
            items = child_resolved.get("items")
            if isinstance(items, dict) and resolve(items).get("properties"):
                walk(items, f"{prefix}{name}[].")

    walk(schema["$defs"]["entry"], "")
    return "\n".join(rows) + "\n"


def registry_page(page_text: str, schema: dict) -> str:
    """docs/registry.md with its field table regenerated."""
    pattern = re.compile(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), re.S)
    if not pattern.search(page_text):
        raise ValueError(f"docs/registry.md has no {TABLE_START} ... {TABLE_END} region")
    return pattern.sub(lambda _: f"{TABLE_START}\n{schema_table(schema)}{TABLE_END}", page_text)


def write_all(repo: "os.PathLike[str] | str") -> None:
    from pathlib import Path

    repo = Path(repo)
    (repo / "docs" / "cli-reference.md").write_text(reference_page())
    schema = json.loads((repo / "models.schema.json").read_text())
    page = repo / "docs" / "registry.md"
    page.write_text(registry_page(page.read_text(), schema))


if __name__ == "__main__":
    from pathlib import Path

    write_all(Path(__file__).resolve().parents[1])
