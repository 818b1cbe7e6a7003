"""Write `zoo/models/vit/timm_architectures.py`: timm's named ViT architectures and their arguments.

A timm checkpoint's `config.json` names its architecture (`vit_small_patch14_dinov2`) but
usually not the arguments timm builds it with (`init_values=1e-5` ...): those live in timm's
source, one function per name. This reads that source (it does not import timm, which needs
torchvision) and writes the table keras-zoo reads, split into the architectures our ViT
builds and those it refuses, with the reason.

    python checkpoints_tools/timm_vit_table.py [path/to/timm/models/vision_transformer.py]

Without a path it uses the installed timm's file. The table records the timm version it came from.
"""

import argparse
import ast
import importlib.metadata
import importlib.util
import operator
import sys
from pathlib import Path

OUTPUT = Path(__file__).resolve().parents[1] / "zoo" / "models" / "vit" / "timm_architectures.py"

# Arguments our ViT honours, and the values of the others it can take (their defaults in timm).
SUPPORTED = {"img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "global_pool",
             "class_token", "no_embed_class", "reg_tokens", "pre_norm", "final_norm", "fc_norm", "init_values",
             "act_layer", "norm_eps", "dynamic_img_size", "mlp_layer"}
ACTIVATIONS = {"gelu", "quick_gelu", "gelu_tanh", "silu"}
POOLS = {"token", "avg", "map"}
# Classes timm passes where the table needs a name: layers by timm's own name, activations by the
# name timm's get_act_layer gives them.
CLASSES = {"mlp_layer": {"SwiGLUPacked": "SwiGLUPacked"}, "act_layer": {"nn.SiLU": "silu"}}
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _number(node: ast.AST):
    """A literal or constant arithmetic (`64 / 13`, `2.66667 * 2`) as timm writes mlp_ratio."""
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_number(node.left), _number(node.right))
    return ast.literal_eval(node)


def _argument(name: str, node: ast.AST):
    """(our name, value) of one timm model argument, or (name, None) with the source text if we cannot read it."""
    if name == "norm_layer":  # partial(LayerNorm, eps=1e-5): a LayerNorm with another epsilon
        if (isinstance(node, ast.Call) and ast.unparse(node.func) == "partial" and len(node.args) == 1
                and ast.unparse(node.args[0]) in ("LayerNorm", "nn.LayerNorm")
                and [k.arg for k in node.keywords] == ["eps"]):
            return "norm_eps", float(_number(node.keywords[0].value))
        return name, None
    if name in CLASSES and isinstance(node, (ast.Name, ast.Attribute)):
        return name, CLASSES[name].get(ast.unparse(node))
    try:
        return name, _number(node)
    except (ValueError, TypeError, SyntaxError):
        return name, None


def _refusal(args: dict, unreadable: dict) -> str | None:
    """Why our ViT cannot build these arguments, or None if it can."""
    if unreadable:
        return ", ".join(f"{k}={v}" for k, v in unreadable.items())
    for key, value in args.items():
        if key not in SUPPORTED:
            return f"{key}={value!r}"
    if args.get("global_pool", "token") not in POOLS:
        return f"global_pool={args['global_pool']!r}"
    if args.get("act_layer", "gelu") not in ACTIVATIONS:
        return f"act_layer={args['act_layer']!r}"
    return None


def read_table(source: str) -> tuple[dict, dict]:
    """timm's `def vit_*` functions -> ({name: args we build}, {name: why we do not})."""
    supported, refused = {}, {}
    for fn in ast.parse(source).body:
        if not (isinstance(fn, ast.FunctionDef) and fn.name.startswith("vit_")):
            continue
        assigned = [st.value for st in fn.body if isinstance(st, ast.Assign)
                    and isinstance(st.targets[0], ast.Name) and st.targets[0].id == "model_args"]
        if len(assigned) != 1 or not isinstance(assigned[0], ast.Call):
            refused[fn.name] = "its arguments are not a plain dict(...)"
            continue
        args, unreadable = {}, {}
        for keyword in assigned[0].keywords:
            key, value = _argument(keyword.arg, keyword.value)
            if value is None:
                unreadable[key] = ast.unparse(keyword.value)
            else:
                args[key] = value
        reason = _refusal(args, unreadable)
        if reason is None:
            supported[fn.name] = args
        else:
            refused[fn.name] = reason
    return supported, refused


def _lines(table: dict) -> str:
    """One entry per line, sorted: `    "name": value,`."""
    return "".join(f"    {name!r}: {table[name]!r},\n" for name in sorted(table))


def render(supported: dict, refused: dict, version: str) -> str:
    return (
        f'"""timm {version}\'s named ViT architectures: the arguments timm builds each with, or why keras-zoo\'s\n'
        "ViT does not build it. Written by `checkpoints_tools/timm_vit_table.py` from timm's source; do not edit.\n"
        '"""\n\n'
        f"TIMM_VERSION = {version!r}\n\n"
        f"ARCHITECTURES = {{\n{_lines(supported)}}}\n\n"
        f"REFUSED = {{\n{_lines(refused)}}}\n"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, help="timm's models/vision_transformer.py")
    parser.add_argument("--version", help="the timm version the file is from (default: the installed timm's)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    source, version = args.source, args.version
    if source is None:
        spec = importlib.util.find_spec("timm")  # finds the package without running it
        if spec is None or not spec.submodule_search_locations:
            parser.error("timm is not installed: give the path of its models/vision_transformer.py")
        source = Path(next(iter(spec.submodule_search_locations))) / "models" / "vision_transformer.py"
        version = version or importlib.metadata.version("timm")
    if not version:
        parser.error("--version is needed with a source path")
    supported, refused = read_table(source.read_text())
    args.output.write_text(render(supported, refused, version))
    print(f"{args.output}: {len(supported)} architectures, {len(refused)} refused", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
