"""ViT-B/16 inference speed: keras-zoo on each backend vs transformers (and keras-hub) in the same process.

Random weights, float32, batch 8, 224x224, 1000 classes. In each backend's process the
contenders run in turn — keras-zoo (`predict_on_batch`: jit on JAX, XLA on TensorFlow, eager
no-grad on PyTorch), transformers' ViTForImageClassification (torch, eager, no_grad, its
default SDPA attention), keras-hub's ViTImageClassifier on the same backend when installed —
and each ratio is a ratio of medians measured side by side.

Usage:
    python benchmarks/vit.py [--iterations 7] [--backends jax,torch,tensorflow] [--write]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BACKENDS, interleaved, median, run_worker, versions, write_section  # noqa: E402

BATCH, SIZE = 8, 224


def worker(iterations: int) -> None:
    import keras
    import numpy as np
    import torch
    from transformers import ViTConfig as HFConfig
    from transformers import ViTForImageClassification

    import zoo

    pixels = np.random.default_rng(0).standard_normal((BATCH, SIZE, SIZE, 3)).astype("float32")
    ours = zoo.ViTImageClassifier(zoo.ViTConfig())
    reference = ViTForImageClassification(HFConfig()).eval()
    torch_pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())

    def run_reference():
        with torch.no_grad():
            return reference(torch_pixels).logits

    contenders = {"keras-zoo": lambda: ours.predict_on_batch(pixels), "transformers": run_reference}
    try:
        import keras_hub

        backbone = keras_hub.models.ViTBackbone(image_shape=(SIZE, SIZE, 3), patch_size=16, num_layers=12,
                                                num_heads=12, hidden_dim=768, mlp_dim=3072)
        hub_model = keras_hub.models.ViTImageClassifier(backbone=backbone, num_classes=1000, preprocessor=None)
        contenders["keras-hub"] = lambda: hub_model.predict_on_batch(pixels)
    except ImportError:
        pass
    times = interleaved(contenders, iterations)
    print(json.dumps({"backend": keras.backend.backend(), "times": times}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--iterations", type=int, default=7)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.worker:
        return worker(args.iterations)
    rows = []
    for backend in args.backends.split(","):
        result = run_worker(__file__, backend, ["--iterations", str(args.iterations)])
        ips = {name: BATCH / median(t) for name, t in result["times"].items()}
        rows.append((backend, ips))
        print(f"{backend}: " + ", ".join(f"{k} {v:.2f} img/s" for k, v in ips.items()), flush=True)
    lines = [
        "| backend | keras-zoo img/s | transformers img/s (same process) | zoo / transformers | keras-hub img/s | zoo / keras-hub |",
        "|---|---|---|---|---|---|",
    ]
    for backend, ips in rows:
        hub = ips.get("keras-hub")
        lines.append(
            f"| {backend} | {ips['keras-zoo']:.2f} | {ips['transformers']:.2f} | {ips['keras-zoo'] / ips['transformers']:.2f}x | "
            + (f"{hub:.2f} | {ips['keras-zoo'] / hub:.2f}x |" if hub else "n/a | n/a |")
        )
    best_zoo = max(ips["keras-zoo"] for _, ips in rows)
    best_hub = max((ips["keras-hub"] for _, ips in rows if "keras-hub" in ips), default=None)
    summary = f"Best keras-zoo backend: {best_zoo:.2f} img/s" + (
        f"; best keras-hub: {best_hub:.2f} img/s ({best_zoo / best_hub:.2f}x)." if best_hub else "."
    )
    table = "\n".join(lines)
    print(table + "\n" + summary)
    if args.write:
        write_section("vit", (
            "## ViT-B/16 inference (batch 8, 224x224, float32, random weights)\n\n"
            f"Command: `python benchmarks/vit.py --iterations {args.iterations} --write`\n\n"
            f"{table}\n\n{summary} Medians of {args.iterations} interleaved runs per contender. {versions()}."
        ))


if __name__ == "__main__":
    main()
