"""The jax.export artifact: serialized StableHLO with the variables as constants."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax

from rkd_jax.export.common import ExportError, first_line
from rkd_jax.models.layers import native_depthwise

# One artifact for CPU and NVIDIA GPU hosts: both lowerings share the constants (same file size).
DEFAULT_PLATFORMS = ("cpu", "cuda")


def export_jax(fn: Callable, specs: list, platforms: tuple[str, ...] = DEFAULT_PLATFORMS) -> bytes:
    """Serialized jax.export artifact of `fn` (StableHLO with the variables as constants)."""
    try:
        with native_depthwise():  # a portable program: no CPU-specific depthwise taps
            exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*specs)
    except Exception as e:  # lowering errors come as several unrelated types
        raise ExportError(
            f"jax.export failed for platforms {','.join(platforms)} ({type(e).__name__}: "
            f"{first_line(e)}); try --platforms cpu or a fixed --batch"
        ) from e
    return bytes(exported.serialize())


def load_jax(path: str | Path) -> Callable:
    """The deserialized artifact's `call`: (image, tokens, token_mask) -> (prob, margin).

    Plain JAX needs only this: `jax.export.deserialize(bytearray(open(p, 'rb').read())).call`.
    """
    return jax.export.deserialize(bytearray(Path(path).read_bytes())).call
