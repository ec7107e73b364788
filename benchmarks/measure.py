"""Wall time and peak resident memory of a command and every process it starts, sampled.

Sampled, not ru_maxrss: on Linux a process's ru_maxrss starts at its parent's
resident size at fork and survives exec, so children of a large process all
report the parent's size; and ru_maxrss of the tree is the largest member, not
the sum. Benchmarks and the memory test (tests/test_quantize_models.py) share it.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass


@dataclass
class Measurement:
    seconds: float
    peak_bytes: int  # the whole tree at its largest
    returncode: int
    stderr: str

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30


def run_measured(command: list[str], interval: float = 0.05, env: dict | None = None,
                 cwd: str | None = None) -> Measurement:
    import psutil

    started = time.perf_counter()
    process = subprocess.Popen([str(c) for c in command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=env, cwd=cwd)
    watched = psutil.Process(process.pid)
    peak = 0
    stderr_chunks: list[bytes] = []
    import threading

    reader = threading.Thread(target=lambda: stderr_chunks.append(process.stderr.read()), daemon=True)
    reader.start()
    while process.poll() is None:
        try:
            tree = [watched, *watched.children(recursive=True)]
            total = 0
            for member in tree:
                try:
                    total += member.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total)
        except psutil.Error:
            pass
        time.sleep(interval)
    seconds = time.perf_counter() - started
    reader.join()
    return Measurement(seconds, peak, process.returncode, b"".join(stderr_chunks).decode(errors="replace"))


def concurrently(clients: int, work) -> tuple[list, float]:
    """Run work(i) in `clients` threads released together; (their results in order, wall seconds from release
    to the last one's end). The benchmarks' N-client aggregates are sum(results) / seconds. A client's
    exception is raised here, after every thread has ended."""
    import threading

    results: list = [None] * clients
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        raise errors[0]
    return results, seconds
