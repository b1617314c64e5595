"""Test set-up: 8 fake CPU devices and the CPU convolution flag, before any JAX op."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

from rkd_jax import platform  # noqa: E402

platform.configure_cpu_flags()
