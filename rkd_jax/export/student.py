"""The student to export: its checkpoint, the function the artifacts hold and its inputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rkd_jax.export.common import ExportError


def load_student(checkpoint: str | Path, allow_teacher: bool = False):
    """(model, variables, meta, config) of a run's student, float32, variables on the host.

    `checkpoint` is a run directory, its checkpoints/ directory or one checkpoints/<step>/.
    A teacher checkpoint raises ExportError unless `allow_teacher`.
    """
    from rkd_jax import checkpoint as ckpt_lib

    # The role is in the small meta item: refuse a teacher before reading its weights.
    directory, step = ckpt_lib.find_checkpoint(checkpoint)
    reader = ckpt_lib.Checkpointer(directory, read_only=True)
    try:
        saved_meta = reader.read_meta(step)
    finally:
        reader.close()
    role = saved_meta.get("role")
    where = f"{directory}/{step}"
    if role != "student" and not allow_teacher:
        raise ExportError(
            f"{where}: this checkpoint holds the {role or 'unknown-role'} model (meta role "
            f"{role!r}); export the student: pass the distillation or student run directory (not "
            "its teacher/ subdirectory), or add --allow-teacher to export it anyway"
        )
    missing = [k for k in ("model", "image_size", "max_tokens") if k not in saved_meta]
    if missing:
        raise ExportError(
            f"{where}/meta/metadata: lacks {', '.join(map(repr, missing))}; cannot rebuild the "
            "model (is this an rkd_jax checkpoint?)"
        )
    model, variables, config, meta, _, _ = ckpt_lib.load_model(where, dtype=jnp.float32)
    # Host numpy arrays: they become constants of the exported graph, on no particular device.
    variables = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), variables)
    return model, variables, meta, config


def make_serving_fn(model, variables) -> Callable:
    """(image [B,S,S,3], tokens [B,L], token_mask [B,L]) -> (prob [B,S,S], margin [B,S/4,S/4]).

    rkd_jax.evaluate's `predict`, with the variables closed over.
    """
    from rkd_jax.evaluate import predict

    def serve(image, tokens, token_mask):
        out = predict(model, variables, image, tokens, token_mask)
        return out["prob"], out["margin"]

    return serve


def input_specs(image_size: int, max_tokens: int, batch: int | None = None) -> list:
    """ShapeDtypeStructs of the three inputs; batch None = symbolic dimension 'B'."""
    if batch is None:
        (b,) = jax.export.symbolic_shape("B")
    else:
        if batch < 1:
            raise ExportError(f"--batch {batch}: expected a positive batch size (or omit it)")
        b = int(batch)
    return [
        jax.ShapeDtypeStruct((b, image_size, image_size, 3), jnp.float32),
        jax.ShapeDtypeStruct((b, max_tokens), jnp.int32),
        jax.ShapeDtypeStruct((b, max_tokens), jnp.int32),
    ]
