"""Reading PyTorch-world weight files into plain numpy dicts, and the conversion error."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np


class ConversionError(ValueError):
    """A weight file does not fit the model: names the file, the key and what was expected."""


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a state dict from .safetensors, .pth/.pt/.bin (torch.save files, read without
    torch: `torch_file`) or .npz.

    Returns float32/int numpy arrays keyed by the file's own names. A .pth file that holds a
    training checkpoint (`{"state_dict": ...}` or `{"model": ...}`) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such weights file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as e:  # safetensors raises its own error types
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
    if suffix == ".npz":
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    if suffix in (".pth", ".pt", ".bin", ".ckpt"):
        from rkd_jax.convert import torch_file  # torch.save files, read without torch

        try:
            obj = torch_file.load(path)
        except torch_file.TorchFileError as e:
            raise ConversionError(str(e)) from None
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
        if not isinstance(obj, Mapping):
            raise ConversionError(
                f"{path}: expected a state dict (name -> tensor), got {type(obj)}"
            )
        return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    raise ConversionError(
        f"{path}: unknown weights format '{suffix}'; expected .safetensors, .pth, .pt, .bin or .npz"
    )


def take(
    state: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...], source: str
) -> np.ndarray:
    """Fetch `key` from a state dict, checking its shape; errors name the key and the shape."""
    if key not in state:
        raise ConversionError(f"{source}: missing key '{key}' (expected shape {tuple(shape)})")
    value = np.asarray(state[key])
    if tuple(value.shape) != tuple(shape):
        raise ConversionError(
            f"{source}: key '{key}' has shape {tuple(value.shape)}, expected {tuple(shape)}"
        )
    return value
