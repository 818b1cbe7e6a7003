"""Loading a ~1 GB float32 checkpoint: wall time and peak RSS, keras-zoo on each backend vs transformers.

The checkpoint is a ViT (width 1024, 20 layers, 251M parameters, 1.0 GB in float32) written once
with transformers' `save_pretrained` into benchmarks/out/, and the same tensors once more by
keras-zoo's writer (`zoo checkpoint align`, the writer `save_preset` uses: every tensor
64-byte aligned, which JAX and TensorFlow can use in place; the safetensors library aligns to 8
bytes, and the first file's data happens to start 16 bytes past a 64-byte boundary). Every loader
loads both files. Each loader runs in a fresh process (so peak RSS is its own), after its imports;
the reported peak is the process's maximum RSS, and "weights" is that peak minus the RSS after
imports. transformers 5 maps the safetensors file into its parameters, so its RSS grows only as
weights are read: the script reads every weight once after loading, and the peak RSS reported is the
maximum over load and that read. Each loader runs `--repeats` times, alternating, and medians are
reported. The files are read once before any loader runs, so the page cache is warm for every
loader alike.

Each loader runs in two environments. "shared" is this interpreter's, with every backend and the
test tools installed (what `scripts/setup.sh` and CI make); there the imports bring in more than a
user of one loader would have: TensorFlow imports JAX when it is installed (for TFLite), Keras
imports scikit-learn and psutil when they are, and those objects and pages count in a fresh
process's RSS and in every full garbage collection. "own" is a virtual environment per loader,
made on first use under benchmarks/out/envs/ with the same versions as this interpreter's:
transformers with torch and safetensors, as transformers' own install gives; keras-zoo with one
backend, as `pip install "keras-zoo[jax]"` gives (the checkout, editable). Ratios compare loaders
within one environment kind and one file.

Usage:
    python benchmarks/load.py [--repeats 3] [--backends jax,torch,tensorflow] [--envs shared,own] [--write]
"""

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BACKENDS, run_worker, versions, write_section  # noqa: E402

FOLDER = Path(__file__).resolve().parent / "out" / "vit_1gb"
ALIGNED = FOLDER.with_name("vit_1gb_aligned")
FILES = {"transformers' save_pretrained": FOLDER, "keras-zoo's writer": ALIGNED}
REPO = Path(__file__).resolve().parents[1]
ENVS = FOLDER.with_name("envs")
ENVIRONMENTS = ("shared", "own")
# What each loader's own environment installs, torch first where it is needed (pinned: another
# version pulls several GB of CUDA packages); every package at this interpreter's version.
OWN_PACKAGES = {
    "transformers": [["torch"], ["transformers", "safetensors"]],
    "jax": [["jax", "jaxlib", "keras"]],
    "torch": [["torch"], ["keras"]],
    "tensorflow": [["tensorflow-cpu", "keras"]],
}
CONFIG = dict(hidden_size=1024, num_hidden_layers=20, num_attention_heads=16, intermediate_size=4096,
              image_size=224, patch_size=16, num_labels=1000)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mib() -> float:
    # VmHWM, the high-water mark of this process image: getrusage's ru_maxrss survives exec, so a
    # worker would report the parent's peak (over 2 GiB after writing the checkpoint) as its own.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def make_checkpoint() -> None:
    if (FOLDER / "model.safetensors").exists():
        return
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(**CONFIG)).save_pretrained(FOLDER)


def make_aligned_copy() -> None:
    if (ALIGNED / "model.safetensors").exists():
        return
    from zoo.checkpoints_tools.align import align_checkpoint

    align_checkpoint(FOLDER, ALIGNED)  # what `zoo checkpoint align FOLDER --output ALIGNED` does


def warm_page_cache() -> None:
    """Reads every checkpoint file once, so that no loader's first run reads from disk."""
    for folder in FILES.values():
        for path in folder.glob("*.safetensors"):
            with open(path, "rb", buffering=0) as f:
                while f.read(64 * 2**20):
                    pass


def _pinned(package: str) -> str:
    try:
        return f"{package}=={version(package).split('+')[0]}"
    except PackageNotFoundError:
        return package


def own_python(loader: str, backend: str) -> str:
    """The interpreter of a virtual environment holding one loader and its needs, made on first use."""
    name = "transformers" if loader == "transformers" else f"keras-zoo-{backend}"
    env = ENVS / name
    python, done = env / "bin" / "python", env / "complete"
    if done.exists():
        return str(python)
    shutil.rmtree(env, ignore_errors=True)  # an earlier attempt that did not finish
    print(f"making {env} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    steps = OWN_PACKAGES["transformers" if loader == "transformers" else backend]
    for i, packages in enumerate(steps):
        extra = [] if loader == "transformers" or i < len(steps) - 1 else ["-e", f"{REPO}[{backend}]"]
        command = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                   *map(_pinned, packages), *extra]
        if subprocess.run(command).returncode:
            raise SystemExit(f"could not make {env}: `{' '.join(command[3:])}` failed; "
                             "`--envs shared` runs without the loaders' own environments")
    done.touch()
    return str(python)


