"""Tests run on 8 simulated CPU devices; the flag must be set before jax is imported.

One persistent XLA compilation cache serves the whole session: in-process tests and the commands
they start as subprocesses (which inherit this environment) compile the same tiny programs, and
every compile after the first is a cache hit. It lives in a temporary folder removed at the end;
set JAX_COMPILATION_CACHE_DIR to a folder of your own to keep it across sessions (a quicker
`pytest -m "not slow"` loop)."""
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # TensorFlow must never take a GPU
_SESSION_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _SESSION_CACHE = tempfile.mkdtemp(prefix="lcssl-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import sys
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_unconfigure(config):
    if _SESSION_CACHE:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture
def x64():
    """jax's x64 mode for one test: float64 arrays stay float64 (tests/numerics.py)."""
    from tests import numerics
    with numerics.float64():
        yield
