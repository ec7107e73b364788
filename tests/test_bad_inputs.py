"""Every bad input meets the error contract: one line naming what is at fault, the right exit code,
nothing changed on disk, and under --json one JSON error document on stdout.

One table, command × bad input. A case is (id, setup, argv, exit code, message pattern):
`setup` prepares the working directory (a copy of a tiny model in ./mine, a
damaged file, a registry...), `argv` may name what setup made. A new case is one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest

from conftest import invoke


def tree(root: Path) -> dict[str, tuple]:
    """Everything under root: type, size, content hash and mode of each entry."""
    state = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        state[path.relative_to(root).as_posix()] = (path.is_dir(), stat.st_size if digest else 0, digest, stat.st_mode)
    return state


# -- what a case starts from --------------------------------------------------------------


def model(tiny_models, name: str = "mine", arch: str = "llama") -> Path:
    target = Path(name)
    shutil.copytree(tiny_models[arch], target)
    return target


def corrupt(damage: Callable[[Path], None]) -> Callable:
    def setup(tiny_models) -> None:
        damage(model(tiny_models) / "model.safetensors")
    return setup


def truncated(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def garbage(file: Path) -> None:
    file.write_bytes(os.urandom(4096))


def empty(file: Path) -> None:
    file.write_bytes(b"")


def two_models(tiny_models) -> None:
    model(tiny_models, "mine")
    model(tiny_models, "other")


def mine_and_narrower(tiny_models) -> None:
    from tiny_models import build_tiny_model

    model(tiny_models)
    build_tiny_model("llama", "narrower", hidden_size=32, intermediate_size=64)


def model_and_file(tiny_models) -> None:
    model(tiny_models)
    Path("file").write_text("not a directory\n")


def registry(content: str) -> Callable:
    def setup(tiny_models) -> None:
        Path("reg.json").write_text(content)
    return setup


def registered_then_truncated(tiny_models) -> None:
    assert invoke("register", str(model(tiny_models)), "--id", "mine", "--registry", "reg.json").exit_code == 0
    truncated(Path("mine/model.safetensors"))


def mine(tiny_models) -> None:
    model(tiny_models)


TRUNCATED = r"mine/model\.safetensors: tensor .* ends at byte \d+ but the file has \d+; truncated\?"
GARBAGE = r"mine/model\.safetensors: not a safetensors file"
EMPTY = r"mine/model\.safetensors: not a safetensors file \(the file is empty\)"

CASES = [
    # outputs that are, lie inside or contain an input, with --force
    ("quantize-over-source", mine, ["quantize", "--model", "mine", "--output", "mine", "--force"], 2,
     r"--output mine: is --model mine itself"),
    ("quantize-inside-source", mine, ["quantize", "--model", "mine", "--output", "mine/q4", "--force"], 2,
     r"--output mine/q4: lies inside --model mine"),
    ("quantize-around-source", mine, ["quantize", "--model", "./mine", "--output", ".", "--force"], 2,
     r"--output \.: contains --model"),
    ("merge-over-source", two_models, ["merge", "--models", "mine", "other", "--output", "mine", "--force"], 2,
     r"--output mine: is --models mine itself"),
    ("merge-over-second-source", two_models, ["merge", "--models", "mine", "other", "--output", "other/x"], 2,
     r"--output other/x: lies inside --models other"),
    ("shard-over-source", mine, ["shard", "--model", "mine", "--output", "mine", "--shards", "2", "--force"], 2,
     r"--output mine: is --model mine itself"),
    ("shard-around-source", mine, ["shard", "--model", "mine", "--output", ".", "--shards", "2", "--force"], 2,
     r"--output \.: contains --model mine"),
    # damaged weight files, named before any work
    ("register-truncated", corrupt(truncated), ["register", "mine", "--id", "m", "--registry", "reg.json"], 1, TRUNCATED),
    ("register-garbage", corrupt(garbage), ["register", "mine", "--id", "m", "--registry", "reg.json"], 1, GARBAGE),
    ("register-empty", corrupt(empty), ["register", "mine", "--id", "m", "--registry", "reg.json"], 1, EMPTY),
    ("quantize-truncated", corrupt(truncated), ["quantize", "--model", "mine", "--output", "out"], 1, TRUNCATED),
    ("merge-truncated", corrupt(truncated), ["merge", "--models", "mine", "mine", "--output", "out"], 1, TRUNCATED),
    ("shard-garbage", corrupt(garbage), ["shard", "--model", "mine", "--output", "out", "--shards", "2"], 1, GARBAGE),
    ("serve-truncated", corrupt(truncated), ["serve", "mine", "--port", "0"], 1, TRUNCATED),
    ("validate-truncated", registered_then_truncated, ["models", "validate", "--check-files", "--registry", "reg.json"],
     1, r"registry reg\.json: invalid, \d+ problems"),
    # click's own usage errors, as one line naming the flag
    ("unknown-command", mine, ["quantise"], 2, r"No such command 'quantise'"),
    ("unknown-option", mine, ["models", "list", "--bogus"], 2, r"No such option: --bogus"),
    ("shards-not-a-number", mine, ["shard", "--model", "mine", "--output", "out", "--shards", "abc"], 2,
     r"Invalid value for '--shards'"),
    ("port-not-a-number", mine, ["serve", "mine", "--port", "abc"], 2, r"Invalid value for '--port'"),
    ("missing-model", mine, ["quantize", "--output", "out"], 2, r"Missing option '--model'"),
    ("port-out-of-range", mine, ["serve", "mine", "--port", "99999"], 2, r"--port 99999: must be at most 65535"),
    # outputs under a regular file
    ("quantize-under-a-file", model_and_file, ["quantize", "--model", "mine", "--output", "file/out"], 2,
     r"--output file/out: .*file is a file, not a directory"),
    ("merge-under-a-file", lambda t: (two_models(t), Path("file").write_text("x")),
     ["merge", "--models", "mine", "other", "--output", "file/deeper/out"], 2, r"file is a file, not a directory"),
    # a failure inside the output: the folders created for it go too
    ("merge-fails-in-new-folders", mine_and_narrower,
     ["merge", "--models", "mine", "narrower", "--allow-crimes", "--output", "a/b/c/out"], 1,
     r"mergekit could not merge these models"),
    # the registry
    ("list-missing-registry", mine, ["models", "list", "--registry", "missing.json"], 1,
     r"registry missing\.json: no such file"),
    ("show-missing-registry", mine, ["models", "show", "k", "--registry", "missing.json"], 1,
     r"registry missing\.json: no such file"),
    ("remove-missing-registry", mine, ["models", "remove", "k", "--registry", "missing.json"], 1,
     r"registry missing\.json: no such file"),
    ("remove-from-corrupt-registry", registry("{not json"), ["models", "remove", "k", "--registry", "reg.json"], 1,
     r"registry reg\.json: not valid JSON"),
    ("validate-invalid-registry", registry('{"models": {"k": {"id": "k"}}}'),
     ["models", "validate", "--registry", "reg.json"], 1, r"registry reg\.json: \$\.models\.k"),
]


@pytest.mark.parametrize("json_output", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("case_id, setup, argv, code, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(tiny_models, case_id, setup, argv, code, pattern, json_output):
    setup(tiny_models)
    work = Path.cwd()
    before = tree(work)
    result = invoke(*argv, *(["--json"] if json_output else []))
    assert result.exit_code == code, (result.stderr, result.stdout)
    errors = [line for line in result.stderr.splitlines() if line.startswith("orion: error: ")]
    assert len(errors) == 1, result.stderr
    assert re.search(pattern, errors[0]), errors[0]
    assert "Traceback" not in result.stderr
    assert tree(work) == before, "a failed command changed the working directory"
    if json_output:
        document = json.loads(result.stdout)  # exactly one document
        if "error" in document:
            assert document["error"]["exit_code"] == code
            assert re.search(pattern, document["error"]["message"]), document
        else:  # models validate: its verdict is the document, problems listed
            assert document["valid"] is False and document["problems"], document
