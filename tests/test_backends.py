"""The fence around the backends, public APIs only, no import circles, and every attention kernel against the references."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import torch
from keras.ops import convert_to_numpy as to_numpy

import zoo
from zoo import backends
from zoo.errors import BackendError
from zoo.layers import attention
from gemma_reference import reference, save_hf_gemma
from vit_reference import hf_logits, save_hf_vit

REPO = Path(__file__).resolve().parents[1]
PACKAGE = {"zoo": REPO / "zoo", "zoo.serving": REPO / "serving", "zoo.checkpoints_tools": REPO / "checkpoints_tools",
           "zoo.presets": REPO / "presets"}
FRAMEWORKS = {"jax", "jaxlib", "torch", "tensorflow"}
BACKEND_NAMES = {"jax", "torch", "tensorflow"}


def modules() -> dict[str, tuple[Path, ast.Module]]:
    """Every module of the installed package by dotted name, parsed."""
    found = {}
    for root, folder in PACKAGE.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((root, *parts[:-1])) if parts[-1] == "__init__" else ".".join((root, *parts))
            found[name] = (path, ast.parse(path.read_text(), str(path)))
    return found


def imports(name: str, tree: ast.Module, known=()) -> set[str]:
    """The modules a module imports, module-level and inside functions alike (`from a import b`: a.b if that
    is one of the `known` modules, else a)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(name.split(".")[: -node.level] + ([base] if base else []))
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return out


def fenced(name: str) -> bool:
    return name == "zoo.backends" or name.startswith("zoo.backends.")


def test_frameworks_are_imported_and_named_inside_the_fence_only():
    """No module outside zoo/backends/ imports JAX, PyTorch or TensorFlow, asks Keras which backend runs,
    or compares anything with a backend's name. Only the start-up choice (zoo._select_backend) and
    `zoo --version` read the backend's name."""
    offences = []
    for name, (path, tree) in modules().items():
        if fenced(name):
            continue
        for module in imports(name, tree):
            if module.split(".")[0] in FRAMEWORKS:
                offences.append(f"{path.name}: imports {module}")
        source = path.read_text()
        if name != "zoo._select_backend" and ("backend.backend(" in source or "backends.NAME" in source):
            offences.append(f"{path.name}: asks which backend runs")
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                for operand in (node.left, *node.comparators):
                    if isinstance(operand, ast.Constant) and operand.value in BACKEND_NAMES:
                        offences.append(f"{path.name}:{node.lineno}: compares with {operand.value!r}")
    assert not offences, "\n".join(offences)


PRIVATE = ("keras.src", "tensorflow.python", "torch._C", "jax._src", "jaxlib.", "kagglehub.", "huggingface_hub._",
           "safetensors._", "tokenizers._", "transformers.")


def test_other_libraries_are_used_through_their_public_apis():
    """No private module of another library is imported (kagglehub and huggingface_hub: their top level
    and public submodules only), and no other object's private attribute is written."""
    offences = []
    public = {"kagglehub", "huggingface_hub", "huggingface_hub.errors", "huggingface_hub.constants"}
    for name, (path, tree) in modules().items():
        for module in imports(name, tree):
            if module.startswith("zoo") or module in public:
                continue
            if module.startswith(PRIVATE) or any(part.startswith("_") for part in module.split(".")[1:]):
                offences.append(f"{path.name}: imports {module}")
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                if (isinstance(target, ast.Attribute) and target.attr.startswith("_")
                        and not (isinstance(target.value, ast.Name) and target.value.id in ("self", "cls"))):
                    offences.append(f"{path.name}:{node.lineno}: writes {ast.unparse(target)}")
    assert not offences, "\n".join(offences)


# The arrows of the package's map point down this list: a module imports its own tier or those below.
TIERS = [
    ("ground", lambda n: n in ("zoo.errors", "zoo.host", "zoo.files", "zoo.registry", "zoo._select_backend")),
    ("fence, hub", lambda n: fenced(n) or n in ("zoo.hub", "zoo.presets", "zoo.distribution")),
    ("loading, layers", lambda n: n in ("zoo.checkpoint", "zoo.safetensors_file", "zoo.key_map", "zoo.loader",
                                        "zoo.tokenizer") or n.startswith("zoo.layers")),
    ("models, lora, finetune, generation", lambda n: n.startswith(("zoo.models", "zoo.lora", "zoo.finetune.",
                                                                    "zoo.generation")) or n == "zoo.finetune"),
    ("face", lambda n: n == "zoo"),
    ("server, cli, tools", lambda n: n.startswith(("zoo.serving", "zoo.checkpoints_tools")) or n in ("zoo.cli",
                                                                                                    "zoo.finetune_cli")),
]


def tier(name: str) -> int:
    return next(i for i, (_, belongs) in enumerate(TIERS) if belongs(name))


