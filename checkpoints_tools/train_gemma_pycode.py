"""Trains the bundled `gemma_tiny_pycode` preset: a tiny Gemma 3 text model of Python source.

Data: the Python standard library's own .py files (on every machine, no download), in sorted
order, one file in fifty held out for validation. A byte-level BPE tokenizer (4096 tokens,
Gemma's special-token ids) is trained with Hugging Face `tokenizers`; the model is keras-zoo's
own GemmaCausalLM, trained with Keras `fit`, seeded. The script reports the validation loss next
to a unigram model's (token frequencies from the training split, add-one smoothed) and writes
the preset in Hugging Face layout.

Usage:
    KERAS_BACKEND=jax python -m zoo.checkpoints_tools.train_gemma_pycode [--steps 3000] [--out presets/gemma_tiny_pycode]
"""

import argparse
import json
import logging
import math
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np

import zoo  # (importing it chooses the Keras backend before keras is imported)
import keras  # noqa: E402

from zoo.models.gemma import GemmaCausalLM, GemmaConfig  # noqa: E402
from zoo.models.gemma.config import FULL, SLIDING, Rope  # noqa: E402
from zoo.tokenizer import Tokenizer  # noqa: E402

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0-3, as Gemma numbers them
VOCAB = 4096
SEQ = 256
CONFIG = GemmaConfig(
    model_type="gemma3_text", vocab_size=VOCAB, hidden_size=192, intermediate_size=512, num_layers=4,
    num_heads=3, num_kv_heads=1, head_dim=64, max_position_embeddings=1024, rms_norm_eps=1e-6,
    rope={FULL: Rope(10000.0), SLIDING: Rope(10000.0)}, query_pre_attn_scalar=64, sliding_window=128,
    layer_types=(SLIDING, SLIDING, SLIDING, FULL), bos_token_id=2, eos_token_id=(1,), pad_token_id=0,
    extras={"spelling": "v5", "architectures": ["Gemma3ForCausalLM"]},
)
log = logging.getLogger("train_gemma_pycode")


def source_files() -> tuple[list[Path], list[Path]]:
    """(train, validation) stdlib files; a file goes to validation by a stable hash of its path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.stat().st_size < 400_000)
    validation = [p for p in files if zlib.crc32(str(p.relative_to(root)).encode()) % 50 == 0]
    held = set(validation)
    return [p for p in files if p not in held], validation


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path], out: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((read(p) for p in files), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
              "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True, "model_max_length": 1024}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Tokenizer.from_folder(out)


def token_stream(tokenizer: Tokenizer, files: list[Path]) -> np.ndarray:
    """All files as one stream of ids: <bos> file <eos> <bos> file <eos> ..."""
    ids = []
    for p in files:
        ids.extend(tokenizer.encode(read(p)))
        ids.append(1)
    return np.asarray(ids, np.int32)


def windows(stream: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """Non-overlapping (SEQ + 1)-token windows, shuffled if an rng is given."""
    n = (len(stream) - 1) // SEQ
    starts = np.arange(n) * SEQ
    if rng is not None:
        rng.shuffle(starts)
    return np.stack([stream[s : s + SEQ + 1] for s in starts])


def unigram_loss(train: np.ndarray, validation: np.ndarray) -> float:
    counts = np.bincount(train, minlength=VOCAB).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[validation].mean())


def train(out: Path, steps: int, seed: int, batch: int = 16, limit: int | None = None) -> dict:
    """Trains and writes the preset; `limit` keeps only the first files of each split (for tests)."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    train_files, val_files = source_files()
    train_files, val_files = train_files[:limit], val_files[:limit]
    tokenizer = train_tokenizer(train_files, out)
    train_ids, val_ids = token_stream(tokenizer, train_files), token_stream(tokenizer, val_files)
    log.info("%d train files (%d tokens), %d validation files (%d tokens)",
             len(train_files), len(train_ids), len(val_files), len(val_ids))
    data = windows(train_ids, rng)
    epochs = max(1, math.ceil(steps * batch / len(data)))
    data = np.concatenate([windows(train_ids, rng) for _ in range(epochs)])[: steps * batch]
    val = windows(val_ids, None)[:256]
    model = GemmaCausalLM(CONFIG)
    schedule = keras.optimizers.schedules.CosineDecay(0.0, steps, alpha=0.05, warmup_target=3e-3,
                                                      warmup_steps=min(200, steps // 10))
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01, clipnorm=1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    start = time.perf_counter()
    model.fit(data[:, :-1], data[:, 1:], batch_size=batch, epochs=1, shuffle=False, verbose=2)
    val_loss = float(model.evaluate(val[:, :-1], val[:, 1:], batch_size=batch, verbose=0))
    unigram = unigram_loss(train_ids, val[:, 1:].reshape(-1))
    report = {"validation_loss": round(val_loss, 4), "unigram_loss": round(unigram, 4), "steps": steps,
              "tokens_seen": int(steps * batch * SEQ), "seconds": round(time.perf_counter() - start),
              "backend": zoo.backends.describe()["backend"], "seed": seed}
    model.tokenizer = tokenizer
    model.save_preset(out)
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("validation loss %.3f nats/token vs unigram %.3f", val_loss, unigram)
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "presets" / "gemma_tiny_pycode")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = train(args.out, args.steps, args.seed, args.batch)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
