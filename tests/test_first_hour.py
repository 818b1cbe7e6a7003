"""A new user's first hour: the same backend on every run, a CLI that answers without loading a backend."""

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("keras", "jax", "torch", "tensorflow")


def run(args: list[str], home, backend: str | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "KERAS_HOME")}
    env["HOME"] = str(home)
    if backend:
        env["KERAS_BACKEND"] = backend
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "zoo.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def backend_of(proc) -> str:
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split("backend ")[1].split()[0]  # "keras-zoo 0.1.0, Keras 3.x, backend jax 0.x"


@pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "jax") != "jax",
                    reason="backend-independent (fresh processes choose their own backend): run once, in the JAX run")
def test_the_backend_is_the_same_on_every_run(tmp_path):
    """Keras writes its defaults ("tensorflow") to ~/.keras/keras.json on its first import: no one's choice,
    so the second run must not switch to it."""
    first = backend_of(run(["--version"], tmp_path))
    written = json.loads((tmp_path / ".keras" / "keras.json").read_text())
    assert written["backend"] == "tensorflow" and first == "jax"  # jax is installed here: keras-zoo's default
    assert backend_of(run(["--version"], tmp_path)) == first
    assert backend_of(run(["--version"], tmp_path, backend="torch")) == "torch"
    assert backend_of(run(["--backend", "tensorflow", "--version"], tmp_path)) == "tensorflow"
    (tmp_path / ".keras" / "keras.json").write_text(json.dumps({**written, "backend": "torch", "floatx": "float32",
                                                                 "image_data_format": "channels_last"}))
    assert backend_of(run(["--version"], tmp_path)) == "torch"  # the user's own choice


CHECK = ("import sys\nfrom zoo import cli\ntry:\n    cli.main({args!r})\nexcept SystemExit:\n    pass\n"
         "print('HEAVY', sorted(m for m in {heavy!r} if m in sys.modules))")


@pytest.mark.parametrize("args", [["--help"], ["list"], ["info", "vit_tiny_digits"], ["list", "--help"],
                                  ["serve", "--help"]])
def test_catalogue_commands_load_no_backend(tmp_path, args):
    proc = run([], tmp_path, code=CHECK.format(args=args, heavy=HEAVY))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_import_zoo_loads_no_backend_until_a_model_is_used(tmp_path):
    code = ("import sys, zoo\ncards = zoo.list_presets()\nprint(len(cards), sorted(m for m in {heavy!r} if m in "
            "sys.modules))\nzoo.ViTImageClassifier\nprint('keras' in sys.modules)").format(heavy=HEAVY)
    proc = run([], tmp_path, code=code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    count, loaded = proc.stdout.strip().splitlines()
    assert int(count.split()[0]) > 5 and count.endswith("[]") and loaded == "True"


def test_preset_cards_print_in_one_line():
    import zoo

    for card in zoo.list_presets():
        text = repr(card)
        assert text.startswith(f"PresetCard({card.name!r}, {card.task}, ") and "\n" not in text and len(text) < 160


def test_generation_past_the_models_positions_says_so(tmp_path):
    import zoo
    from gemma_reference import save_hf_gemma

    lm = zoo.GemmaCausalLM.from_preset(save_hf_gemma(tmp_path / "g", "gemma"))  # 96 positions
    prompt = "def add(a, b):"
    n = len(lm.tokenizer.encode(prompt))
    with pytest.warns(UserWarning, match=rf"max_new_tokens=500 with a {n}-token prompt passes the model's 96 "
                                         rf"positions; generation stops after {96 - n} new tokens"):
        lm.generate(prompt, max_new_tokens=500)


@pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "jax") != "jax",
                    reason="backend-independent (the script starts its own processes): run once, in the JAX run")
def test_the_test_script_runs_the_backends_named(tmp_path):
    proc = subprocess.run(["bash", "scripts/test.sh", "torch", "--collect-only", "-q", "tests/test_presets.py"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "=== KERAS_BACKEND=torch" in proc.stdout and "KERAS_BACKEND=jax" not in proc.stdout
    both = subprocess.run(["bash", "scripts/test.sh", "torch", "tensorflow", "--collect-only", "-q",
                           "tests/test_presets.py"], capture_output=True, text=True, timeout=300)
    assert both.returncode == 0, both.stdout[-2000:]  # two at once, each printed whole under its own header
    for backend in ("torch", "tensorflow"):
        assert both.stdout.count(f"=== KERAS_BACKEND={backend}\n") == 1
    torch_part = both.stdout.split("=== KERAS_BACKEND=torch\n")[1].split("=== KERAS_BACKEND=")[0]
    assert "tests collected" in torch_part or "test_presets.py" in torch_part
    failing = subprocess.run(["bash", "scripts/test.sh", "torch", "tensorflow", "-q", "tests/no_such_file.py"],
                             capture_output=True, text=True, timeout=300)
    assert failing.returncode == 1 and failing.stdout.count("=== KERAS_BACKEND=") == 2


@pytest.mark.parametrize("args", [["classify", "--samples", "--top-k", "1"], ["generate", "def add", "--max-new-tokens", "4"]])
def test_commands_print_nothing_but_their_own_lines_on_stderr(tmp_path, args):
    backend = os.environ.get("KERAS_BACKEND", "jax")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-m", "zoo.cli", "--backend", backend, *args], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [f"zoo: {backend} backend on cpu"], proc.stderr[-2000:]


@pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "jax") != "tensorflow", reason="the warning is tf.function's")
def test_a_warmed_up_engine_warns_of_no_retracing(tmp_path):
    """An engine compiles one program per shape bucket by design; on TensorFlow that once meant a retracing
    warning per few shapes in every server log. Library code, so the user's own process: nothing on stderr."""
    backend = os.environ.get("KERAS_BACKEND", "jax")
    code = ("import zoo\nlm = zoo.GemmaCausalLM.from_preset('gemma_tiny_pycode')\nlm.engine(8, 128).warm_up()\n"
            "print(lm.generate(['def a', 'import os'], max_new_tokens=3))\n")
    proc = run([], tmp_path, backend, code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "retracing" not in proc.stderr, proc.stderr[-2000:]


def test_every_subpackage_is_in_the_distribution():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "zoo"
    listed = set(tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"zoo." + ".".join(p.parent.relative_to(root).parts) for p in root.rglob("__init__.py")
             if p.parent != root and "__pycache__" not in p.parts}
    assert found <= listed, f"not packaged: {sorted(found - listed)}"
