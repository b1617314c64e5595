"""rkd_jax: relational knowledge distillation for referring image segmentation in JAX/Flax."""

__version__ = "0.1.0"


def load(path, **kwargs):
    """A checkpoint (run directory, checkpoints/ or checkpoints/<step>) as a
    `rkd_jax.inference.predictor.Predictor`; imports JAX only when called."""
    from rkd_jax.inference.predictor import load as _load

    return _load(path, **kwargs)
