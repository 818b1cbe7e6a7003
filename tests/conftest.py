"""Test configuration: offline, isolated caches, and no connection to anything but loopback.

Each pytest process runs under one Keras backend (`KERAS_BACKEND`); every test runs under all
three, one process each.
"""

import ipaddress
import os
import socket
import tempfile

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The hub clients read their endpoints and cache folders when first imported: point them at the
# fake hubs (tests/fake_hubs.py) and a scratch cache before anything imports them.
FAKE_HF_PORT = _free_port()
# MKL (PyTorch's BLAS here) may round differently from run to run as buffer alignment varies;
# strict conditional numerical reproducibility makes each run's arithmetic the same. (The greedy
# paths that varied between CI runs turned out to come from the test tokenizer, fixed in
# gemma_reference.py; this stays so that run-to-run differences have one cause fewer.)
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{FAKE_HF_PORT}"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="zoo-tests-hf-")
os.environ["KAGGLE_API_ENVIRONMENT"] = "TEST"  # kagglesdk then calls http://localhost:7777
for _name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "ZOO_OFFLINE"):
    os.environ.pop(_name, None)
os.environ["HF_HUB_OFFLINE"] = "1"  # hub tests switch it off while their fake hub runs
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The JAX run has 8 CPU devices, for tests/test_distribution.py (JAX reads this once, when imported);
# everything else runs on the first of them, as on one device.
if os.environ.get("KERAS_BACKEND", "jax") == "jax":
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    # Each program compiles once per run: the models, servers and commands of the run (subprocesses inherit
    # these) share JAX's persistent compilation cache, every program in it however quick its compile.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="zoo-tests-jax-cache-"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _check_address(address):
    if isinstance(address, tuple) and address:
        host = address[0]
        try:
            if ipaddress.ip_address(host).is_loopback:
                return
        except ValueError:
            if host == "localhost":
                return
        raise ConnectionRefusedError(f"tests may not reach {host}: only loopback is allowed")


def _guarded_connect(self, address):
    _check_address(address)
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    _check_address(address)
    return _real_connect_ex(self, address)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))  # no real ~/.kaggle, ~/.cache/huggingface/token, ...
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(home / "kaggle"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(home / "kaggle_config"))
    monkeypatch.setenv("ZOO_CACHE", str(home / "zoo"))  # keras-zoo's record of Kaggle downloads


FUZZ_COUNTS: dict[str, int] = {}  # inputs tried per fuzz target (tests/test_fuzz.py), reported at the end


def pytest_terminal_summary(terminalreporter):
    if FUZZ_COUNTS:
        tried = ", ".join(f"{name} {count}" for name, count in sorted(FUZZ_COUNTS.items()))
        terminalreporter.write_line(f"fuzz: inputs tried per target: {tried}")
