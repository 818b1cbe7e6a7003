"""Run by tests in a subprocess under another KERAS_BACKEND: loads a preset, writes its outputs.

Usage: python backend_worker.py {vit,gemma} FOLDER INPUT.npy OUTPUT.npy
"""

import sys

import numpy as np


def main(kind: str, folder: str, inputs: str, output: str) -> None:
    import zoo
    from keras.ops import convert_to_numpy as to_numpy

    if kind == "vit":
        model = zoo.ViTImageClassifier.from_preset(folder)
        np.save(output, to_numpy(model(np.load(inputs))))
    elif kind == "gemma":
        model = zoo.GemmaCausalLM.from_preset(folder)
        np.save(output, to_numpy(model(np.load(inputs))))
    else:
        raise SystemExit(f"unknown kind {kind!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
