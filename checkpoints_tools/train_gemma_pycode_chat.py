"""Trains the bundled `gemma_tiny_pycode_chat` preset: an instruction-following LoRA adapter over `gemma_tiny_pycode`.

Data, made offline: each top-level function of the Python standard library with a docstring becomes
a chat example, "Write a Python function `name`: <first docstring line>" -> the function's source.
A seeded tenth is held out. The tokenizer gains a chat template (plain-text turn markers, since the
base vocabulary has no turn tokens; each reply ends with <eos>, which stops generation), and the
adapter is trained with keras-zoo's own `zoo.finetune.text` (completion-only loss, packing). The
report gives the held-out loss of the base model and of the adapter, and a few sample replies.

Usage:
    KERAS_BACKEND=jax python -m zoo.checkpoints_tools.train_gemma_pycode_chat [--epochs 8] [--out presets/gemma_tiny_pycode_chat]
"""

import argparse
import ast
import json
import logging
import shutil
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

import zoo  # (importing it chooses the Keras backend)
from zoo.files import read_json, write_json
from zoo.tokenizer import TOKENIZER_FILES, Tokenizer

BASE = "gemma_tiny_pycode"
# Plain-text turn markers; a reply ends with <eos>. Rendering a prefix of the messages (with the generation
# prompt) gives a prefix of the whole text, as zoo.finetune's assistant-only loss needs.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}### Response:\n{{ message['content'] | trim }}{{ eos_token }}\n"
    "{% elif message['role'] == 'system' %}{{ message['content'] | trim }}\n\n"
    "{% else %}### Instruction:\n{{ message['content'] | trim }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)
MAX_SOURCE_CHARS = 700
log = logging.getLogger("train_gemma_pycode_chat")


def instructions() -> list[dict]:
    """Chat examples from the standard library's documented top-level functions, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts
                   and p.stat().st_size < 400_000)
    examples, seen = [], set()
    for path in files:
        source = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in tree.body:
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            lines = doc.strip().splitlines() if doc else []
            code = ast.get_source_segment(source, node) if lines else None
            if not code or len(code) > MAX_SOURCE_CHARS or len(lines[0]) < 12 or node.name.startswith("_"):
                continue
            prompt = f"Write a Python function `{node.name}`: {lines[0].strip()}"
            if prompt in seen:
                continue
            seen.add(prompt)
            examples.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": code}]})
    return examples


def chat_tokenizer(base: Tokenizer, folder: Path) -> Tokenizer:
    """The base tokenizer's files with the chat template added to tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (base.folder / name).is_file():
            shutil.copyfile(base.folder / name, folder / name)
    config = read_json(folder / "tokenizer_config.json")
    write_json(folder / "tokenizer_config.json", config | {"chat_template": CHAT_TEMPLATE})
    return Tokenizer.from_folder(folder)


def train(out: Path, epochs: int = 8, seed: int = 0, limit: int | None = None, verbose="auto", samples: int = 3,
          sample_tokens: int = 96) -> dict:
    """Trains and writes the adapter preset; `limit` keeps only the first examples (for tests), and the report
    holds `samples` replies of up to `sample_tokens` tokens to held-out instructions."""
    examples = instructions()[:limit]
    order = np.random.default_rng(seed).permutation(len(examples))
    held = max(len(examples) // 10, 1)
    validation = [examples[i] for i in sorted(order[:held])]
    training = [examples[i] for i in sorted(order[held:])]
    lm = zoo.GemmaCausalLM.from_preset(BASE)
    with tempfile.TemporaryDirectory() as scratch:
        lm.tokenizer = chat_tokenizer(lm.tokenizer, Path(scratch) / "tokenizer")
        work = Path(scratch) / "run"
        summary = zoo.finetune.text(lm, training, validation=validation, output=work, epochs=epochs, seed=seed,
                                    batch_size=16, learning_rate=2e-3, max_length=256, packing=True, lora_rank=16,
                                    lora_alpha=32, lora_targets="all-linear", verbose=verbose)
        out.mkdir(parents=True, exist_ok=True)
        for path in work.iterdir():
            if path.is_file():
                shutil.copyfile(path, out / path.name)
    replies = {}
    for example in validation[:samples]:
        prompt = example["messages"][0]["content"]
        replies[prompt] = lm.generate(prompt, max_new_tokens=sample_tokens, chat=True)
    report = {"examples": summary.examples, "held_out_examples": summary.validation_examples,
              "truncated": summary.truncated, "held_out_loss_base": round(summary.before["val_loss"], 4),
              "held_out_loss_adapter": round(summary.after["val_loss"], 4), "epochs": epochs, "seed": seed,
              "tokens_per_second": round(summary.throughput), "seconds": round(summary.seconds),
              "backend": summary.backend, "samples": replies}
    write_json(out / "training.json", report)
    log.info("held-out loss %.3f (base) -> %.3f (adapter)", report["held_out_loss_base"], report["held_out_loss_adapter"])
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "presets" / f"{BASE}_chat")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(train(args.out, args.epochs, args.seed, verbose=2), indent=2))


if __name__ == "__main__":
    main()
