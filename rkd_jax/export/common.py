"""What the export's parts share: the error, the input and output names, optional imports."""

from __future__ import annotations

import importlib

FORMATS = ("onnx", "jax", "params")  # params: rkd_jax.export.params
INPUT_NAMES = ("image", "tokens", "token_mask")
OUTPUT_NAMES = ("prob", "margin")


class ExportError(ValueError):
    """A checkpoint or model that cannot be exported as asked, with what to do instead."""


def require(module: str):
    """Import an optional dependency of the ONNX path; ExportError naming the extra when missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(
            f"--format onnx needs {module}: pip install 'rkd_jax[export]' (jax2onnx, onnx, "
            "onnxruntime), or use --format jax"
        ) from None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), or its type."""
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
