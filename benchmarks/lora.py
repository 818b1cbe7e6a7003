"""LoRA training speed and memory: keras-zoo on each backend vs transformers + peft and keras-hub.

Gemma: the generation benchmark's shape (vocab 32000, hidden 512, 8 layers, 8 heads, 1 KV head,
head_dim 64, MLP 2048; float32), rank 4 on q_proj and v_proj, batch 2 x 128 tokens, Adam, one
training step per call (Keras `train_on_batch`, compiled as the backend compiles it: XLA on JAX
and TensorFlow, where keras-zoo asks for XLA, which Keras leaves off on a CPU, and without it for
comparison; on PyTorch both eager and `jit_compile=True` (torch.compile) are timed). In the same process:
transformers + peft (eager, and `torch.compile` of the model), and keras-hub's GemmaCausalLM with
`backbone.enable_lora(4)` when keras-hub is installed (`pip install --no-deps keras-hub`: its
tensorflow-text requirement would replace TensorFlow). Each contender computes the same loss,
token cross-entropy over the logits (for the Keras contenders, `token_loss` below).

Memory: peak RSS of a process that builds the model and runs 3 training steps, LoRA vs a full
fine-tune of the same model (keras-zoo on each backend; transformers for reference).

ViT-B/16 (224x224, random weights): LoRA rank 4 on q/v plus a new 10-label head, batch 8, images/s
against transformers + peft.

Usage:
    python benchmarks/lora.py [--iterations 5] [--backends jax,torch,tensorflow] [--write]
"""

import argparse
import json
import resource
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BACKENDS, interleaved, median, run_worker, versions, write_section  # noqa: E402
from generate import FOLDER, SHAPE, keras_hub_gemma, make_checkpoint  # noqa: E402

VIT_FOLDER = FOLDER.with_name("vit_b16_bench")
BATCH, LENGTH, RANK, LR = 2, 128, 4, 1e-4
VIT_BATCH, VIT_LABELS = 8, 10


def make_vit() -> None:
    if (VIT_FOLDER / "model.safetensors").exists():
        return
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(num_labels=1000)).save_pretrained(VIT_FOLDER)


def _data():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, SHAPE["vocab_size"], (BATCH, LENGTH + 1)).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def token_loss(y_true, y_pred):
    """Token cross-entropy on 2-D views: on PyTorch, Keras' loss moves a 3-D output's class axis to position 1
    and takes a strided log-softmax over it (~70 ms of a 400 ms step here); every Keras contender uses this."""
    import keras

    vocab = keras.ops.shape(y_pred)[-1]
    return keras.losses.sparse_categorical_crossentropy(keras.ops.reshape(y_true, (-1,)),
                                                        keras.ops.reshape(y_pred, (-1, vocab)), from_logits=True)


def _zoo_lm(lora: bool, jit_compile="auto"):
    import keras

    import zoo

    lm = zoo.GemmaCausalLM.from_preset(FOLDER, dtype="float32")
    if lora:
        lm.enable_lora(RANK, targets=["q_proj", "v_proj"])
    lm.compile(optimizer=keras.optimizers.Adam(LR), loss=token_loss, jit_compile=jit_compile)
    return lm


