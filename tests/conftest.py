"""Shared fixtures: an isolated user directory per test, tiny models once per session.

Every test runs in its own empty working directory with no ORION_* variables
from the developer's shell and the Hugging Face hub switched off, so nothing a
test does can read or damage the developer's models.json or reach the network.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tools"))  # the docs generator, which the docs tests compare against


@pytest.fixture(autouse=True)
def isolated_user_dir(tmp_path, monkeypatch):
    for var in list(os.environ):
        if var.startswith("ORION_") and var != "ORION_CACHE_DIR":
            monkeypatch.delenv(var)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


def invoke(*args: str) -> Result:
    """Run the orion CLI in this process, capturing what it prints."""
    from orion_cli.cli.app import run

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = run([str(a) for a in args])
    return Result(code, out.getvalue(), err.getvalue())


def orion_process(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run the orion CLI as a real process (python -m orion_cli)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "orion_cli", *map(str, args)],
        capture_output=True, text=True, env=full_env, **kwargs,
    )


@pytest.fixture
def orion():
    return invoke


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random-init checkpoint per architecture, built once per session."""
    from tiny_models import ARCHITECTURES, build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def reference_model() -> Path:
    """The trained reference model, from the orion cache (built on first use, a few minutes)."""
    from orion_cli.config import load_config
    from orion_cli.reference import ensure_reference_model

    return ensure_reference_model(load_config().cache_path)
