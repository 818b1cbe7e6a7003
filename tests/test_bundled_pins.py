"""The bundled presets' outputs, pinned bit for bit on each backend.

`tests/bundled_pins.json` holds, per backend, a SHA-256 of the exact float32 bytes of a few
outputs of each bundled preset (and the first values, for a readable failure). A refactor that
means to change nothing must leave every hash as it is. Recorded with
`MKL_CBWR=AUTO,STRICT KERAS_BACKEND=<name> python tests/test_bundled_pins.py` (it rewrites that
backend's entry; MKL_CBWR as tests/conftest.py sets it).

One pin moved once, on purpose: TensorFlow's `vit_predict`, when the backend refactor removed the
variable-creator scope that gave TensorFlow variables shapeless handles (a private API). Grappler
then sees the weights' shapes and picks other oneDNN kernels for the graph `predict` runs (the old
code with only that scope disabled gives the new hash exactly); every other pin held.
"""

import hashlib
import json
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import zoo
from zoo.generation import Sampler

PINS = Path(__file__).with_name("bundled_pins.json")
PROMPTS = ["import os\ndef read_file(path):", "class Stack:\n    def push(self, item):"]


class _Recording(Sampler):
    """Greedy, and keeps every logits row the engine hands it (prefill's, then each decode step's)."""

    def __init__(self):
        super().__init__()
        object.__setattr__(self, "seen", [])

    def choose(self, logits, rng):
        self.seen.append(np.array(logits, np.float32))
        return super().choose(logits, rng)


def _pin(array) -> dict:
    array = np.ascontiguousarray(keras.ops.convert_to_numpy(array), dtype=np.float32)
    return {"shape": list(array.shape), "sha256": hashlib.sha256(array.tobytes()).hexdigest(),
            "first": [float(x) for x in array.reshape(-1)[:4]]}


def outputs() -> dict:
    clf = zoo.ViTImageClassifier.from_preset("vit_tiny_digits")
    pixels = clf.preprocess(sorted((zoo.presets.get("vit_tiny_digits").folder / "samples").glob("*.png")))
    half = zoo.ViTImageClassifier.from_preset("vit_tiny_digits", dtype="bfloat16")
    lm = zoo.GemmaCausalLM.from_preset("gemma_tiny_pycode")
    ids = np.asarray([lm.tokenizer.encode(PROMPTS[0] + "\n    with open(path) as f:\n        return f.read()\n")])
    samplers = [_Recording(), _Recording()]
    engine = lm.engine(2, 64)
    requests = [engine.submit(lm.tokenizer.encode(p), 12, s) for p, s in zip(PROMPTS, samplers)]
    for _ in engine.run(requests):
        pass
    alone = _Recording()
    lm.generate(PROMPTS[1], max_new_tokens=12, sampler=alone)
    return {
        "vit_call": _pin(clf(pixels)),
        "vit_predict": _pin(clf.predict(pixels, verbose=0)),
        "vit_bfloat16_call": _pin(keras.ops.cast(half(pixels), "float32")),
        "lm_call": _pin(lm(ids)),
        "lm_batched_steps": _pin(np.stack(samplers[0].seen + samplers[1].seen)),
        "lm_alone_steps": _pin(np.stack(alone.seen)),
        "lm_tokens": {"tokens": [r.tokens for r in requests]},
    }


@pytest.fixture(scope="module")
def got():
    return outputs()


@pytest.mark.parametrize("name", ["vit_call", "vit_predict", "vit_bfloat16_call", "lm_call", "lm_batched_steps",
                                  "lm_alone_steps", "lm_tokens"])
def test_bundled_outputs_are_bit_identical_to_the_pins(got, name):
    want = json.loads(PINS.read_text())[keras.backend.backend()][name]
    assert got[name] == want


if __name__ == "__main__":
    pins = json.loads(PINS.read_text()) if PINS.is_file() else {}
    pins[keras.backend.backend()] = outputs()
    PINS.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
    sys.exit(0)
