"""`zoo serve` under load: aggregate tokens/s, latency and time to first token at 1, 8 and 32 clients.

The server runs as its own process (`zoo serve`, one backend); clients are asyncio tasks with
httpx, each streaming completions back to back (`stream: true`, `ignore_eos: true`, so every
request makes exactly `--max-tokens` tokens), prompts of different lengths. Models: the bundled
`gemma_tiny_pycode`, and the generation benchmark's shape (vocab 32000, hidden 512, 8 layers,
random weights; benchmarks/generate.py) with the bundled tokenizer.

`--adapters N` instead compares a base-only server with one serving N LoRA adapters over the same
base (`--lora`), the clients spread over the adapters and the base (client i asks model i mod N+1).

Usage:
    python benchmarks/serve.py [--backend jax] [--clients 1,8,32] [--requests 3] [--max-tokens 64] [--write]
    python benchmarks/serve.py --adapters 4 --clients 8 [--adapter-targets q_proj,v_proj] [--write]
"""

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import versions, write_section  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
PROMPTS = ["def ", "import os\nimport sys\n", "class Stack:\n    def __init__(self):\n", "for i in range(10):\n    ",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", "x = [", "with open(path) as f:\n",
           "try:\n    import numpy as np\nexcept ImportError:\n"]


def bench_folder() -> Path:
    """The generation benchmark's checkpoint with the bundled LM's tokenizer."""
    import generate

    generate.make_checkpoint()
    folder = OUT / "gemma_bench_serve"
    if not (folder / "tokenizer.json").exists():
        shutil.copytree(generate.FOLDER, folder, dirs_exist_ok=True)
        bundled = Path(__file__).resolve().parent.parent / "presets" / "gemma_tiny_pycode"
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(bundled / name, folder / name)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def client(http, model, index: int, requests: int, max_tokens: int, records: list,
                 logprobs: int | None = None) -> None:
    """`requests` streamed completions back to back; `model` a name, or a list that clients take in turn."""
    model = model[index % len(model)] if isinstance(model, list) else model
    for r in range(requests):
        body = {"model": model, "prompt": PROMPTS[(index + r) % len(PROMPTS)], "max_tokens": max_tokens,
                "temperature": 0 if index % 2 == 0 else 0.8, "seed": index, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        if logprobs is not None:
            body["logprobs"] = logprobs
        start = time.perf_counter()
        first, tokens, ok = None, 0, False
        try:
            async with http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    records.append({"error": response.status_code})
                    continue
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        ok = True
                        break
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0]["text"] and first is None:
                        first = time.perf_counter() - start
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
        except Exception as e:  # counted, not hidden
            records.append({"error": repr(e)})
            continue
        records.append({"latency": time.perf_counter() - start, "ttft": first, "tokens": tokens} if ok
                       else {"error": "stream ended without [DONE]"})


async def phase(url: str, model, clients: int, requests: int, max_tokens: int, logprobs: int | None = None) -> dict:
    import httpx

    records: list = []
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http, model, i, requests, max_tokens, records, logprobs) for i in range(clients)))
        wall = time.perf_counter() - start
    good = [r for r in records if "error" not in r]
    lat = sorted(r["latency"] for r in good)
    ttft = sorted(r["ttft"] for r in good if r["ttft"] is not None)

    def pct(values, q):
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {"clients": clients, "requests": len(records), "errors": len(records) - len(good),
            "tokens_per_s": sum(r["tokens"] for r in good) / wall, "p50_s": statistics.median(lat) if lat else None,
            "p99_s": pct(lat, 0.99), "ttft_p50_s": statistics.median(ttft) if ttft else None, "ttft_p99_s": pct(ttft, 0.99)}


def start_server(backend: str, options: list[str]) -> tuple[subprocess.Popen, str]:
    """`zoo serve OPTIONS` as its own process on a free port, once its /health answers 200: (process, url)."""
    import httpx

    port = free_port()
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "zoo.cli", "serve", *options, "--port", str(port)]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"zoo serve exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.terminate()
            raise RuntimeError("zoo serve did not become ready")
        time.sleep(0.5)


