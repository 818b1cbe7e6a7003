"""The `zoo` command: a few lines over the library's task objects per subcommand."""

import argparse
import json
import sys
from pathlib import Path

from zoo import finetune_cli

DEFAULT_CLASSIFIER = "vit_tiny_digits"
DEFAULT_LM = "gemma_tiny_pycode"


def _positive_int(text: str) -> int:
    """An argparse type: a positive int, else argparse's own usage error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _base(args) -> dict:
    return {"base": args.base} if args.base else {}


def _add_base(p) -> None:
    p.add_argument("--base", help="with an adapter folder as --preset: the model it applies to (default: the one "
                                   "the adapter names)")


def _classify(args) -> int:
    import zoo

    _say_backend()
    model = zoo.ViTImageClassifier.from_preset(args.preset, **_base(args))
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
    p.add_argument("--preset", default=DEFAULT_CLASSIFIER,
                   help=f"preset name, handle, model folder or adapter folder (default {DEFAULT_CLASSIFIER})")
    p.add_argument("--top-k", type=_positive_int, default=5, help="labels per image (default 5)")
    p.add_argument("--samples", action="store_true", help="also classify the preset's bundled sample images")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_base(p)
    p.set_defaults(run=_classify)


def _generate(args) -> int:
    import zoo

    from zoo.generation import Sampler

    # --top-p or --top-k alone sample at temperature 1, as transformers does; nothing at all is greedy.
    sampling = args.top_p is not None or args.top_k is not None
    temperature = args.temperature if args.temperature is not None else (1.0 if sampling else 0.0)
    sampler = Sampler(temperature=temperature, top_k=args.top_k or 0, top_p=1.0 if args.top_p is None else args.top_p,
                      seed=args.seed)
    _say_backend()
    lm = zoo.GemmaCausalLM.from_preset(args.preset, **_base(args))
    pieces = lm.stream(args.prompt, max_new_tokens=args.max_new_tokens, sampler=sampler, stop=args.stop or None,
                       chat=args.chat)
    if not args.chat and not args.no_echo:
        sys.stdout.write(args.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="stream a text completion to the terminal")
    p.add_argument("prompt", help="the prompt (with --chat: the user's message)")
    p.add_argument("--preset", default=DEFAULT_LM,
                   help=f"preset name, handle, model folder or adapter folder (default {DEFAULT_LM})")
    p.add_argument("--max-new-tokens", type=int, default=64, help="the most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature; 0 (the default) is greedy")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the smallest set reaching P")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt with the tokenizer's chat template")
    p.add_argument("--no-echo", action="store_true", help="print only the completion, not the prompt before it")
    _add_base(p)
    p.set_defaults(run=_generate)


def _add_finetune(sub) -> None:
    finetune_cli.add(sub, _positive_int, _say_backend)


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "B", "T"):
        if abs(n) < 999.5:
            return f"{n:.3g}{suffix}{unit}"
        n /= 1000
    return f"{n:.3g}P{unit}"


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _list(args) -> int:
    import zoo

    cards = zoo.list_presets(task=args.task)
    if not cards:
        tasks = sorted({c.task for c in zoo.list_presets()})
        raise zoo.errors.PresetNotFoundError(f"no presets for task {args.task!r}; tasks are {', '.join(tasks)}")
    if args.json:
        print(json.dumps([{"name": c.name, "task": c.task, "params": c.params, "license": c.license, "gated": c.gated,
                           "bundled": c.bundled is not None, "sources": list(c.sources)} for c in cards], indent=2))
        return 0
    rows = [("NAME", "TASK", "PARAMS", "LICENSE", "NOTES")]
    for c in cards:
        notes = ", ".join(n for n, on in (("bundled", c.bundled), ("gated", c.gated)) if on)
        rows.append((c.name, c.task, _human(c.params), c.license, notes))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return 0


def _add_list(sub) -> None:
    p = sub.add_parser("list", help="list the preset catalogue")
    p.add_argument("--task", help="only presets of this task class, e.g. GemmaCausalLM or ViTImageClassifier")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_list)


def _info(args) -> int:
    from zoo import hub, presets

    card = presets.get(args.name)
    cached = hub.cached_folder(args.name)
    info = {"name": card.name, "task": card.task, "description": card.description, "params": card.params,
            "license": card.license, "gated": card.gated, "sources": list(card.sources),
            "revisions": dict(card.revisions), "bundled": card.bundled is not None,
            "cached": str(cached) if cached else None, "size_bytes": _folder_size(cached) if cached else None}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{card.name}  ({card.task}, {_human(card.params)} parameters)")
    print(f"  {card.description}")
    print(f"  license: {card.license}" + ("  (gated: accept the license on the hub and set a token)" if card.gated else ""))
    for source in card.sources:
        pin = card.revisions.get(source)
        print(f"  source:  {source}" + (f"  (pinned at {pin})" if pin else ""))
    if cached:
        print(f"  local:   {cached}  ({_human(_folder_size(cached), 'B')})")
    else:
        print("  local:   not downloaded (`zoo download " + card.name + "`)")
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show a preset's card, sources and whether it is cached locally")
    p.add_argument("name", help="preset name (see `zoo list`)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_info)


def _download(args) -> int:
    from zoo import hub

    folder = hub.resolve(args.handle, revision=args.revision)
    print(f"{folder}  ({_human(_folder_size(folder), 'B')})")
    return 0


def _add_download(sub) -> None:
    p = sub.add_parser("download", help="download a preset or hf:// / kaggle:// handle into the local cache")
    p.add_argument("handle", help="preset name, hf://org/name[@revision] or kaggle://owner/model/framework/variation[/version]")
    p.add_argument("--revision", help="Hugging Face branch, tag or commit (instead of @revision)")
    p.set_defaults(run=_download)


def _checkpoint_align(args) -> int:
    from zoo.checkpoints_tools.align import align_checkpoint

    for done in align_checkpoint(args.folder, args.output):
        print(f"{done.path}: {done.tensors} tensors, {done.aligned_before} 64-byte aligned before, "
              f"{done.aligned_after} after")
    return 0


def _add_checkpoint(sub) -> None:
    p = sub.add_parser("checkpoint", help="work on safetensors checkpoint folders")
    tools = p.add_subparsers(dest="tool", metavar="TOOL", required=True)
    a = tools.add_parser("align", help="rewrite a checkpoint so JAX and TensorFlow load it without a copy",
                         description="Rewrites the safetensors files of a checkpoint folder with every sizeable "
                                     "tensor 64-byte aligned (same tensors, names, shards and metadata), so "
                                     "that JAX and TensorFlow use the file's mapping as the weights instead of "
                                     "reading them into fresh memory. The files still load in safetensors and "
                                     "transformers.")
    a.add_argument("folder", help="a local checkpoint folder (model.safetensors, or shards with an index)")
    a.add_argument("--output", "-o", help="write the aligned checkpoint here, with copies of the folder's other "
                                          "files (default: replace the files in FOLDER)")
    a.set_defaults(run=_checkpoint_align)


def _serve(args) -> int:
    import logging

    try:
        from zoo.serving import Lora, ServerConfig, check_port, create_app, load_models, serve
    except ImportError as e:
        raise SystemExit(f"zoo serve needs the serving extra: pip install 'keras-zoo[serve]' ({e})") from None

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    loras = [Lora.parse(text) for text in [*(args.lora or []), *(args.lora_modules or [])]]
    max_loras = args.max_loras if args.max_loras is not None else max(4, len(loras))
    config = ServerConfig(host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
                          api_key=args.api_key, max_model_len=args.max_model_len, max_tokens=args.max_tokens,
                          request_timeout_s=args.request_timeout, max_image_pixels=args.max_image_pixels,
                          enable_lora=args.enable_lora or bool(loras), max_loras=max_loras,
                          max_lora_rank=args.max_lora_rank)
    if args.ray or args.replicas is not None or args.autoscale or args.address:
        return _serve_on_ray(args, config, loras)
    check_port(args.host, args.port)
    models = load_models(args.presets)
    app = create_app(models, config, loras)
    print(f"serving {', '.join(app.state.server.served())} on http://{args.host}:{args.port}/v1", flush=True)
    serve(app, config)
    return 0


def _serve_on_ray(args, config, loras) -> int:
    try:
        from zoo.serving import ray_serve
    except ImportError as e:
        raise SystemExit(f"zoo serve --ray needs the serve-ray extra: pip install 'keras-zoo[serve-ray]' ({e})") from None

    if args.autoscale and args.replicas is not None:
        raise SystemExit("zoo serve: give --replicas N or --autoscale MIN:MAX, not both")
    options = ray_serve.RayOptions(replicas=args.replicas or 1, address=args.address, replica_cpus=args.replica_cpus,
                                   autoscale=ray_serve.parse_autoscale(args.autoscale) if args.autoscale else None)
    app = ray_serve.application(args.presets, config, options, loras)
    where = f"http://{args.host}:{args.port}/v1"
    ray_serve.run(app, config, options, ready=lambda: print(f"serving on Ray Serve at {where}", flush=True))
    return 0


def _add_serve(sub) -> None:
    import os

    p = sub.add_parser("serve", help="serve presets over an OpenAI-compatible HTTP API")
    p.add_argument("presets", nargs="*", help="preset names, handles or folders (default: the bundled presets)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="generation slots per model (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default 64)")
    p.add_argument("--max-model-len", type=int, default=2048, help="positions per slot (default 2048, at most the model's)")
    p.add_argument("--max-tokens", type=int, default=None, help="the most max_tokens a request may ask for")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is cut off")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000,
                   help="largest image (width x height) /v1/classify decodes (default 40M)")
    p.add_argument("--api-key", default=os.environ.get("ZOO_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (default $ZOO_API_KEY)")
    p.add_argument("--lora", action="append", metavar="NAME=PATH",
                   help="serve a PEFT adapter (folder, hf://..., kaggle://...) over its base as model NAME, in the "
                        "same batch as the base; repeat for more")
    p.add_argument("--lora-modules", nargs="+", metavar="NAME=PATH",
                   help="vLLM's spelling of --lora; also JSON: '{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'")
    p.add_argument("--enable-lora", action="store_true",
                   help="allow adapters to be loaded at run time (POST /v1/load_lora_adapter); implied by --lora")
    p.add_argument("--max-loras", type=int, default=None,
                   help="adapters loaded at once per base model (default: 4, or the number given)")
    p.add_argument("--max-lora-rank", type=int, default=16, help="the highest adapter rank served (default 16)")
    r = p.add_argument_group("Ray Serve (the serve-ray extra)")
    r.add_argument("--ray", action="store_true",
                   help="deploy on Ray Serve: replicas that each load the presets, behind one endpoint")
    r.add_argument("--replicas", type=int, default=None, help="replicas to run (default 1; implies --ray)")
    r.add_argument("--autoscale", metavar="MIN:MAX", help="scale between MIN and MAX replicas on load (implies --ray)")
    r.add_argument("--address", metavar="ray://HOST:PORT",
                   help="the Ray cluster to deploy on (default: start one on this machine; implies --ray)")
    r.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")
    p.set_defaults(run=_serve)


COMMANDS = [_add_classify, _add_generate, _add_list, _add_info, _add_download, _add_finetune, _add_serve,
            _add_checkpoint]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo", description="keras-zoo: pretrained multi-backend models for Keras 3")
    p.add_argument("--version", action="store_true", help="print the versions of keras-zoo, Keras and the backend")
    p.add_argument("--verbose", action="store_true",
                   help="keep the backends' own start-up lines (TensorFlow's C++ notices are silenced otherwise)")
    p.add_argument("--backend", choices=("jax", "torch", "tensorflow"),
                   help="the Keras backend for this command (default: $KERAS_BACKEND, then your ~/.keras/keras.json, "
                        "then the first installed of jax, torch, tensorflow)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return p


def _quiet_native_output() -> None:
    """For the rest of the command, Python's stderr (keras-zoo's lines, warnings, logging, tracebacks) stays
    the terminal's, while what native code writes to file descriptor 2 goes nowhere: TensorFlow 2.21 writes its
    absl, oneDNN and XLA notices from C++ there, whatever TF_CPP_MIN_LOG_LEVEL says. `--verbose` keeps them."""
    import os

    sys.stderr.flush()
    terminal = os.dup(2)
    sys.stderr = open(terminal, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def _say_backend() -> None:
    """One line on stderr: the backend and device a command that loads a model runs on."""
    from zoo import backends

    where = backends.describe()
    print(f"zoo: {where['backend']} backend on {where['device']}", file=sys.stderr)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    import os

    if args.backend:
        if "keras" in sys.modules:
            raise SystemExit("zoo --backend: Keras is already imported in this process; set KERAS_BACKEND instead")
        os.environ["KERAS_BACKEND"] = args.backend
    if argv is None and not args.verbose and getattr(args, "run", None) is not None:  # the `zoo` program itself,
        _quiet_native_output()  # not a caller's process (main(argv) from Python keeps its streams)
    if args.version:
        from importlib.metadata import PackageNotFoundError, version

        import keras

        import zoo

        backend = zoo.backends.describe()["backend"]
        backend_version = "?"
        for distribution in (backend, backend + "-cpu"):  # TensorFlow's CPU build has its own distribution name
            try:
                backend_version = version(distribution)
                break
            except PackageNotFoundError:
                pass
        print(f"keras-zoo {zoo.__version__}, Keras {keras.__version__}, backend {backend} {backend_version}")
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
