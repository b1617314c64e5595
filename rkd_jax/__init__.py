"""rkd_jax: relational knowledge distillation for referring image segmentation in JAX/Flax."""

__version__ = "0.1.0"