def test_imports_point_down_and_close_no_circle():
    found = modules()
    graph = {name: {m for m in imports(name, tree, found) if m in found and m != name}
             for name, (_, tree) in found.items()}
    upward = [f"{name} ({TIERS[tier(name)][0]}) imports {m} ({TIERS[tier(m)][0]})"
              for name, targets in graph.items() for m in targets if tier(m) > tier(name)]
    assert not upward, "\n".join(upward)
    for ground in ("zoo.errors", "zoo.host"):
        assert not graph[ground], f"{ground} imports {graph[ground]}"
    seen, stack = set(), []

    def visit(name):  # depth first; a module met again while on the stack closes a circle
        if name in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(name):] + [name]))
        if name in seen:
            return
        stack.append(name)
        for target in sorted(graph[name]):
            if not (target == "zoo" or name == "zoo"):  # every module's package is imported first; the face is no circle
                visit(target)
        stack.pop()
        seen.add(name)

    for name in sorted(graph):
        visit(name)


# ----------------------------------------------------------------------------- attention kernels


def _reference_attention(q, k, v, scale, mask=None, softcap=None):
    """NumPy, float64: the definition."""
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, k).astype(np.float64) * scale
    if softcap:
        scores = softcap * np.tanh(scores / softcap)
    if mask is not None:
        scores = np.where(mask[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v)


RUNNABLE = sorted(attention.KERNELS)  # those this backend has (sdpa only on PyTorch)


@pytest.mark.parametrize("kernel", RUNNABLE)
@pytest.mark.parametrize("case", ["plain", "grouped_masked", "softcapped"])
def test_each_kernel_matches_the_definition(kernel, case):
    rng = np.random.default_rng(0)
    b, t, s, n, h = 2, 5, 7, 4, 8
    kv = 2 if case != "plain" else n
    q = rng.standard_normal((b, t, n, h)).astype("float32")
    k, v = (rng.standard_normal((b, s, kv, h)).astype("float32") for _ in range(2))
    mask = (np.arange(s)[None, None, :] <= np.arange(t)[None, :, None] + 2) if case != "plain" else None
    mask = None if mask is None else np.broadcast_to(mask, (b, t, s)).copy()
    softcap = 3.0 if case == "softcapped" else None
    with backends.use_attention(kernel):
        got = to_numpy(attention.attention(q, k, v, 0.3, mask, softcap=softcap))
    np.testing.assert_allclose(got, _reference_attention(q, k, v, 0.3, mask, softcap), atol=2e-6, rtol=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernels")
    vit = save_hf_vit(root / "vit", seed=3, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                      intermediate_size=40, image_size=16, patch_size=4, num_labels=5)
    return vit, save_hf_gemma(root / "gemma3", "gemma3", seed=1)


@pytest.mark.parametrize("kernel", RUNNABLE)
def test_each_kernel_runs_the_models_as_transformers_does(tiny, kernel):
    """Each kernel that can run on a CPU, forced for every call it can take: the ViT (plain attention) and
    Gemma 3 (grouped, masked, sliding) still give transformers' logits."""
    vit, gemma = tiny
    pixels = np.random.default_rng(1).standard_normal((2, 16, 16, 3)).astype("float32")
    ids = np.random.default_rng(2).integers(3, 150, (2, 11)).astype("int32")
    with backends.use_attention(kernel):
        got = to_numpy(zoo.ViTImageClassifier.from_preset(vit)(pixels))
        logits = to_numpy(zoo.GemmaCausalLM.from_preset(gemma)(ids))
    np.testing.assert_allclose(got, hf_logits(vit, pixels), atol=1e-4, rtol=0)
    with torch.no_grad():
        want = reference(gemma)(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)


def test_the_choice_is_visible_and_can_be_forced():
    described = backends.describe()
    assert described["backend"] == keras.backend.backend() and described["device"] == "cpu"
    assert {described["attention"]["plain"], described["attention"]["masked"]} <= set(attention.KERNELS)
    assert attention.kernel_for(masked=True, grouped=True) == described["attention"]["masked"]
    with backends.use_attention("reference"):
        assert backends.describe()["attention"]["forced"] == "reference"
        assert attention.kernel_for(masked=False, grouped=False) == "reference"
    with backends.use_attention("heads_first"):  # it takes no mask: masked calls keep their kernel
        assert attention.kernel_for(masked=True, grouped=True) == described["attention"]["masked"]
    assert backends.describe()["attention"]["forced"] is None
    json.dumps(described)  # plain data, for logs and bug reports
    with pytest.raises(BackendError, match=r"unknown attention kernel 'flash' on this backend; expected one of"):
        with backends.use_attention("flash"):
            attention.kernel_for(masked=False, grouped=False)


def test_a_backend_outside_the_fence_is_refused_at_import():
    """Keras on its NumPy backend: the first use of a model class says which backends keras-zoo runs on, instead
    of failing later (`import zoo` itself loads no backend)."""
    env = dict(os.environ, KERAS_BACKEND="numpy")
    done = subprocess.run([sys.executable, "-c", "import zoo; zoo.ViTImageClassifier"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    assert "BackendError: Keras runs on 'numpy'; keras-zoo runs on jax, torch, tensorflow" in done.stderr
