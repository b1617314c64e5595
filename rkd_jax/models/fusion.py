"""The paper's vision-language cross-modal attention (Eq. 1-5) with residual fusion."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

ATTENTION_NORMS = ("softmax", "none")
FUSION_MODES = ("add", "multiply")


def vl_attention(
    v_query: jax.Array, t_key: jax.Array, token_mask: jax.Array, norm: str = "softmax"
) -> jax.Array:
    """Vision-language correlation A (Eq. 4) with padded words given zero weight.

    Args:
      v_query: [B, HW, C'] projected visual queries.
      t_key: [B, L, C'] projected text keys.
      token_mask: [B, L], 1 for real tokens, 0 for padding.
      norm: "softmax" (default: softmax over words of the 1/sqrt(C')-scaled scores, padded
        words masked) or "none" (literal Eq. 4 with the 1/sqrt(C') scale, padded words zeroed).

    Returns:
      A: [B, HW, L] in float32.
    """
    if norm not in ATTENTION_NORMS:
        raise ValueError(f"attention_norm={norm!r}; expected one of {ATTENTION_NORMS}")
    scores = jnp.einsum(
        "bnc,blc->bnl", v_query.astype(jnp.float32), t_key.astype(jnp.float32)
    ) / math.sqrt(v_query.shape[-1])
    real = (token_mask > 0)[:, None, :]
    if norm == "softmax":
        scores = jnp.where(real, scores, jnp.finfo(jnp.float32).min)
        return jnp.where(real, jax.nn.softmax(scores, axis=-1), 0.0)
    return jnp.where(real, scores, 0.0)


def spatial_coordinates(h: int, w: int) -> jax.Array:
    """The 8-D spatial feature of Hu et al. (2016) per cell of an h x w grid: [h*w, 8].

    Per cell: x_min, y_min, x_max, y_max, x_centre, y_centre of the cell in [-1, 1], then
    1/w and 1/h. Row-major over (y, x), as `v.reshape(b, h * w, c)` orders the pixels.
    """
    ys, xs = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
    xs, ys = xs.reshape(-1).astype(jnp.float32), ys.reshape(-1).astype(jnp.float32)
    x0, x1 = xs / w * 2 - 1, (xs + 1) / w * 2 - 1
    y0, y1 = ys / h * 2 - 1, (ys + 1) / h * 2 - 1
    ones = jnp.ones_like(xs)
    return jnp.stack([x0, y0, x1, y1, (x0 + x1) / 2, (y0 + y1) / 2, ones / w, ones / h], -1)


class VLFusion(nn.Module):
    """V' = V + Linear(A . T_V) with A = norm(V_Q T_K^T): Eq. (1)-(5) and the residual.

    With `coord_map` (beyond the paper) the 8-D spatial coordinates of each pixel
    (`spatial_coordinates`) are concatenated to V where it enters the query and the output
    projection, so a pixel's attention over words can depend on where the pixel is ("left",
    "top"): without them only the convolutions' zero padding tells a pixel its position.

    Returns (V' [B, H, W, C], A [B, HW, L]); A is the matrix L_VL distils.
    """

    dim: int = 256
    attention_norm: str = "softmax"
    dtype: jnp.dtype = jnp.float32
    coord_map: bool = False
    # "add": V' = V + Linear(O), the paper. "multiply" (beyond the paper): V' = V * (1 +
    # Linear(O)), so the expression can scale each visual channel per pixel (select), not only
    # shift it; identical to "add" in what A is and how it is computed.
    mode: str = "add"

    @nn.compact
    def __call__(self, v: jax.Array, t: jax.Array, token_mask: jax.Array):
        b, h, w, c = v.shape
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        pixels = v.reshape(b, h * w, c)
        coords = None
        if self.coord_map:
            coords = jnp.broadcast_to(spatial_coordinates(h, w).astype(v.dtype), (b, h * w, 8))
            pixels = jnp.concatenate([pixels, coords], axis=-1)
        v_query = dense(self.dim, "query")(pixels)
        t_key = dense(self.dim, "key")(t)
        t_value = dense(self.dim, "value")(t)
        attn = vl_attention(v_query, t_key, token_mask, self.attention_norm)
        out = jnp.einsum("bnl,blc->bnc", attn.astype(self.dtype), t_value.astype(self.dtype))
        if coords is not None:
            out = jnp.concatenate([out, coords.astype(out.dtype)], axis=-1)
        delta = dense(c, "out")(out).reshape(b, h, w, c).astype(v.dtype)
        if self.mode == "multiply":
            return v * (1 + delta), attn
        if self.mode != "add":
            raise ValueError(f"fusion mode={self.mode!r}; expected one of {FUSION_MODES}")
        return v + delta, attn
