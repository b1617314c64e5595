"""Test set-up: 8 fake CPU devices and the CPU convolution flag, before any JAX op."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# Level 1, not 0: 0 compiles the unit tests' small programs a little faster (about 70 s of CPU
# over those files), but runs large element-wise programs ~10x slower. Initialising the tiny
# models (the MiniLM embedding table is 30522 x 384) took 15 s instead of 1.3 s, and
# train_and_evaluate does it for every phase on each of the 8 devices: ~2 min per phase.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=1"
# One compilation cache for the test session and the commands it starts (they inherit the
# environment): the many runs of the tiny configs compile the same train, eval and init
# programs; a run that finds its program there loads it instead of compiling it again.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rkd_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from rkd_jax import platform

platform.configure_cpu_flags()

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Generated data and TFDS caches of the test session stay out of the user's cache.
os.environ["RKD_JAX_CACHE"] = tempfile.mkdtemp(prefix="rkd_jax_test_cache_")


def load_config(name: str = "distill", arg: str = "tiny"):
    """configs/<name>.py:<arg>, loaded by its file path as main would load it."""
    from rkd_jax.config_loader import load_config_file

    return load_config_file(f"{ROOT / 'configs' / name}.py:{arg}")


def tiny_config(**run_overrides):
    c = load_config("distill", "tiny")
    c.run.max_steps = 6
    c.run.max_eval_examples = 16
    c.run.update(run_overrides)
    return c


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A distillation run of the tiny config (teacher first, 6 steps each), trained once per
    test session through train_and_evaluate: workdir with teacher/ and the student."""
    from rkd_jax import train

    workdir = tmp_path_factory.mktemp("tiny_run")
    config = tiny_config()
    train.train_and_evaluate(config, workdir)
    return workdir


def pytest_collection_modifyitems(config, items):
    """Every test that needs the trained tiny run is one of the suite's `slow` end-to-end checks:
    training it costs ~1.5 min of CPU, more than the whole `-m "not slow"` loop."""
    for item in items:
        if "tiny_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
