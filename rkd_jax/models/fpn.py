"""Feature pyramid decoder: V2..V5 -> D at stride 4, and the 2-class mask head."""

from __future__ import annotations

from functools import partial
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _upsample_to(x: jax.Array, like: jax.Array) -> jax.Array:
    b, h, w, _ = like.shape
    if x.shape[1:3] == (h, w):
        return x
    return jax.image.resize(x, (x.shape[0], h, w, x.shape[-1]), "nearest")


class FPN(nn.Module):
    """Top-down FPN over [V2, V3', V4', V5'] (strides 4..32).

    Lateral 1x1 convolutions to `dim` channels, nearest upsampling and addition from the
    coarsest level down, then a 3x3 conv + BatchNorm + ReLU at stride 4 gives the decoder
    feature D [B, H/4, W/4, dim]; a 1x1 conv gives the 2-class logits [B, H/4, W/4, 2].
    """

    dim: int = 256
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array], train: bool):
        conv = partial(nn.Conv, dtype=self.dtype, param_dtype=jnp.float32)
        top = None
        for i, f in reversed(list(enumerate(feats))):
            lateral = conv(self.dim, (1, 1), name=f"lateral_{i}")(f)
            top = lateral if top is None else lateral + _upsample_to(top, lateral)
        d = conv(self.dim, (3, 3), use_bias=False, name="smooth")(top)
        d = nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
            param_dtype=jnp.float32, name="smooth_bn",
        )(d)
        d = nn.relu(d)
        logits = conv(2, (1, 1), name="classifier")(d)
        return d, logits
