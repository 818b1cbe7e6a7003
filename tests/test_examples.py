"""The documented examples run offline and reach what their docstrings state."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_digits_parity_reaches_the_stated_accuracy(tmp_path, capsys):
    example = load("finetune_digits_parity")
    assert "97 %" in example.__doc__
    accuracy = example.main(["--workdir", str(tmp_path)])
    assert accuracy >= 0.97
    printed = capsys.readouterr().out
    assert "val_accuracy" in printed and sum(line.endswith(")") and ": " in line for line in printed.splitlines()) == 4
