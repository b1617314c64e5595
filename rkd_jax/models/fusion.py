"""The paper's vision-language cross-modal attention (Eq. 1-5) with residual fusion."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

ATTENTION_NORMS = ("softmax", "none")


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


class VLFusion(nn.Module):
    """V' = V + Linear(A . T_V) with A = norm(V_Q T_K^T): Eq. (1)-(5) and the residual.

    Returns (V' [B, H, W, C], A [B, HW, L]); A is the matrix L_VL distils.
    """

    dim: int = 256
    attention_norm: str = "softmax"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, v: jax.Array, t: jax.Array, token_mask: jax.Array):
        b, h, w, c = v.shape
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        v_query = dense(self.dim, "query")(v.reshape(b, h * w, c))
        t_key = dense(self.dim, "key")(t)
        t_value = dense(self.dim, "value")(t)
        attn = vl_attention(v_query, t_key, token_mask, self.attention_norm)
        out = jnp.einsum("bnl,blc->bnc", attn.astype(self.dtype), t_value.astype(self.dtype))
        fused = v + dense(c, "out")(out).reshape(b, h, w, c).astype(v.dtype)
        return fused, attn
