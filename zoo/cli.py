"""The `zoo` command: a few lines over the library's task objects per subcommand."""

import argparse
import json
import sys
from pathlib import Path

DEFAULT_CLASSIFIER = "vit_tiny_digits"


def _classify(args) -> int:
    import zoo

    model = zoo.ViTImageClassifier.from_preset(args.preset)
    images = list(args.images)
    if args.samples:
        folder = Path(model.source["folder"]) / "samples"
        images += sorted(folder.glob("*.png")) if folder.is_dir() else []
        if not images:
            raise zoo.errors.PresetNotFoundError(f"preset {args.preset!r} has no sample images in {folder}")
    if not images:
        raise SystemExit("zoo classify: give at least one image, or --samples")
    results = model.predict_labels(images, top_k=args.top_k)
    if args.json:
        print(json.dumps([{"image": str(i), "labels": r} for i, r in zip(images, results)], indent=2))
        return 0
    for image, labels in zip(images, results):
        print(image)
        for entry in labels:
            print(f"  {entry['label']:<24} {entry['score']:.4f}")
    return 0


def _add_classify(sub) -> None:
    p = sub.add_parser("classify", help="print the top labels of images")
    p.add_argument("images", nargs="*", help="image files (PNG, JPEG, ...)")
    p.add_argument("--preset", default=DEFAULT_CLASSIFIER, help=f"preset name, handle or folder (default {DEFAULT_CLASSIFIER})")
    p.add_argument("--top-k", type=int, default=5, help="labels per image (default 5)")
    p.add_argument("--samples", action="store_true", help="also classify the preset's bundled sample images")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_classify)


COMMANDS = [_add_classify]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo", description="keras-zoo: pretrained multi-backend models for Keras 3")
    p.add_argument("--version", action="store_true", help="print the version and the Keras backend")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.version:
        import keras

        import zoo

        print(f"keras-zoo {zoo.__version__} (Keras {keras.__version__}, backend {keras.backend.backend()})")
        return 0
    if not getattr(args, "run", None):
        parser().print_help()
        return 2
    from zoo.errors import ZooError

    try:
        return args.run(args)
    except ZooError as e:
        print(f"zoo {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
