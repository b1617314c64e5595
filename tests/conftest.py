"""Test set-up: 8 fake CPU devices and the CPU convolution flag, before any JAX op."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# Tests run tiny shapes: XLA's backend optimisations cost more compile time than they save.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

from rkd_jax import platform

platform.configure_cpu_flags()

import importlib.util
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Generated data and TFDS caches of the test session stay out of the user's cache.
os.environ["RKD_JAX_CACHE"] = tempfile.mkdtemp(prefix="rkd_jax_test_cache_")


def load_config(name: str = "distill", arg: str = "tiny"):
    """configs/<name>.py:<arg> as main would load it."""
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


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
