"""`zoo serve` under hostile load: 48 clients mixing streams, plain requests, uploads, bombs and disconnects.

The server runs as its own process (`zoo serve` with the bundled presets, one backend). For
`--seconds`, 48 client threads each loop over a random mix: streamed and plain completions, chat
completions, classify uploads (JSON and multipart), a decompression bomb (a PNG of a few KB that
declares 12000 x 12000 pixels), a chunked multipart body past the size limit, and clients that
disconnect mid-stream or give up on a plain request. Meanwhile `/health` is polled every 0.1 s
and the server's RSS sampled. Reported: `/health` latency (max and p99), the longest stall
between two chunks of a stream, RSS idle and at most, and what every request ended in; any 5xx,
malformed answer or client exception counts as a failure.

Usage:
    python benchmarks/hostile_load.py [--backend jax] [--seconds 60] [--clients 48] [--write]
"""

import argparse
import base64
import collections
import io
import json
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import versions, write_section  # noqa: E402
from serve import start_server  # noqa: E402

LM, VIT = "gemma_tiny_pycode", "vit_tiny_digits"


def _png(width: int, height: int, mode: str = "L") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def _chunked_multipart(total: int):
    boundary = "zooload"
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    yield part
    for _ in range(total // 65536):
        yield b"\0" * 65536
    yield f"\r\n--{boundary}--\r\n".encode()


class Load:
    def __init__(self, url: str, seconds: float, clients: int, seed: int = 0):
        self.url, self.seconds, self.clients = url, seconds, clients
        self.outcomes = collections.Counter()
        self.failures: list[str] = []
        self.stalls: list[float] = []
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        digits = Path(__import__("zoo").presets.get(VIT).folder) / "samples"
        self.image = sorted(digits.glob("digit_*.png"))[0].read_bytes()
        self.bomb = _png(12000, 12000)

    def record(self, kind: str, response=None, error: str | None = None) -> None:
        with self.lock:
            if error is not None:
                self.failures.append(f"{kind}: {error}")
                return
            status = response.status_code
            if status >= 500:
                self.failures.append(f"{kind}: {status} {response.text[:200]}")
            elif status >= 400:
                body = response.json()  # a 4xx must be OpenAI's error JSON
                assert set(body["error"]) >= {"message", "type", "param", "code"}, body
            self.outcomes[f"{kind} {status}"] += 1

    def stream(self, http, disconnect: bool) -> None:
        body = {"model": LM, "prompt": "def ", "max_tokens": 48, "temperature": 0, "stream": True, "ignore_eos": True}
        with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                return self.record("stream", response)
            last, chunks = None, 0
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                now = time.monotonic()
                if last is not None:
                    with self.lock:
                        self.stalls.append(now - last)
                last, chunks = now, chunks + 1
                if disconnect and chunks == 3:
                    break
            self.record("stream (disconnects)" if disconnect else "stream", response)

    def one(self, http) -> None:
        import httpx

        kind = self.rng.choice(["stream", "stream", "plain", "chat", "classify", "upload", "bomb", "oversize",
                                "disconnect stream", "give up plain"])
        if kind in ("stream", "disconnect stream"):
            return self.stream(http, kind == "disconnect stream")
        if kind == "plain":
            body = {"model": LM, "prompt": "import ", "max_tokens": 32, "temperature": 0.7, "seed": 1}
            return self.record(kind, http.post("/v1/completions", json=body))
        if kind == "chat":
            body = {"model": LM, "messages": [{"role": "user", "content": "hi<end_of_turn>"}], "max_tokens": 16}
            return self.record(kind, http.post("/v1/chat/completions", json=body))
        if kind == "classify":
            body = {"model": VIT, "images": [base64.b64encode(self.image).decode()] * 4, "top_k": 3}
            return self.record(kind, http.post("/v1/classify", json=body))
        if kind == "upload":
            files = [("image", ("d.png", self.image, "image/png"))] * 3
            return self.record(kind, http.post("/v1/classify", data={"model": VIT}, files=files))
        if kind == "bomb":
            files = [("image", ("bomb.png", self.bomb, "image/png"))] * 10
            return self.record(kind, http.post("/v1/classify", data={"model": VIT}, files=files))
        if kind == "oversize":
            headers = {"Content-Type": "multipart/form-data; boundary=zooload"}
            return self.record(kind, http.post("/v1/classify", content=_chunked_multipart(24 * 2**20), headers=headers))
        body = {"model": LM, "prompt": "class ", "max_tokens": 64, "ignore_eos": True}
        try:
            http.post("/v1/completions", json=body, timeout=0.05)
            with self.lock:
                self.outcomes["give up plain (finished first)"] += 1
        except httpx.TimeoutException:
            with self.lock:
                self.outcomes["give up plain (client left)"] += 1

    def client(self, stop: float) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=120) as http:
            while time.monotonic() < stop:
                try:
                    self.one(http)
                except Exception as e:  # a client-side exception is a failure too (a reset, bad JSON, ...)
                    self.record("client", error=f"{type(e).__name__}: {e}"[:200])

    def run(self, pid: int) -> dict:
        import httpx
        import psutil

        process = psutil.Process(pid)
        idle = process.memory_info().rss
        stop = time.monotonic() + self.seconds
        threads = [threading.Thread(target=self.client, args=(stop,)) for _ in range(self.clients)]
        for t in threads:
            t.start()
        health, peak = [], idle
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while any(t.is_alive() for t in threads):
                start = time.monotonic()
                ok = http.get("/health").status_code == 200
                health.append(time.monotonic() - start if ok else float("inf"))
                peak = max(peak, process.memory_info().rss)
                time.sleep(0.1)
        for t in threads:
            t.join()
        health.sort()
        return {"health_max_s": health[-1], "health_p99_s": health[int(0.99 * (len(health) - 1))],
                "health_polls": len(health), "stall_max_s": max(self.stalls, default=0.0),
                "stall_p99_s": sorted(self.stalls)[int(0.99 * (len(self.stalls) - 1))] if self.stalls else 0.0,
                "rss_idle_mib": idle / 2**20, "rss_peak_mib": peak / 2**20,
                "requests": sum(self.outcomes.values()), "outcomes": dict(sorted(self.outcomes.items())),
                "failures": self.failures[:20], "failure_count": len(self.failures)}


