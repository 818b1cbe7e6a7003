"""Fine-tuning speed: `zoo.finetune` (what `zoo finetune` runs) on each backend vs TRL and transformers' Trainer.

Text: the generation benchmark's Gemma shape (random weights, float32) with the bundled pycode
tokenizer; prompt/completion examples cut from the standard library's source, each longer than the
sequence, so every row is full on both sides (no padding); LoRA rank 8 on q_proj and v_proj (PEFT's
default), batch 4 x 256 tokens, AdamW, cosine schedule, clipping, completion-only loss, 2 epochs.
Against TRL's `SFTTrainer` with the same PEFT `LoraConfig`, data and lengths (gradient checkpointing
off, as keras-zoo does not checkpoint). Throughput: tokens of the second epoch / its time (the first
includes compilation and warm-up on every side).

Images: ViT-B/16 (224x224, random weights) on a folder of random JPEGs in 10 labels: `zoo.finetune.images`
(LoRA rank 8 on q/v and a new head; random resized crop and flip) against transformers' `Trainer` on
a PEFT model with the same adapter and head, fed the same crops through torchvision-free PIL
transforms in a PyTorch Dataset. Images/s of the second epoch.

Each backend runs in its own process, and every contender runs in that process in turn, twice;
ratios come from the medians. On PyTorch the images are also timed with `jit_compile=True`
(torch.compile: ~3 minutes to compile ViT-B/16 here, not counted in the second epoch).

Usage:
    python benchmarks/finetune.py [--backends jax,torch,tensorflow] [--write]
"""

import argparse
import json
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BACKENDS, median, run_worker, versions, write_section  # noqa: E402
from generate import FOLDER, make_checkpoint  # noqa: E402
from lora import VIT_FOLDER, make_vit  # noqa: E402

TEXT_FOLDER = FOLDER.with_name("gemma_bench_finetune")
IMAGES = FOLDER.with_name("finetune_images")
LENGTH, BATCH, ROWS, RANK = 256, 4, 32, 8
IMAGE_BATCH, IMAGE_COUNT, LABELS = 8, 48, 10
REPEATS = 2


def make_data() -> Path:
    """The text checkpoint (the Gemma bench shape + the pycode tokenizer), its JSONL, and the image folder."""
    make_checkpoint()
    make_vit()
    if not (TEXT_FOLDER / "train.jsonl").exists():
        TEXT_FOLDER.mkdir(parents=True, exist_ok=True)
        for path in FOLDER.iterdir():
            shutil.copyfile(path, TEXT_FOLDER / path.name)
        import zoo

        pycode = zoo.presets.get("gemma_tiny_pycode").folder
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(pycode / name, TEXT_FOLDER / name)
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 8000)[:ROWS]
        rows = []
        for p in files:
            text = p.read_text(encoding="utf-8", errors="replace")
            cut = text.index("\n", 200) + 1  # a line boundary: the prompt's tokens are a prefix of the whole's
            rows.append({"prompt": text[:cut], "completion": text[cut:4000]})
        (TEXT_FOLDER / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    if not IMAGES.exists():
        from PIL import Image

        rng = np.random.default_rng(0)
        for i in range(IMAGE_COUNT):
            label = IMAGES / f"label{i % LABELS}"
            label.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(label / f"{i}.jpg", quality=90)
    return TEXT_FOLDER


# ----------------------------------------------------------------------------- contenders


def zoo_text() -> float:
    import zoo

    lm = zoo.GemmaCausalLM.from_preset(TEXT_FOLDER, dtype="float32")
    summary = zoo.finetune.text(lm, TEXT_FOLDER / "train.jsonl", epochs=2, batch_size=BATCH, max_length=LENGTH,
                                lora_rank=RANK, lora_alpha=RANK, lora_targets=["q_proj", "v_proj"], verbose=0)
    assert summary.truncated == ROWS  # every row full
    return summary.history[-1]["tokens_per_second"]


class _EpochTimer:
    def __init__(self):
        self.times = []

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class Timer(TrainerCallback):
            def on_epoch_begin(self, args, state, control, **kwargs):
                timer.start = time.perf_counter()

            def on_epoch_end(self, args, state, control, **kwargs):
                timer.times.append(time.perf_counter() - timer.start)

        return Timer()


def trl_text() -> float:
    import datasets
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in (TEXT_FOLDER / "train.jsonl").read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(TEXT_FOLDER, dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(TEXT_FOLDER)
    timer = _EpochTimer()
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, max_length=LENGTH, per_device_train_batch_size=BATCH, num_train_epochs=2,
                           learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.01,
                           max_grad_norm=1.0, logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True,
                           gradient_checkpointing=False, completion_only_loss=True, packing=False, seed=0,
                           dataloader_num_workers=0, disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[timer.callback()],
                             peft_config=peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["q_proj", "v_proj"],
                                                         task_type="CAUSAL_LM"))
        trainer.train()
    return ROWS * LENGTH / timer.times[-1]


