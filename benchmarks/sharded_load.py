"""A Gemma-shaped float32 checkpoint loaded on one device and split over 8 simulated CPU devices (JAX).

The checkpoint (random weights, 8 heads, 8 KV heads, written by transformers' `save_pretrained`) is made
once under benchmarks/out/. Each load runs in a fresh process with 8 CPU devices
(`--xla_force_host_platform_device_count=8`), after its imports, under no distribution or under
`zoo.distribution.model_parallel((1, 8))`; it reports the wall time of `from_preset` and how far the
process's peak RSS (VmHWM) rose above its RSS before the load ("weights": the checkpoint is 1.0x). On simulated
devices each device's memory is this process's, so a load that held whole tensors on every device would
show 8x. Loads alternate; medians of `--repeats`.

Usage:
    python benchmarks/sharded_load.py [--layers 8] [--repeats 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def make_checkpoint(folder: Path, layers: int) -> int:
    """A random Gemma (width 1024, MLP 4096, 8 x 128 heads, 8 KV heads, vocab 16384) of `layers` layers; its
    size in bytes."""
    if not (folder / "model.safetensors").is_file():
        import torch
        from transformers import GemmaConfig, GemmaForCausalLM

        torch.manual_seed(0)
        config = GemmaConfig(vocab_size=16384, hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
                             num_attention_heads=8, num_key_value_heads=8, head_dim=128, dtype="float32")
        GemmaForCausalLM(config).save_pretrained(folder)
    return (folder / "model.safetensors").stat().st_size


CHILD = """
import json, os, sys, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["KERAS_BACKEND"] = "jax"
import psutil, zoo
from zoo import distribution as zd
mesh = json.loads(sys.argv[2])
distribution = zd.model_parallel(tuple(mesh)) if mesh else None
zoo.GemmaCausalLM  # Keras and JAX imported before the clock starts
before = psutil.Process().memory_info().rss
start = time.perf_counter()
lm = zoo.GemmaCausalLM.from_preset(sys.argv[1], distribution=distribution)
seconds = time.perf_counter() - start
# this process's own high-water mark (ru_maxrss would count the parent's pages from before exec)
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"seconds": seconds, "rise": peak - before}))
"""


def measure(folder: Path, mesh: tuple[int, int] | None) -> dict:
    """One load in a fresh process: seconds and the peak RSS's rise over the RSS before it, in bytes."""
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), json.dumps(mesh)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder = OUT / f"gemma_sharded_{args.layers}"
    size = make_checkpoint(folder, args.layers)
    runs = {"one device": [], "model_parallel((1, 8))": []}
    for _ in range(args.repeats):
        runs["one device"].append(measure(folder, None))
        runs["model_parallel((1, 8))"].append(measure(folder, (1, 8)))
    print(f"checkpoint: {size / 1e6:.0f} MB, {args.repeats} runs each, medians")
    print("| load | seconds | peak RSS rise | x checkpoint |")
    print("|---|---|---|---|")
    for name, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        rise = statistics.median(r["rise"] for r in results)
        print(f"| {name} | {seconds:.2f} | {rise / 1e6:.0f} MB | {rise / size:.2f} |")


if __name__ == "__main__":
    main()