def main() -> None:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="jax")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    server, url = start_server(args.backend, ["--max-batch", "8", "--max-queue", "64"])
    try:
        load = Load(url, args.seconds, args.clients)
        load.one(httpx.Client(base_url=url, timeout=120))  # warm up
        result = load.run(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(json.dumps(result, indent=1))
    verdict = [
        f"/health max {result['health_max_s']:.3f} s (p99 {result['health_p99_s']:.3f} s) over "
        f"{result['health_polls']} polls: {'met' if result['health_max_s'] < 0.5 else 'NOT met'} (< 0.5 s)",
        f"longest stall between stream chunks {result['stall_max_s']:.3f} s (p99 {result['stall_p99_s']:.3f} s): "
        f"{'met' if result['stall_max_s'] <= 0.5 else 'NOT met'} (<= 0.5 s)",
        f"RSS idle {result['rss_idle_mib']:.0f} MiB, peak {result['rss_peak_mib']:.0f} MiB (+"
        f"{result['rss_peak_mib'] - result['rss_idle_mib']:.0f}): "
        f"{'met' if result['rss_peak_mib'] - result['rss_idle_mib'] <= 300 else 'NOT met'} (<= +300 MiB)",
        f"{result['requests']} requests, {result['failure_count']} failures (5xx, malformed errors, client exceptions)",
    ]
    print("\n".join(verdict))
    if args.write:
        rows = "\n".join(f"| {k} | {v} |" for k, v in result["outcomes"].items())
        write_section(f"hostile_load_{args.backend}", (
            f"## `zoo serve` under hostile load ({args.backend}, {args.clients} clients, {args.seconds:.0f} s)\n\n"
            f"Command: `python benchmarks/hostile_load.py --backend {args.backend} --seconds {args.seconds:.0f} "
            f"--clients {args.clients} --write`\n\n" + "\n".join(f"- {v}" for v in verdict)
            + "\n\n| request kind and status | count |\n|---|---|\n" + rows + f"\n\nVersions: {versions()}."))


if __name__ == "__main__":
    main()
