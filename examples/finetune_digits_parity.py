"""Fine-tune the bundled digits ViT on a new label set, offline: "even" and "odd".

The example makes its own image folders from scikit-learn's digits (no download): the images
`vit_tiny_digits` was trained on become `train/even` and `train/odd`, and its held-out images
`val/even` and `val/odd`. It loads the classifier with the folder's labels (a new two-way head),
fine-tunes it with `zoo.finetune.images` (a LoRA adapter on the attention and the new head; light
crops, no flips, since a mirrored digit is another shape), prints the summary, writes the adapter
and classifies a few held-out images with it, loaded as a preset.

Reaches 97 % or more validation accuracy on every backend (2 epochs, about a minute on a 2-core CPU).

Usage:
    python examples/finetune_digits_parity.py [--epochs 2] [--workdir /tmp/digits_parity]
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import zoo
from zoo.checkpoints_tools.train_vit_digits import load_data

LABELS = ("even", "odd")


def make_folders(root: Path) -> tuple[Path, Path]:
    """root/train/{even,odd}/*.png and root/val/{even,odd}/*.png from the digits' own train/test split."""
    x_train, x_val, y_train, y_val = load_data(seed=0)  # the split vit_tiny_digits was trained on
    for split, images, digits in (("train", x_train, y_train), ("val", x_val, y_val)):
        for label in LABELS:
            (root / split / label).mkdir(parents=True, exist_ok=True)
        for i, (image, digit) in enumerate(zip(images, digits)):
            Image.fromarray(image).save(root / split / LABELS[digit % 2] / f"{i:04d}.png")
    return root / "train", root / "val"


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="where the folders and the adapter go")
    args = parser.parse_args(argv)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="digits_parity_"))
    train, val = make_folders(root)

    data = zoo.finetune.image_folder(train)
    model = zoo.ViTImageClassifier.from_preset("vit_tiny_digits", labels=data.labels)
    summary = zoo.finetune.images(model, data, validation=val, output=root / "adapter", overwrite=True,
                                  epochs=args.epochs, batch_size=32, learning_rate=3e-3, crop_scale=(0.8, 1.0),
                                  flip=False, verbose=2)
    print("\n".join(summary.lines()))

    tuned = zoo.from_preset(root / "adapter")  # the adapter folder, over vit_tiny_digits
    samples = sorted((val / "odd").glob("*.png"))[:2] + sorted((val / "even").glob("*.png"))[:2]
    for path, labels in zip(samples, tuned.predict_labels(samples, top_k=1)):
        print(f"{path.parent.name}/{path.name}: {labels[0]['label']} ({labels[0]['score']:.3f})")
    return summary.after["val_accuracy"]


if __name__ == "__main__":
    main()