def run_model(preset: str, name: str, backend: str, client_counts: list[int], requests: int, max_tokens: int,
              max_batch: int) -> list[dict]:
    server, url = start_server(backend, [preset, "--max-batch", str(max_batch), "--max-queue", "256",
                                         "--max-model-len", "256"])
    try:
        asyncio.run(phase(url, name, 2, 1, 8))  # warm the sockets and samplers
        rows = []
        for clients in client_counts:
            row = asyncio.run(phase(url, name, clients, requests, max_tokens))
            print(json.dumps({"model": name, **row}), flush=True)
            rows.append(row)
        return rows
    finally:
        server.terminate()
        server.wait(timeout=60)


def compare_logprobs(backend: str, clients: int, requests: int, max_tokens: int, max_batch: int, top: int) -> str:
    """The tiny model at `clients` clients with logprobs off and on (`top` alternatives), alternating on one server."""
    server, url = start_server(backend, ["gemma_tiny_pycode", "--max-batch", str(max_batch), "--max-model-len", "256"])
    try:
        asyncio.run(phase(url, "gemma_tiny_pycode", 2, 1, 8, top))  # warm up both paths
        runs = {"off": [], "on": []}
        for _ in range(3):
            for key, value in (("off", None), ("on", top)):
                runs[key].append(asyncio.run(phase(url, "gemma_tiny_pycode", clients, requests, max_tokens, value)))
    finally:
        server.terminate()
        server.wait(timeout=60)
    med = {k: {f: statistics.median(r[f] for r in rows) for f in ("tokens_per_s", "ttft_p50_s", "p50_s")}
           for k, rows in runs.items()}
    lines = [f"### `zoo serve` logprobs off vs on ({backend}, gemma_tiny_pycode, {clients} clients, {max_tokens} "
             f"tokens, logprobs={top}; medians of 3 alternating runs)", "",
             "| logprobs | tokens/s | TTFT p50 s | latency p50 s |", "|---|---|---|---|"]
    for key, m in med.items():
        lines.append(f"| {key} | {m['tokens_per_s']:.0f} | {m['ttft_p50_s']:.3f} | {m['p50_s']:.2f} |")
    ratio = med["on"]["tokens_per_s"] / med["off"]["tokens_per_s"]
    lines += ["", f"On/off throughput: {ratio:.2f}x. Command: `python benchmarks/serve.py --backend {backend} "
              f"--logprobs {top} --clients {clients} --write`"]
    return "\n".join(lines)


def make_adapters(count: int, targets: str) -> list[str]:
    """`count` random rank-8 adapters of the tiny model (PEFT's layout), as `--lora NAME=PATH` arguments."""
    import numpy as np

    import zoo

    specs = []
    for i in range(count):
        folder = OUT / "serve_adapters" / f"{targets.replace(',', '-')}-{i}"
        if not (folder / "adapter_model.safetensors").exists():
            lm = zoo.GemmaCausalLM.from_preset("gemma_tiny_pycode")
            lm.enable_lora(rank=8, alpha=16, targets=targets if targets == "all-linear" else targets.split(","))
            rng = np.random.default_rng(i)
            for v in lm.trainable_weights:
                v.assign(rng.normal(0, 0.05, v.shape).astype("float32"))
            lm.save_adapter(folder)
        specs += ["--lora", f"lora{i}={folder}"]
    return specs


