"""Shared benchmark plumbing: one worker process per Keras backend, interleaved timing, RESULTS.md sections.

Timings on a shared 2-core machine drift by +-15% between runs, so every worker times its
contenders in turn, iteration by iteration, in the same process, and ratios are computed from
those paired medians rather than from runs made minutes apart.
"""

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
BACKENDS = ("jax", "torch", "tensorflow")


def run_worker(script: str, backend: str, args: list[str], timeout: int = 1800, python: str | None = None) -> dict:
    """Runs `script --worker` under `backend` (with `python`, default this one) and returns the JSON it prints last."""
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([python or sys.executable, script, "--worker", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{backend} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def interleaved(contenders: dict[str, Callable[[], object]], iterations: int, pause: float = 0.3) -> dict[str, list[float]]:
    """Seconds per call of each contender, timed in turn; each is called once first to warm up.

    The pause lets the previous library's spinning worker threads go idle before the next starts.
    """
    for fn in contenders.values():
        fn()
    times = {name: [] for name in contenders}
    for _ in range(iterations):
        for name, fn in contenders.items():
            time.sleep(pause)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_section(name: str, body: str) -> None:
    """Replaces (or appends) the section between `<!-- name:start -->` and `<!-- name:end -->` in RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    stamp = datetime.date.today().isoformat()
    block = f"<!-- {name}:start -->\n{body.rstrip()}\n\n_Measured {stamp} on {machine()}._\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in ("keras", "jax", "torch", "tensorflow", "tensorflow-cpu", "transformers", "peft", "keras-hub"):
        try:
            out.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)