def _hf_lm(lora: bool, compiled: bool = False):
    import peft
    import torch
    from transformers import GemmaForCausalLM

    model = GemmaForCausalLM.from_pretrained(FOLDER, dtype=torch.float32)
    if lora:
        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["q_proj", "v_proj"]))
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    forward = torch.compile(model) if compiled else model
    x, y = (torch.from_numpy(a).long() for a in _data())

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = forward(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        optimizer.step()
        return float(loss)
    return step


def _hub_lm():
    import keras

    lm = keras_hub_gemma()
    if lm is None:
        return None
    lm.backbone.enable_lora(RANK)
    lm.compile(optimizer=keras.optimizers.Adam(LR), loss=token_loss, weighted_metrics=[])
    x, y = _data()
    inputs = {"token_ids": x, "padding_mask": np.ones_like(x, bool)}
    return lambda: lm.train_on_batch(inputs, y)


def worker_speed(iterations: int) -> None:
    import keras

    backend = keras.backend.backend()
    x, y = _data()
    contenders = {}
    zoo_lm = _zoo_lm(True)
    contenders["keras-zoo"] = lambda: zoo_lm.train_on_batch(x, y)
    if backend == "tensorflow":  # keras-zoo's models ask for XLA on TensorFlow; Keras alone would not on a CPU
        zoo_plain = _zoo_lm(True, jit_compile=False)
        contenders["keras-zoo jit_compile=False"] = lambda: zoo_plain.train_on_batch(x, y)
    if backend == "torch":
        zoo_compiled = _zoo_lm(True, jit_compile=True)
        contenders["keras-zoo jit_compile"] = lambda: zoo_compiled.train_on_batch(x, y)
        contenders["transformers+peft"] = _hf_lm(True)
        contenders["transformers+peft torch.compile"] = _hf_lm(True, compiled=True)
    hub = _hub_lm()
    if hub is not None:
        contenders["keras-hub"] = hub
    times = interleaved(contenders, iterations, pause=0.2)
    print(json.dumps({"backend": backend, "times": times}))


def worker_memory(kind: str) -> None:
    """Peak RSS (MiB) of building the model and 3 training steps."""
    x, y = _data()
    if kind.startswith("transformers"):
        step = _hf_lm(kind.endswith("lora"))
    else:
        lm = _zoo_lm(kind.endswith("lora"))

        def step():
            return lm.train_on_batch(x, y)
    for _ in range(3):
        step()
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def worker_vit(iterations: int) -> None:
    import keras
    import peft
    import torch
    from transformers import ViTForImageClassification

    import zoo

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (VIT_BATCH, 224, 224, 3)).astype(np.float32)
    labels = rng.integers(0, VIT_LABELS, VIT_BATCH)
    clf = zoo.ViTImageClassifier.from_preset(VIT_FOLDER, num_labels=VIT_LABELS)
    clf.enable_lora(RANK)  # q_proj, v_proj, and the new head whole
    clf.compile(optimizer=keras.optimizers.Adam(LR), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    contenders = {"keras-zoo": lambda: clf.train_on_batch(images, labels)}
    if keras.backend.backend() == "torch":
        hf = ViTForImageClassification.from_pretrained(VIT_FOLDER, num_labels=VIT_LABELS, ignore_mismatched_sizes=True)
        hf = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["q_proj", "v_proj"],
                                                     modules_to_save=["classifier"])).train()
        optimizer = torch.optim.Adam([p for p in hf.parameters() if p.requires_grad], lr=LR)
        pixels, target = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels)

        def hf_step():
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(hf(pixel_values=pixels).logits, target)
            loss.backward()
            optimizer.step()
        contenders["transformers+peft"] = hf_step
    times = interleaved(contenders, iterations, pause=0.2)
    print(json.dumps({"backend": keras.backend.backend(), "times": times}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--skip", default="", help="parts to leave out: speed, memory, vit")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if args.worker == "speed":
        return worker_speed(args.iterations)
    if args.worker == "vit":
        return worker_vit(args.iterations)
    if args.worker:
        return worker_memory(args.worker)
    make_checkpoint()
    make_vit()
    backends = args.backends.split(",")
    sections = []
    if "speed" not in args.skip:
        rows, best = ["| backend | contender | steps/s | vs transformers+peft |", "|---|---|---|---|"], {}
        results = {b: run_worker(__file__, b, ["speed", "--iterations", str(args.iterations)], timeout=3600)
                   for b in backends}
        peft_rate = None
        for r in results.values():
            for name, t in r["times"].items():
                if name.startswith("transformers"):
                    peft_rate = max(peft_rate or 0, 1 / median(t))
        for backend, r in results.items():
            for name, t in r["times"].items():
                rate = 1 / median(t)
                best[(backend, name)] = rate
                vs = f"{rate / peft_rate:.2f}x" if peft_rate else "n/a"
                rows.append(f"| {backend} | {name} | {rate:.2f} | {vs} |")
        print("\n".join(rows), flush=True)
        zoo_rates = {k: v for k, v in best.items() if k[1].startswith("keras-zoo")}
        hub_rates = {k: v for k, v in best.items() if k[1] == "keras-hub"}
        lines = [f"- best transformers+peft (eager or torch.compile): {peft_rate:.2f} steps/s" if peft_rate else ""]
        for backend in backends:
            mine = max(v for k, v in zoo_rates.items() if k[0] == backend)
            lines.append(f"- {backend}: keras-zoo {mine:.2f} steps/s"
                         + (f" = {mine / peft_rate:.2f}x transformers+peft" if peft_rate else "")
                         + (f", {mine / hub_rates[(backend, 'keras-hub')]:.2f}x keras-hub on {backend}"
                            if (backend, "keras-hub") in hub_rates else ""))
        if hub_rates:
            lines.append(f"- best keras-zoo / best keras-hub: {max(zoo_rates.values()) / max(hub_rates.values()):.2f}x")
        sections.append("### Gemma LoRA training steps/s (rank 4 on q_proj/v_proj, batch 2 x 128, Adam)\n\n"
                        + "\n".join(rows) + "\n\n" + "\n".join(s for s in lines if s))
    if "memory" not in args.skip:
        rows = ["| backend | LoRA peak RSS MiB | full fine-tune peak RSS MiB | LoRA / full |", "|---|---|---|---|"]
        for backend in backends + ["transformers"]:
            env_backend = "torch" if backend == "transformers" else backend
            prefix = "transformers-" if backend == "transformers" else ""
            peaks = {k: run_worker(__file__, env_backend, [prefix + k])["peak_mib"] for k in ("lora", "full")}
            rows.append(f"| {backend} | {peaks['lora']:.0f} | {peaks['full']:.0f} | {peaks['lora'] / peaks['full']:.2f} |")
            print(rows[-1], flush=True)
        sections.append("### Peak RSS: LoRA vs full fine-tune (same model, 3 steps)\n\n" + "\n".join(rows))
    if "vit" not in args.skip:
        rows = ["| backend | contender | images/s | vs transformers+peft |", "|---|---|---|---|"]
        results = {b: run_worker(__file__, b, ["vit", "--iterations", str(max(2, args.iterations // 2))],
                                 timeout=3600) for b in backends}
        hf_rate = next((VIT_BATCH / median(r["times"]["transformers+peft"]) for r in results.values()
                        if "transformers+peft" in r["times"]), None)
        for backend, r in results.items():
            for name, t in r["times"].items():
                rate = VIT_BATCH / median(t)
                rows.append(f"| {backend} | {name} | {rate:.1f} | {rate / hf_rate:.2f}x |" if hf_rate else
                            f"| {backend} | {name} | {rate:.1f} | n/a |")
        print("\n".join(rows), flush=True)
        sections.append("### ViT-B/16 LoRA training images/s (rank 4 on q/v + new 10-label head, batch 8, 224x224)"
                        "\n\n" + "\n".join(rows))
    if args.write:
        write_section("lora", "## LoRA training\n\n"
                      f"Command: `python benchmarks/lora.py --iterations {args.iterations} --write`\n\n"
                      + "\n\n".join(sections) + f"\n\nMedians of interleaved steps after a first (compiling) step. "
                      f"Versions: {versions()}.")


if __name__ == "__main__":
    main()