def compare_adapters(backend: str, count: int, targets: str, clients: int, requests: int, max_tokens: int,
                     max_batch: int, rounds: int = 5) -> str:
    """Aggregate tokens/s of `clients` clients on the base alone (a server without adapters) against the same
    load spread over `count` adapters and the base (one server, one batch), and the base alone on that server."""
    loras = make_adapters(count, targets)
    names = ["gemma_tiny_pycode"] + [f"lora{i}" for i in range(count)]
    common = ["gemma_tiny_pycode", "--max-batch", str(max_batch), "--max-model-len", "256"]
    runs = {"base server, base only": [], "adapter server, mixed": [], "adapter server, base only": []}
    for _ in range(rounds):  # servers one at a time (2 cores); rounds alternate them
        for options, loads in ((common, {"base server, base only": "gemma_tiny_pycode"}),
                               (common + loras, {"adapter server, mixed": names,
                                                 "adapter server, base only": "gemma_tiny_pycode"})):
            server, url = start_server(backend, options)
            try:
                asyncio.run(phase(url, names if len(loads) > 1 else names[0], len(names), 1, 8))  # warm up
                for key, model in loads.items():
                    runs[key].append(asyncio.run(phase(url, model, clients, requests, max_tokens)))
                    print(key, json.dumps(runs[key][-1]), flush=True)
            finally:
                server.terminate()
                server.wait(timeout=60)
    med = {k: {f: statistics.median(r[f] for r in rows) for f in ("tokens_per_s", "ttft_p50_s", "ttft_p99_s", "p50_s")}
           for k, rows in runs.items()}
    errors = sum(r["errors"] for rows in runs.values() for r in rows)
    lines = [f"### `zoo serve` with {count} LoRA adapters ({backend}, gemma_tiny_pycode, rank 8 on {targets}, "
             f"{clients} clients, {max_tokens} tokens; medians of {rounds} rounds)", "",
             "| load | tokens/s | vs base server (median of the rounds' ratios) | TTFT p50 s | TTFT p99 s | latency p50 s |",
             "|---|---|---|---|---|---|"]
    alone = runs["base server, base only"]
    for key, m in med.items():  # each round's ratio against the base server measured next to it, then the median
        ratio = statistics.median(r["tokens_per_s"] / a["tokens_per_s"] for r, a in zip(runs[key], alone))
        lines.append(f"| {key} | {m['tokens_per_s']:.0f} | {ratio:.2f}x | {m['ttft_p50_s']:.3f} "
                     f"| {m['ttft_p99_s']:.3f} | {m['p50_s']:.2f} |")
    lines += ["", f"Errors: {errors}. Command: `python benchmarks/serve.py --backend {backend} --adapters {count} "
              f"--adapter-targets {targets} --clients {clients} --requests {requests} --write`"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="jax")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=3, help="requests per client, back to back")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16, help="generation slots (zoo serve --max-batch)")
    parser.add_argument("--models", default="tiny,bench")
    parser.add_argument("--logprobs", type=int, default=None,
                        help="instead: the tiny model with logprobs off vs on (this many alternatives), first --clients")
    parser.add_argument("--adapters", type=int, default=None,
                        help="instead: base-only server vs one serving this many adapters, first --clients")
    parser.add_argument("--adapter-targets", default="q_proj,v_proj",
                        help="modules the adapters adapt (default PEFT's for Gemma; or all-linear)")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if args.adapters is not None:
        table = compare_adapters(args.backend, args.adapters, args.adapter_targets, int(args.clients.split(",")[0]),
                                 args.requests, args.max_tokens, args.max_batch)
        print(table)
        if args.write:
            write_section(f"serve_adapters_{args.backend}_{args.adapter_targets.replace(',', '_')}", table)
        return
    if args.logprobs is not None:
        table = compare_logprobs(args.backend, int(args.clients.split(",")[0]), args.requests, args.max_tokens,
                                 args.max_batch, args.logprobs)
        print(table)
        if args.write:
            write_section("serve_logprobs", table)
        return
    counts = [int(c) for c in args.clients.split(",")]
    models = {"tiny": ("gemma_tiny_pycode", "gemma_tiny_pycode"), "bench": None}
    results = {}
    for key in args.models.split(","):
        preset, name = models[key] or (str(bench_folder()), "gemma_bench_serve")
        results[name] = run_model(preset, name, args.backend, counts, args.requests, args.max_tokens, args.max_batch)
    lines = [f"### `zoo serve` ({args.backend}, --max-batch {args.max_batch}), streaming completions of "
             f"{args.max_tokens} tokens, {args.requests} requests per client", "",
             "| model | clients | requests | errors | tokens/s (aggregate) | vs 1 client | p50 latency s | p99 latency s "
             "| TTFT p50 s | TTFT p99 s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        base = next((r["tokens_per_s"] for r in rows if r["clients"] == 1), None)
        for r in rows:
            ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
            lines.append(f"| {name} | {r['clients']} | {r['requests']} | {r['errors']} | {r['tokens_per_s']:.0f} | {ratio} "
                         f"| {r['p50_s']:.2f} | {r['p99_s']:.2f} | {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} |")
    lines += ["", f"Command: `python benchmarks/serve.py --backend {args.backend} --clients {args.clients} "
              f"--requests {args.requests} --max-tokens {args.max_tokens} --max-batch {args.max_batch} --write`",
              f"Versions: {versions()}."]
    print("\n".join(lines))
    if args.write:
        write_section("serve", "\n".join(lines))


if __name__ == "__main__":
    main()
