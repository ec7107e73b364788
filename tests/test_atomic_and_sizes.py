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



def test_a_failed_run_removes_the_parent_folders_it_created(area):
    target = area / "a" / "b" / "c" / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("failed in the middle")
    assert os.listdir(area) == []
    (area / "a").mkdir()
    (area / "a" / "keep").write_text("mine")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target):
            raise RuntimeError("failed again")
    assert sorted(p.name for p in area.rglob("*")) == ["a", "keep"]  # a folder the user had stays


@pytest.mark.parametrize("umask, directory_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_outputs_follow_the_umask(area, umask, directory_mode, file_mode):
    previous = os.umask(umask)
    try:
        with atomic_output_dir(area / "out") as tmp:
            (tmp / "weights").write_text("w")
        atomic_write_text(area / "models.json", "{}")
    finally:
        os.umask(previous)
    assert (area / "out").stat().st_mode & 0o777 == directory_mode
    assert (area / "models.json").stat().st_mode & 0o777 == file_mode


def test_a_replaced_file_keeps_its_mode(area):
    path = area / "models.json"
    path.write_text("{}")
    path.chmod(0o600)
    atomic_write_text(path, '{"models": {}}')
    assert path.stat().st_mode & 0o777 == 0o600


def test_an_unwritable_folder_is_named_by_its_flag_not_by_a_hidden_path(area):
    """A real EPERM: root ignores modes, but not the immutable attribute (skipped where chattr is refused)."""
    import subprocess

    from orion_cli.atomic import OutputPermissionError

    locked = area / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here")
    try:
        with pytest.raises(OutputPermissionError) as caught:
            with atomic_output_dir(locked / "out", flag="--output"):
                pass
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    message = str(caught.value)
    assert message.startswith(f"--output {locked / 'out'}: permission denied")
    assert ".orion-tmp-" not in message
    assert os.listdir(locked) == []


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
