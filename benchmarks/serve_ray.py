"""`zoo serve --ray` with 1 and 2 replicas against plain `zoo serve`: aggregate tokens/s through one endpoint.

Each server runs as its own process on the same machine; the clients are benchmarks/serve.py's (streamed
completions back to back, `ignore_eos`, so each request makes exactly `--max-tokens` tokens). A Ray instance
takes a minute to start, so each server is started once and measured `--rounds` times; the table gives medians. On a 2-core machine two replicas share the cores the one used: the
figure checks the mechanism (requests spread over replicas), not a speed-up.

Usage:
    python benchmarks/serve_ray.py [--backend jax] [--clients 32] [--requests 2] [--max-tokens 64] [--rounds 3] [--write]
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import versions, write_section  # noqa: E402
from serve import OUT, free_port, phase  # noqa: E402

PRESET = "gemma_tiny_pycode"


def start_server(backend: str, options: list[str]) -> tuple[subprocess.Popen, str]:
    """`zoo serve OPTIONS` on a free port, its output (Ray's logs are long) in benchmarks/out; once it is ready."""
    port = free_port()
    OUT.mkdir(exist_ok=True)
    log = open(OUT / f"serve_ray_{port}.log", "w")
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", RAY_USAGE_STATS_ENABLED="0")
    server = subprocess.Popen([sys.executable, "-m", "zoo.cli", "serve", *options, "--port", str(port)], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return server, f"http://127.0.0.1:{port}"
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise RuntimeError(f"zoo serve did not become ready; see {log.name}")


def measure(backend: str, options: list[str], args) -> dict:
    started = time.perf_counter()
    server, url = start_server(backend, [PRESET, "--max-batch", "8", "--max-queue", "256", "--max-model-len", "256",
                                         *options])
    ready = time.perf_counter() - started
    family = {p.pid for p in psutil.Process(server.pid).children(recursive=True)}
    try:
        asyncio.run(phase(url, PRESET, 2, 1, 8))  # warm the sockets and samplers
        rounds = [asyncio.run(phase(url, PRESET, args.clients, args.requests, args.max_tokens))
                  for _ in range(args.rounds)]
    finally:
        family |= {p.pid for p in psutil.Process(server.pid).children(recursive=True)}
        server.terminate()
        server.wait(timeout=120)
        for pid in family:  # Ray's node agents outlive its raylet
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
    row = {"ready_s": ready, "errors": sum(r["errors"] for r in rounds)}
    for field in ("tokens_per_s", "p50_s", "ttft_p50_s"):
        row[field] = statistics.median(r[field] for r in rounds)
    print(json.dumps({"options": options, **row}), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="jax")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=2, help="requests per client per round")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = p.parse_args()
    servers = {"zoo serve": [], "zoo serve --ray --replicas 1": ["--ray", "--replicas", "1"],
               "zoo serve --ray --replicas 2": ["--ray", "--replicas", "2"]}
    rows = {name: measure(args.backend, options, args) for name, options in servers.items()}
    plain = rows["zoo serve"]["tokens_per_s"]
    lines = [f"### `zoo serve --ray`: 1 and 2 replicas against one process ({args.backend}, {PRESET}, {args.clients} "
             f"streaming clients x {args.requests} requests x {args.max_tokens} tokens, medians of {args.rounds} rounds)",
             "", "| server | tokens/s | vs zoo serve | latency p50 s | TTFT p50 s | errors | ready after s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| `{name}` | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / plain:.2f}x | {r['p50_s']:.2f} | "
                     f"{r['ttft_p50_s']:.3f} | {r['errors']} | {r['ready_s']:.0f} |")
    lines += ["", f"Versions: {versions()}.", "", "Command: `python benchmarks/serve_ray.py --backend "
              f"{args.backend} --clients {args.clients} --requests {args.requests} --max-tokens {args.max_tokens} "
              f"--rounds {args.rounds} --write`"]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(f"serve-ray-{args.backend}", table)


if __name__ == "__main__":
    main()
