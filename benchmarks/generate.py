"""Greedy generation speed: keras-zoo on each backend vs transformers and keras-hub, in the same process.

Model: Gemma architecture, random float32 weights, vocab 32000, hidden 512, 8 layers, 8 heads,
1 KV head, head_dim 64, MLP 2048 (46M parameters). Prompt 32 tokens, 64 new tokens, greedy,
batch 1 and batch 8, after warm-up. keras-zoo and transformers load the same checkpoint (and
must produce the same tokens); keras-hub builds its GemmaCausalLM with the same shape. In each
backend's process the contenders run in turn and the medians are compared.

Also printed: time to first token (prefill of the batch + first sample) and the fraction of the
memory-bandwidth limit reached: weight bytes read per decode step x steps/s, divided by the
machine's measured copy bandwidth (NumPy copy of 256 MiB, read + write bytes, STREAM's convention).

Usage:
    python benchmarks/generate.py [--iterations 5] [--backends jax,torch,tensorflow] [--write]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BACKENDS, interleaved, median, run_worker, versions, write_section  # noqa: E402

FOLDER = Path(__file__).resolve().parent / "out" / "gemma_bench"
SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=1, head_dim=64)
PROMPT, NEW = 32, 64


def make_checkpoint() -> None:
    if (FOLDER / "model.safetensors").exists():
        return
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    GemmaForCausalLM(GemmaConfig(**SHAPE)).save_pretrained(FOLDER)


def copy_bandwidth() -> float:
    """Bytes per second moved (read + write) by a NumPy copy of 256 MiB, median of 5."""
    src = np.ones(64 * 2**20, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / median(times)


def worker(iterations: int) -> None:
    import keras
    import torch
    from transformers import GemmaForCausalLM

    import zoo

    rng = np.random.default_rng(0)
    prompts = rng.integers(3, SHAPE["vocab_size"], (8, PROMPT)).astype(np.int32)
    lm = zoo.GemmaCausalLM.from_preset(FOLDER, dtype="float32")
    reference = GemmaForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()
    weight_bytes = sum(int(np.prod(v.shape)) * 4 for v in lm.weights)
    results = {"backend": keras.backend.backend(), "weight_bytes": weight_bytes, "bandwidth": copy_bandwidth(),
               "tokens_match": {}, "times": {}, "ttft": {}}

    def zoo_run(batch, new_tokens=NEW):
        engine = lm.engine(batch, 128)
        requests = [engine.submit(p, new_tokens, stop_ids=()) for p in prompts[:batch]]
        for _ in engine.run(requests):
            pass
        return [r.tokens for r in requests]

    def hf_run(batch, new_tokens=NEW):
        with torch.no_grad():
            out = reference.generate(torch.from_numpy(prompts[:batch]).long(), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                     attention_mask=torch.ones(batch, PROMPT, dtype=torch.long))
        return out[:, PROMPT:].tolist()

    hub_run = _keras_hub_runner(prompts)
    for batch in (1, 8):
        contenders = {"transformers": lambda b=batch: hf_run(b), "keras-zoo": lambda b=batch: zoo_run(b)}
        if hub_run is not None:
            contenders["keras-hub"] = lambda b=batch: hub_run(b, NEW)
        results["times"][batch] = interleaved(contenders, iterations, pause=0.2)
        results["tokens_match"][batch] = zoo_run(batch) == hf_run(batch)
        first = {"transformers": lambda b=batch: hf_run(b, 1), "keras-zoo": lambda b=batch: zoo_run(b, 1)}
        results["ttft"][batch] = interleaved(first, iterations, pause=0.2)
    print(json.dumps(results))


def keras_hub_gemma():
    """keras-hub's GemmaCausalLM with the benchmark's shape (random weights), or None without keras-hub."""
    try:
        import keras_hub
    except ImportError:
        return None
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=SHAPE["vocab_size"], num_layers=SHAPE["num_hidden_layers"],
        num_query_heads=SHAPE["num_attention_heads"], num_key_value_heads=SHAPE["num_key_value_heads"],
        hidden_dim=SHAPE["hidden_size"], intermediate_dim=2 * SHAPE["intermediate_size"], head_dim=SHAPE["head_dim"],
    )  # keras-hub's intermediate_dim is twice the MLP width
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def _keras_hub_runner(prompts):
    hub_lm = keras_hub_gemma()
    if hub_lm is None:
        return None

    def run(batch, new_tokens):
        length = PROMPT + new_tokens
        token_ids = np.zeros((batch, length), np.int32)
        token_ids[:, :PROMPT] = prompts[:batch]
        mask = np.zeros((batch, length), bool)
        mask[:, :PROMPT] = True
        return hub_lm.generate({"token_ids": token_ids, "padding_mask": mask}, max_length=length, stop_token_ids=None)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if args.worker:
        return worker(args.iterations)
    make_checkpoint()
    lines = ["| backend | batch | contender | tokens/s | vs transformers | time to first token ms | bandwidth used |",
             "|---|---|---|---|---|---|---|"]
    best = {1: {}, 8: {}}
    for backend in args.backends.split(","):
        r = run_worker(__file__, backend, ["--iterations", str(args.iterations)])
        for batch in ("1", "8"):
            tps = {name: int(batch) * NEW / median(t) for name, t in r["times"][batch].items()}
            ttft = {name: 1000 * median(t) for name, t in r["ttft"][batch].items()}
            for name, value in tps.items():
                steps = value / int(batch)
                used = r["weight_bytes"] * steps / r["bandwidth"]
                lines.append(f"| {backend} | {batch} | {name} | {value:.1f} | {value / tps['transformers']:.2f}x | "
                             f"{ttft[name]:.0f} | {used:.0%} |" if name in ttft else
                             f"| {backend} | {batch} | {name} | {value:.1f} | {value / tps['transformers']:.2f}x | n/a | {used:.0%} |")
                best[int(batch)][(backend, name)] = value
            print("\n".join(lines[-len(tps):]), f"(same tokens as transformers: {r['tokens_match'][batch]})", flush=True)
    summary = []
    for batch in (1, 8):
        zoo_best = max((v, k) for k, v in best[batch].items() if k[1].startswith("keras-zoo"))
        hub = [(v, k) for k, v in best[batch].items() if k[1] == "keras-hub"]
        summary.append(f"batch {batch}: best keras-zoo {zoo_best[0]:.1f} tok/s ({zoo_best[1][0]})"
                       + (f", best keras-hub {max(hub)[0]:.1f} tok/s ({max(hub)[1][0]}): {zoo_best[0] / max(hub)[0]:.2f}x" if hub else ""))
    table = "\n".join(lines)
    print(table + "\n" + "\n".join(summary))
    if args.write:
        write_section("generate", (
            "## Greedy generation (Gemma shape: vocab 32000, hidden 512, 8 layers, 8 heads, 1 KV head, head_dim 64, "
            "MLP 2048; float32; prompt 32, 64 new tokens)\n\n"
            f"Command: `python benchmarks/generate.py --iterations {args.iterations} --write`\n\n"
            f"{table}\n\n" + "\n".join(f"- {s}" for s in summary)
            + f"\n\nMedians of {args.iterations} interleaved runs per contender; transformers is measured in each "
            f"backend's own process. {versions()}."
        ))


if __name__ == "__main__":
    main()