def zoo_images(jit_compile="auto") -> float:
    import zoo

    data = zoo.finetune.image_folder(IMAGES)
    clf = zoo.ViTImageClassifier.from_preset(VIT_FOLDER, dtype="float32", labels=data.labels)
    summary = zoo.finetune.images(clf, data, epochs=2, batch_size=IMAGE_BATCH, lora_rank=RANK, verbose=0,
                                  jit_compile=jit_compile)
    return summary.history[-1]["images_per_second"]


def hf_images() -> float:
    import peft
    import torch
    from transformers import Trainer, TrainingArguments, ViTForImageClassification

    import zoo
    from zoo.finetune.image_folders import random_resized_crop

    data = zoo.finetune.image_folder(IMAGES)
    pre = zoo.ViTImageClassifier.from_preset(VIT_FOLDER, dtype="float32", labels=data.labels).preprocessor
    size = pre.size

    class Folder(torch.utils.data.Dataset):  # the same crop, flip and normalisation, as a PyTorch Dataset
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            from PIL import Image

            rng = np.random.default_rng([0, i])
            with Image.open(data.paths[i]) as image:
                image = image.convert("RGB")
                image = image.crop(random_resized_crop(image, rng, (0.08, 1.0)))
                if rng.random() < 0.5:
                    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                pixels = (np.asarray(image.resize((size[1], size[0]), resample=pre.resample), np.float32) / 255
                          - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
            return {"pixel_values": torch.from_numpy(pixels.transpose(2, 0, 1)), "labels": int(data.targets[i])}

    model = ViTForImageClassification.from_pretrained(VIT_FOLDER, num_labels=LABELS, ignore_mismatched_sizes=True,
                                                      attn_implementation="sdpa")
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["q_proj", "v_proj"],
                                                       modules_to_save=["classifier"]))  # transformers 5's names
    timer = _EpochTimer()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=IMAGE_BATCH, num_train_epochs=2,
                                 learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.01,
                                 max_grad_norm=1.0, logging_strategy="no", save_strategy="no", report_to=[],
                                 use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False)
        Trainer(model=model, args=args, train_dataset=Folder(), callbacks=[timer.callback()]).train()
    return IMAGE_COUNT / timer.times[-1]


def worker(kind: str) -> None:
    import keras

    contenders = {"text": {"zoo": zoo_text, "trl": trl_text}, "images": {"zoo": zoo_images, "hf": hf_images}}[kind]
    if kind == "images" and keras.backend.backend() == "torch":  # eager is the default; torch.compile on request
        contenders["zoo_compiled"] = lambda: zoo_images(jit_compile=True)
    results = {name: [] for name in contenders}
    for _ in range(REPEATS):
        for name, fn in contenders.items():
            results[name].append(fn())
    print(json.dumps({name: median(values) for name, values in results.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--tasks", default="text,images")
    parser.add_argument("--write", action="store_true", help="write the tables into RESULTS.md")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    make_data()
    saved = FOLDER.with_name("finetune_results.json")  # rows of earlier runs (another --tasks) stay in the table
    rows = json.loads(saved.read_text()) if saved.exists() else {}
    for kind in args.tasks.split(","):
        for backend in args.backends.split(","):
            rows[f"{kind}/{backend}"] = run_worker(__file__, backend, [kind], timeout=3600)
            print(kind, backend, rows[f"{kind}/{backend}"], flush=True)
            saved.write_text(json.dumps(rows, indent=2))
    lines = ["| task | backend | keras-zoo | peer | ratio |", "|---|---|---|---|---|"]
    for key, r in sorted(rows.items(), key=lambda kv: (kv[0].split("/")[0] != "text", kv[0])):
        kind, backend = key.split("/")
        peer = r.get("trl", r.get("hf"))
        unit = "tokens/s" if kind == "text" else "images/s"
        name = "TRL SFTTrainer + PEFT" if kind == "text" else "transformers Trainer + PEFT"
        lines.append(f"| {kind} ({unit}) | {backend} | {r['zoo']:.1f} | {name}: {peer:.1f} | {r['zoo'] / peer:.2f}x |")
        if "zoo_compiled" in r:
            lines.append(f"| {kind} ({unit}) | {backend}, `jit_compile=True` (torch.compile) | {r['zoo_compiled']:.1f} | "
                         f"{name}: {peer:.1f} | {r['zoo_compiled'] / peer:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section("finetune", "## Fine-tuning speed (`benchmarks/finetune.py`)\n\n"
                      f"`python benchmarks/finetune.py --write` ({versions()}, trl {_version('trl')}). Text: Gemma bench shape, LoRA r{RANK} "
                      f"q/v, batch {BATCH} x {LENGTH} tokens; images: ViT-B/16, LoRA r{RANK} q/v + new head, batch "
                      f"{IMAGE_BATCH}, 224x224 with random resized crop and flip. Second-epoch throughput, median of "
                      f"{REPEATS}. Each peer runs in the same process as the backend it is compared with (so under "
                      "TensorFlow, PyTorch shares the cores with TensorFlow's thread pools, and its figure drops).\n\n"
                      + table)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