def worker(loader: str, folder: Path) -> None:
    if loader == "transformers":
        import torch  # noqa: F401
        from transformers import ViTForImageClassification

        def load():
            return ViTForImageClassification.from_pretrained(folder)
    elif loader == "keras-zoo":
        from zoo import ViTImageClassifier  # `import zoo` alone is lazy: this imports Keras and its backend
        from zoo.models import register_all

        register_all()  # the model families, as transformers' import above brings its model's module

        def load():
            return ViTImageClassifier.from_preset(folder)
    else:
        raise SystemExit(f"unknown loader {loader}")
    baseline = rss_mib()
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    load_peak = peak_mib()
    _touch(model)  # transformers maps the file: its weights become resident only when read
    print(json.dumps({"seconds": seconds, "load_peak_mib": load_peak, "peak_mib": peak_mib(),
                      "baseline_mib": baseline, "resident_mib": rss_mib(), "params": _count(model)}))


def _touch(model) -> float:
    if hasattr(model, "parameters"):
        import torch

        with torch.no_grad():
            return float(sum(p.float().sum() for p in model.parameters()))
    from keras import ops

    return float(sum(ops.convert_to_numpy(ops.sum(v.value)) for v in model.weights))


def _count(model) -> int:
    if hasattr(model, "count_params"):
        return int(model.count_params())
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=str(FOLDER), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--envs", default=",".join(ENVIRONMENTS), help="shared, own or both (see the docstring)")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, Path(args.folder))
    make_checkpoint()
    make_aligned_copy()
    size = (FOLDER / "model.safetensors").stat().st_size / 2**20
    envs = args.envs.split(",")
    if unknown := set(envs) - set(ENVIRONMENTS):
        raise SystemExit(f"--envs: unknown {sorted(unknown)}; expected some of {ENVIRONMENTS}")
    contenders = [("transformers", "torch")] + [("keras-zoo", b) for b in args.backends.split(",")]
    pythons = {(env, c): sys.executable if env == "shared" else own_python(*c) for env in envs for c in contenders}
    runs = {(f, env, c): [] for f in FILES for env in envs for c in contenders}
    warm_page_cache()
    for _ in range(args.repeats):
        for file, folder in FILES.items():
            for env in envs:
                for loader, backend in contenders:
                    runs[(file, env, (loader, backend))].append(run_worker(
                        __file__, backend, [loader, "--folder", str(folder)], python=pythons[(env, (loader, backend))]))
    lines = ["| file written by | environment | loader | backend | load s (min-max) | "
             "peak RSS MiB (load + first read) | RSS after imports MiB | peak minus imports MiB | time vs transformers | peak vs transformers |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for file in FILES:
        for env in envs:
            reference = runs[(file, env, ("transformers", "torch"))]
            ref = {k: statistics.median(r[k] for r in reference) for k in ("seconds", "peak_mib")}
            for loader, backend in contenders:
                results = runs[(file, env, (loader, backend))]
                med = {k: statistics.median(r[k] for r in results) for k in ("seconds", "peak_mib", "baseline_mib")}
                spread = f"{min(r['seconds'] for r in results):.2f}-{max(r['seconds'] for r in results):.2f}"
                lines.append(f"| {file} | {env} | {loader} | {backend} | {med['seconds']:.2f} ({spread}) | "
                             f"{med['peak_mib']:.0f} | {med['baseline_mib']:.0f} | "
                             f"{med['peak_mib'] - med['baseline_mib']:.0f} | "
                             f"{med['seconds'] / ref['seconds']:.2f}x | {med['peak_mib'] / ref['peak_mib']:.2f}x |")
                print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section("load", (
            f"## Loading a {size:.0f} MiB float32 checkpoint (ViT, 251M parameters)\n\n"
            f"Command: `python benchmarks/load.py --repeats {args.repeats} --envs {args.envs} --write`\n\n{table}\n\n"
            f"Medians of {args.repeats} runs per loader, file and environment, each in a fresh process, page cache "
            f"warm; ratios against transformers loading the same file in the same kind of environment (\"shared\": "
            f"every backend and the test tools installed, as CI; \"own\": one virtual environment per loader with "
            f"only what it needs, same versions). {versions()}."
        ))


if __name__ == "__main__":
    main()
