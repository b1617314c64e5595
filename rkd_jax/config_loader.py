"""Load `configs/<file>.py[:variant]` outside absl flags (report, demo, benchmarks)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def load_config_file(spec: str):
    """'configs/distill.py:paper' -> the ConfigDict its get_config('paper') returns."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {file}: not found (expected e.g. configs/distill.py)")
    module_spec = importlib.util.spec_from_file_location(f"rkd_config_{file.stem}", file)
    if module_spec is None:
        raise ValueError(
            f"config file {file}: not a Python file (expected e.g. configs/distill.py)"
        )
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {file}: defines no get_config(arg)")
    return module.get_config(arg)
