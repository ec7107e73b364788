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
