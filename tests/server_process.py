"""`orion serve` as a child process: start it, wait until it is ready, stop it, prove nothing is left.

Test support, used by the tests and by benchmarks/bench_serve.py. Every process the server
starts (torchrun's agent, the workers, whatever they start) inherits a tag in
its environment, so leftovers are found by tag even after they were
re-parented to init, and killed.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TAG_ENV = "ORION_PROCESS_TAG"


class ServerProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None):
        self.args = [str(a) for a in args]
        self.tag = uuid.uuid4().hex
        self.env = {**os.environ, **(env or {}), TAG_ENV: self.tag, "HF_HUB_OFFLINE": "1"}
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.events: "queue.Queue[dict[str, Any]]" = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.stderr_lines: list[str] = []
        self.ready: dict[str, Any] | None = None

    # -- starting ------------------------------------------------------------------

    def start(self) -> "ServerProcess":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orion_cli", "serve", *self.args, "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env, cwd=self.cwd,
            start_new_session=True,
        )
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        return self

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.seen.append(event)
            self.events.put(event)

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line.rstrip("\n"))

    def wait_event(self, kind: str, timeout: float = 240.0) -> dict[str, Any]:
        """The next stdout event of `kind` (ready, joined, stopped); RuntimeError if the server ends first."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"no '{kind}' event within {timeout:.0f} s; stderr:\n{self.stderr}")
            try:
                event = self.events.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None and self.events.empty():
                    time.sleep(0.2)  # let the readers finish
                    if self.events.empty():
                        raise RuntimeError(f"orion serve exited with {self.proc.returncode} before '{kind}'; "
                                           f"stderr:\n{self.stderr}") from None
                continue
            if event.get("event") == kind:
                if kind == "ready":
                    self.ready = event
                return event

    def wait_ready(self, timeout: float = 240.0) -> str:
        return self.wait_event("ready", timeout)["url"]

    @property
    def url(self) -> str:
        assert self.ready is not None, "the server is not ready"
        return self.ready["url"]

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    # -- stopping ------------------------------------------------------------------

    def tagged_processes(self) -> list[Any]:
        """Live processes started by this server (by environment tag), the server itself included."""
        import psutil

        found = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if proc.pid != os.getpid() and proc.environ().get(TAG_ENV) == self.tag \
                        and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90.0) -> int | None:
        """Signal the server and wait for it; returns its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill_leftovers(self, grace: float = 10.0) -> list[str]:
        """Wait up to `grace` s for tagged processes to end; kill those left and describe them."""
        deadline = time.monotonic() + grace
        left = self.tagged_processes()
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = self.tagged_processes()
        described = []
        for proc in left:
            try:
                described.append(f"pid {proc.pid}: {' '.join(proc.cmdline())[:120]}")
                proc.kill()
            except Exception:  # noqa: BLE001 - it ended meanwhile
                pass
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        return described

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.kill_leftovers()


@contextmanager
def serving(*args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None):
    """A ready server for a test module; stopped after it, failing if any process it started is left behind."""
    process = ServerProcess(*args, env=env, cwd=cwd).start()
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()
        leftovers = process.kill_leftovers()
        assert not leftovers, f"processes left behind: {leftovers}"
