"""`zoo finetune text|images`: the flags, a config file under them, and a few lines over `zoo.finetune`."""

import functools
from pathlib import Path


def _flags(positive_int=int) -> list:
    """(flag, the one task it is for or "", argparse keywords); a config file may set any of them by name."""
    return [
        ("--val", "", dict(metavar="PATH", help="validation data (text: a JSONL file; images: a folder)")),
        ("--val-split", "", dict(type=float, help="else hold out this seeded fraction (default 0)")),
        ("--epochs", "", dict(type=positive_int, help="passes over the data (default 1)")),
        ("--batch-size", "", dict(type=positive_int, help="examples per step (default 8)")),
        ("--lr", "", dict(type=float, help="peak learning rate (default 2e-4 with LoRA, 2e-5 full)")),
        ("--warmup-ratio", "", dict(type=float, help="warm-up steps as a fraction of all (default 0.05)")),
        ("--weight-decay", "", dict(type=float, help="AdamW weight decay, not on norms/biases (default 0.01)")),
        ("--max-length", "text", dict(type=positive_int, help="text: tokens per row (default 512)")),
        ("--packing", "text", dict(action="store_true", default=None, help="text: pack short examples into rows")),
        ("--lora-rank", "", dict(type=positive_int, help="LoRA rank (default 8)")),
        ("--lora-alpha", "", dict(type=float, help="LoRA alpha (default: the rank)")),
        ("--lora-targets", "", dict(help="comma-separated module names, or all-linear (default: PEFT's)")),
        ("--lora-dropout", "", dict(type=float, help="dropout on the adapter's input (default 0)")),
        ("--rslora", "", dict(action="store_true", default=None, help="rank-stabilised LoRA scaling")),
        ("--full", "", dict(action="store_true", default=None, help="train every weight instead of a LoRA adapter")),
        ("--no-flip", "images", dict(action="store_true", default=None, help="images: no random horizontal flips")),
        ("--merge", "", dict(action="store_true", default=None, help="write a merged preset folder, not an adapter")),
        ("--seed", "", dict(type=int, help="seed of the data order, augmentation and adapter init (default 0)")),
        ("--precision", "", dict(choices=("float32", "mixed_bfloat16", "bfloat16"), help="dtype policy (default float32)")),
        ("--mesh", "", dict(metavar="BATCHxMODEL", help="split over devices (JAX): 8x1 data parallel, 2x4 "
                                                       "model parallel over 4 devices per replica (zoo.distribution)")),
        ("--jit-compile", "", dict(action="store_true", default=None,
                                   help="compile the training step (PyTorch: torch.compile; slow to start, faster after)")),
        ("--resume", "", dict(action="store_true", default=None, help="go on from the last checkpoint in OUTPUT")),
        ("--overwrite", "", dict(action="store_true", default=None, help="write into an OUTPUT folder that is not empty")),
        ("--config", "", dict(metavar="FILE", help="a TOML or YAML file of these settings; flags override it")),
    ]


def run(args, say_backend=lambda: None) -> int:
    import zoo
    from zoo.finetune import Options, read_config_file

    values = read_config_file(args.config) if args.config else {}
    known = Options.fields() | {"preset", "data", "output", "lr", "val_split"} | {
        flag[2:].replace("-", "_") for flag, _, _ in _flags()}
    if set(values) - known:
        raise zoo.errors.ConfigError(f"{Path(args.config).name}: unknown fine-tuning option(s) "
                                     f"{sorted(set(values) - known)}; expected some of {sorted(known)}")
    values.update({k: v for k, v in vars(args).items() if v is not None})  # the flags win
    values = {{"lr": "learning_rate", "val_split": "validation_split"}.get(k, k): v for k, v in values.items()}
    for needed in ("preset", "data", "output"):
        if not values.get(needed):
            raise SystemExit(f"zoo finetune {args.task}: give --{needed} (or set it in --config)")
    options = {field: values[field] for field in Options.fields() if field in values}
    if "full" in values:
        options["lora"] = not values["full"]
    if "no_flip" in values:
        options["flip"] = not values["no_flip"]
    if isinstance(options.get("lora_targets"), str) and options["lora_targets"] != "all-linear":
        options["lora_targets"] = tuple(t.strip() for t in options["lora_targets"].split(",") if t.strip())
    options = Options.make(**options)  # errors before any model loads
    dtype = None if values.get("precision", "float32") == "float32" else values["precision"]
    common = dict(validation=values.get("val"), output=values["output"], resume=bool(values.get("resume")),
                  overwrite=bool(values.get("overwrite")), merge=bool(values.get("merge")),
                  **{k: v for k, v in vars(options).items()})
    zoo.finetune.check_output(values["output"], bool(values.get("resume")), bool(values.get("overwrite")))
    say_backend()
    if values.get("mesh"):
        import keras

        from zoo import distribution

        batch, _, model = str(values["mesh"]).lower().partition("x")
        if not (batch.isdigit() and model.isdigit()):
            raise zoo.errors.DistributionError(f"--mesh {values['mesh']!r}: expected BATCHxMODEL, e.g. 8x1 or 2x4")
        mesh = distribution.mesh(int(batch), int(model))  # checks the devices there are
        keras.distribution.set_distribution(distribution.data_parallel() if int(model) == 1
                                            else distribution.model_parallel(mesh))
    if args.task == "text":
        model = zoo.GemmaCausalLM.from_preset(values["preset"], dtype=dtype)
        summary = zoo.finetune.text(model, values["data"], **common)
    else:
        from zoo import hub, loader, models

        models.register_all()  # the families' formats, for loader.detect
        data = zoo.finetune.image_folder(values["data"])
        folder = hub.resolve(values["preset"])
        same = not loader.is_adapter(folder) and tuple(loader.detect(folder).read_config(
            loader.read_config(folder)).labels) == data.labels  # else a new head for the folder's labels
        model = zoo.ViTImageClassifier.from_preset(values["preset"], dtype=dtype,
                                                   **({} if same else {"labels": data.labels}))
        summary = zoo.finetune.images(model, data, **common)
    print("\n".join(summary.lines()))
    print(f"wrote {values['output']}")
    return 0


def add(sub, positive_int=int, say_backend=lambda: None) -> None:
    """The `finetune` subcommand on the CLI's subparsers (the CLI gives its argument type and backend line)."""
    p = sub.add_parser("finetune", help="fine-tune a preset on a JSONL file or an image folder (LoRA by default)")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    for task, data_help in (("text", "a JSONL file of {text}, {prompt, completion} or {messages} examples"),
                            ("images", "an image folder: one subfolder of images per label")):
        t = tasks.add_parser(task, help=f"fine-tune on {data_help}")
        t.add_argument("--preset", help="preset name, handle or folder to start from")
        t.add_argument("--data", help=data_help)
        t.add_argument("--output", "-o", help="folder for checkpoints and the result (a PEFT adapter by default)")
        for flag, only, options in _flags(positive_int):
            if only in ("", task):
                t.add_argument(flag, **options)
        t.set_defaults(run=functools.partial(run, say_backend=say_backend))
