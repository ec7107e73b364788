"""orion serve's generic model path (transformers' own modules, orion's attention and KV cache) against the
hand-written decoder it replaced (issue 12), side by side on the ~110M Llama of bench_serve.py.

Both paths are `orion serve` as a real process: the new one from this tree, the old one from a checkout of
the commit before it (--old-tree, put first on PYTHONPATH). Interleaved, round by round, for tp=1 and tp=2:
time to ready (process start to /health 200), single-stream tokens/s (median of --repeats streamed chat
requests of --tokens tokens, each paired with an in-process transformers generate() of the same length run
just before it), aggregate tokens/s of 8 concurrent clients, and weight bytes per rank.

    git worktree add /tmp/orion-old <commit before the generic path>
    python benchmarks/bench_serve_generic.py --old-tree /tmp/orion-old --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the server-process helper the tests use

from bench_serve import MESSAGES, GenerateReference, build_model, stream_chat  # noqa: E402
from server_process import ServerProcess  # noqa: E402

PATHS = ("old", "new")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_server(model_dir: Path, tp: int, env: dict[str, str], args, reference: GenerateReference) -> dict:
    port = free_port()
    body = {"model": model_dir.name, "messages": MESSAGES, "max_tokens": args.tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "return_token_ids": True}
    started = time.perf_counter()
    with ServerProcess(model_dir, "--tp", str(tp), "--port", str(port), "--max-model-len", "1024",
                       "--max-batch-size", "8", env=env) as server:
        while True:  # process start to /health 200
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {server.stderr[-2000:]}")
            time.sleep(0.05)
        ready_s = time.perf_counter() - started
        server.wait_ready(60)
        url = server.url
        stream_chat(url, {**body, "max_tokens": 4})  # warm-up
        singles, versus = [], []
        for _ in range(args.repeats):
            generate_rate = reference.tokens_per_s(args.tokens)
            _, seconds, count, _ = stream_chat(url, body)
            assert count == args.tokens, count
            singles.append(args.tokens / seconds)
            versus.append(args.tokens / seconds / generate_rate)
        records = []
        lock = threading.Lock()

        def client() -> None:
            record = stream_chat(url, body)
            with lock:
                records.append(record)

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
        assert all(r[2] == args.tokens for r in records)
        return {"ready_s": ready_s, "single": statistics.median(singles), "vs_generate": statistics.median(versus),
                "clients": args.tokens * len(records) / wall,
                "weight_bytes": [r["weight_bytes"] for r in server.ready["ranks"]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-tree", type=Path, required=True, help="a checkout of the hand-written path")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "orion-bench-serve")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model_dir = build_model(args.workdir / "llama-110m")
    envs = {"old": {"PYTHONPATH": str(args.old_tree.resolve())}, "new": {}}
    reference = GenerateReference(model_dir)
    load = [os.getloadavg()[0]]
    results: dict[tuple[str, int], list[dict]] = {}
    try:
        for _ in range(args.rounds):
            for tp in (1, 2):
                for path in PATHS:
                    results.setdefault((path, tp), []).append(run_server(model_dir, tp, envs[path], args, reference))
                    load.append(os.getloadavg()[0])
    finally:
        reference.close()

    def median(path: str, tp: int, key: str) -> float:
        return statistics.median(r[key] for r in results[(path, tp)])

    print(f"model {model_dir} ({args.tokens} tokens per request, {args.rounds} rounds, load average "
          f"{min(load):.2f}-{max(load):.2f})\n")
    print("| tp | figure | hand-written | generic | generic / hand-written |")
    print("|---|---|---|---|---|")
    for tp in (1, 2):
        for key, label in (("single", "single stream, tokens/s"), ("clients", f"{args.clients} clients, tokens/s"),
                           ("ready_s", "time to ready, s"), ("vs_generate", "single stream / generate()")):
            old, new = median("old", tp, key), median("new", tp, key)
            print(f"| {tp} | {label} | {old:.2f} | {new:.2f} | {new / old:.3f} |")
    for path in PATHS:
        tp1 = sum(results[(path, 1)][0]["weight_bytes"])
        tp2 = max(results[(path, 2)][0]["weight_bytes"])
        print(f"\n{path}: weight bytes per rank at tp=2 / tp=1: {tp2 / tp1:.3f} ({tp2 / 1e6:.1f} MB of {tp1 / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
