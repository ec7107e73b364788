"""Atomic output directories and size parsing, shared by every producing command."""

from __future__ import annotations

import os

import pytest

from orion_cli.atomic import atomic_output_dir, atomic_write_text
from orion_cli.errors import OutputExistsError, UsageError
from orion_cli.sizes import parse_size


@pytest.fixture
def area(tmp_path):
    """An empty folder of its own (tmp_path also holds the isolated working directory)."""
    path = tmp_path / "area"
    path.mkdir()
    return path


def test_output_appears_only_on_success(area):
    target = area / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10)
            raise RuntimeError("failed in the middle")
    assert not target.exists()
    assert os.listdir(area) == []  # no temporary sibling left behind

    with atomic_output_dir(target) as tmp:
        (tmp / "whole.bin").write_bytes(b"done")
    assert (target / "whole.bin").read_bytes() == b"done"


def test_existing_output_needs_force(area):
    target = area / "out"
    target.mkdir()
    (target / "keep").write_text("old")
    with pytest.raises(OutputExistsError, match="--force"):
        with atomic_output_dir(target):
            pass
    assert (target / "keep").read_text() == "old"


def test_failed_forced_run_keeps_the_old_output(area):
    target = area / "out"
    target.mkdir()
    (target / "keep").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target, force=True) as tmp:
            (tmp / "new").write_text("new")
            raise RuntimeError("boom")
    assert (target / "keep").read_text() == "old"
    with atomic_output_dir(target, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(os.listdir(target)) == ["new"]
    assert sorted(os.listdir(area)) == ["out"]


def test_atomic_write_text_replaces_whole_file(area):
    path = area / "a.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert os.listdir(area) == ["a.json"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("500", 500 * 10**6),
        ("500MB", 500 * 10**6),
        ("500mb", 500 * 10**6),
        ("2GB", 2 * 10**9),
        ("1.5GiB", int(1.5 * 2**30)),
        ("64KiB", 64 * 1024),
        ("100 B", 100),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "ten", "5XB", "-3GB", "0", "1e9"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError, match="--max-shard-size"):
        parse_size(text)
