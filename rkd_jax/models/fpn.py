"""Feature pyramid decoder: V2..V5 -> D at stride 4, and the 2-class mask head."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_EPSILON = 1e-5


def _upsample_to(x: jax.Array, like: jax.Array) -> jax.Array:
    """Nearest upsampling of x [B, h, w, C] to like's [H, W]."""
    _, h, w, _ = like.shape
    b, hx, wx, c = x.shape
    if (hx, wx) == (h, w):
        return x
    if h % hx == 0 and w % wx == 0:
        # An integer factor is a broadcast: its gradient is a sum, where jax.image.resize's
        # gather has a scatter-add (slow on CPU). Same values as the resize below.
        fy, fx = h // hx, w // wx
        up = jnp.broadcast_to(x[:, :, None, :, None, :], (b, hx, fy, wx, fx, c))
        return up.reshape(b, h, w, c)
    return jax.image.resize(x, (b, h, w, c), "nearest")


class FPN(nn.Module):
    """Top-down FPN over [V2, V3', V4', V5'] (strides 4..32).

    Lateral 1x1 convolutions to `dim` channels, nearest upsampling and addition from the
    coarsest level down, then a 3x3 conv + BatchNorm + ReLU at stride 4 gives the decoder
    feature D [B, H/4, W/4, dim]; a 1x1 conv gives the 2-class logits [B, H/4, W/4, 2].
    """

    dim: int = 256
    dtype: jnp.dtype = jnp.float32
    # Inference-only: smooth_bn folded into the smooth conv's kernel and bias (rkd_jax.models.fold).
    fold_bn: bool = False

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array], train: bool):
        conv = partial(nn.Conv, dtype=self.dtype, param_dtype=jnp.float32)
        top = None
        for i, f in reversed(list(enumerate(feats))):
            lateral = conv(self.dim, (1, 1), name=f"lateral_{i}")(f)
            top = lateral if top is None else lateral + _upsample_to(top, lateral)
        d = conv(self.dim, (3, 3), use_bias=self.fold_bn, name="smooth")(top)
        if self.fold_bn:
            if train:
                raise ValueError(
                    "a BatchNorm-folded FPN (fold_bn=True) is inference-only: call it with "
                    "train=False"
                )
        else:
            d = nn.BatchNorm(
                use_running_average=not train,
                momentum=0.9,
                epsilon=BN_EPSILON,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name="smooth_bn",
            )(d)
        d = nn.relu(d)
        logits = conv(2, (1, 1), name="classifier")(d)
        return d, logits
