"""Reading PyTorch-world weight files into plain numpy dicts, and the conversion error."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np


class ConversionError(ValueError):
    """A weight file does not fit the model: names the file, the key and what was expected."""


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a state dict from .safetensors, .pth/.pt/.bin (torch, weights_only) or .npz.

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
        try:
            import torch
        except ImportError as e:
            raise ConversionError(
                f"{path}: reading a PyTorch file needs torch (pip install torch==2.13.0 for "
                "the CPU wheel), or convert it to .safetensors first"
            ) from e
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConversionError(f"{path}: not a readable PyTorch weights file ({e})") from e
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
        if not isinstance(obj, Mapping):
            raise ConversionError(
                f"{path}: expected a state dict (name -> tensor), got {type(obj)}"
            )
        out = {}
        for k, v in obj.items():
            if hasattr(v, "detach"):
                v = v.detach().cpu()
                if v.dtype == torch.bfloat16:
                    v = v.float()
                out[k] = v.numpy()
        return out
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
