"""Layers and constants the backbones share: depthwise convolution and BatchNorm that are fast
on XLA's CPU backend, the BatchNorm that folding removes, the input normalisation constants.

XLA:CPU runs a grouped convolution with one channel per group (`feature_group_count` = channels)
through a generic loop: on this project's 2-core machine a 3x3 depthwise conv on a
[16, 48, 48, 96] batch takes ~130-190 ms forward and ~300-500 ms for its gradient, about 0.5
GFLOP/s, which made an EfficientNet-Lite0 student train at 8 images/s at 96x96 (the ResNet-18
student: ~150). The same convolution written as k*k shifted multiply-adds is one elementwise
fusion (~2-7 ms forward). Its gradient is written out by hand (`jax.custom_vjp`):

- d/dx: the same tap sum over the output gradient dilated by the stride (lax.pad interior
  padding) with the kernel flipped, cropped to the input: a transposed convolution as taps.
- d/dw: for each tap, sum over batch and space of (shifted input * output gradient). XLA:CPU's
  reductions over the leading axes of a [M, C] array run at well under 1 G elements/s here, so
  the sum is a tree of halving adds (elementwise fusions) down to 64 rows, then a small
  reduction: ~5x faster than jnp.sum here (17 vs 84 ms for the 9 taps of the example above).

Numerics: the same products and sums in another order (float32 max abs difference ~1e-5 on
unit-normal data). Padding is TF 'SAME' (the extra pixel bottom/right), what flax's
padding="SAME" does. On GPU/TPU, and while exporting (`native_depthwise()`), the plain
`lax.conv_general_dilated` is used: cuDNN and ONNX runtimes have real depthwise kernels.

`BatchNorm` is flax's nn.BatchNorm (same variables, momentum, epsilon, biased batch variance
E[x^2] - E[x]^2) whose training-mode statistics and backward pass sum over batch and space with
the same halving adds: XLA:CPU's reductions made the 49 training-mode BatchNorms of Lite0 cost
~245 of a ~295 ms forward (batch 16, 96x96). Its gradient is the textbook one, written out.

Every backbone takes images in [0, 1] and normalises them itself (`input_normalisation`):
ImageNet's mean/std, or 0.5/0.5 for EfficientNet-Lite0, the constants its checkpoint was
trained with.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)

_state = threading.local()


def input_normalisation(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel that a backbone applies inside the model to [0, 1] pixels."""
    if backbone == "efficientnet_lite0":
        return LITE0_MEAN, LITE0_STD
    return IMAGENET_MEAN, IMAGENET_STD


def norm_or_folded(bn: nn.Module | None, x: jax.Array, train: bool) -> jax.Array:
    """BatchNorm, or nothing where it was folded into the preceding conv (`bn` is None)."""
    if bn is None:
        if train:
            raise ValueError(
                "a BatchNorm-folded model (fold_bn=True) is inference-only: call it with "
                "train=False, or train the unfolded model"
            )
        return x
    return bn(x, use_running_average=not train)


@contextlib.contextmanager
def native_depthwise():
    """Within this block (tracing), depthwise convs lower to lax.conv_general_dilated."""
    old = getattr(_state, "native", False)
    _state.native = True
    try:
        yield
    finally:
        _state.native = old


def use_taps() -> bool:
    """Whether depthwise convs traced now use the tap form (CPU backend, not exporting)."""
    return not getattr(_state, "native", False) and jax.default_backend() == "cpu"


def _same(size: int, k: int, s: int) -> tuple[int, int, int]:
    """Output size and (low, high) padding of TF 'SAME'."""
    out = -(-size // s)
    pad = max((out - 1) * s + k - size, 0)
    return out, pad // 2, pad - pad // 2


def _taps(xp: jax.Array, w: jax.Array, s: int, ho: int, wo: int) -> jax.Array:
    """sum_ij xp[:, i::s, j::s, :][:ho, :wo] * w[i, j] over the k*k taps of w [k, k, C]."""
    n, _, _, c = xp.shape
    out = None
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            sl = lax.slice(
                xp, (0, i, j, 0), (n, i + (ho - 1) * s + 1, j + (wo - 1) * s + 1, c), (1, s, s, 1)
            )
            out = sl * w[i, j] if out is None else out + sl * w[i, j]
    return out


def _sum_rows(y: jax.Array) -> jax.Array:
    """Sum of [M, C] over M as halving adds (fast elementwise fusions on XLA:CPU)."""
    while y.shape[0] > 64:
        h = y.shape[0] // 2
        head = y[:h] + y[h : 2 * h]
        y = head if y.shape[0] % 2 == 0 else jnp.concatenate([head, y[2 * h :]])
    return jnp.sum(y, axis=0)


def _pad_same(x: jax.Array, k: int, s: int) -> tuple[jax.Array, int, int]:
    ho, top, bottom = _same(x.shape[1], k, s)
    wo, left, right = _same(x.shape[2], k, s)
    return jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0))), ho, wo


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_taps(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """Depthwise conv, NHWC input x [N, H, W, C], kernel w [k, k, C], TF 'SAME' padding."""
    xp, ho, wo = _pad_same(x, w.shape[0], stride)
    return _taps(xp, w.astype(x.dtype), stride, ho, wo)


def _fwd(x, w, stride):
    return depthwise_taps(x, w, stride), (x, w)


def _bwd(stride, res, g):
    x, w = res
    k, s = w.shape[0], stride
    n, h, wd, c = x.shape
    ho, top, bottom = _same(h, k, s)
    wo, left, right = _same(wd, k, s)
    hp, wp = h + top + bottom, wd + left + right
    extra_h, extra_w = hp - ((ho - 1) * s + k), wp - ((wo - 1) * s + k)
    # d/dx: taps of the stride-dilated, (k-1)-padded gradient with the flipped kernel.
    gp = lax.pad(
        g,
        jnp.zeros((), g.dtype),
        ((0, 0, 0), (k - 1, k - 1 + extra_h, s - 1), (k - 1, k - 1 + extra_w, s - 1), (0, 0, 0)),
    )
    dxp = _taps(gp, w[::-1, ::-1].astype(g.dtype), 1, hp, wp)
    dx = dxp[:, top : top + h, left : left + wd, :]
    # d/dw: per tap, the shifted input times the gradient, summed over batch and space.
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    rows = []
    for i in range(k):
        for j in range(k):
            sl = lax.slice(
                xp, (0, i, j, 0), (n, i + (ho - 1) * s + 1, j + (wo - 1) * s + 1, c), (1, s, s, 1)
            )
            rows.append(_sum_rows((sl * g).reshape(-1, c).astype(jnp.float32)))
    dw = jnp.stack(rows).reshape(k, k, c).astype(w.dtype)
    return dx, dw


depthwise_taps.defvjp(_fwd, _bwd)


def depthwise_native(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """The same convolution as one grouped lax.conv_general_dilated."""
    k = w.shape[0]
    _, top, bottom = _same(x.shape[1], k, stride)
    _, left, right = _same(x.shape[2], k, stride)
    return lax.conv_general_dilated(
        x,
        w[:, :, None, :].astype(x.dtype),
        (stride, stride),
        ((top, bottom), (left, right)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


class DepthwiseConv(nn.Module):
    """Depthwise k x k conv with nn.Conv's parameters: 'kernel' [k, k, 1, C] (+ 'bias' [C]),
    TF 'SAME' padding, so checkpoints, weight import and BatchNorm folding are unchanged."""

    features: int
    kernel: int
    stride: int = 1
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.features:
            raise ValueError(
                f"DepthwiseConv: input has {x.shape[-1]} channels, expected {self.features}"
            )
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (self.kernel, self.kernel, 1, self.features),
            self.param_dtype,
        )
        x = x.astype(self.dtype)
        w = kernel[:, :, 0, :].astype(self.dtype)
        y = depthwise_taps(x, w, self.stride) if use_taps() else depthwise_native(x, w, self.stride)
        if self.use_bias:
            y = y + self.param(
                "bias", nn.initializers.zeros, (self.features,), self.param_dtype
            ).astype(self.dtype)
        return y


def _sum_leading(x: jax.Array) -> jax.Array:
    """Sum over every axis but the last, float32 (halving adds on CPU, jnp.sum elsewhere)."""
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return _sum_rows(x) if jax.default_backend() == "cpu" else jnp.sum(x, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float):
    """Training-mode BatchNorm over all axes but the last: (y, batch mean, biased batch var)."""
    return _bn_train_fwd(x, scale, bias, eps)[0]


def _bn_train_fwd(x, scale, bias, eps):
    c = x.shape[-1]
    m = x.size // c
    xf = x.astype(jnp.float32)
    sums = _sum_leading(jnp.concatenate([xf, jnp.square(xf)], axis=-1))  # one pass for both
    mean = sums[:c] / m
    var = jnp.maximum(sums[c:] / m - jnp.square(mean), 0.0)
    inv = lax.rsqrt(var + eps)
    xhat = (xf - mean) * inv
    y = (xhat * scale + bias).astype(x.dtype)
    return (y, mean, var), (x, scale, mean, inv)


def _bn_train_bwd(eps, res, cts):
    x, scale, mean, inv = res
    gy, gmean, gvar = cts
    c = x.shape[-1]
    m = x.size // c
    xc = x.astype(jnp.float32) - mean
    xhat = xc * inv
    gy = gy.astype(jnp.float32)
    sums = _sum_leading(jnp.concatenate([gy, gy * xhat], axis=-1))
    dbias, dscale = sums[:c], sums[c:]
    # d/dx of y through xhat, mean and var (the textbook BatchNorm backward) ...
    dx = (scale * inv) * (gy - dbias / m - xhat * (dscale / m))
    # ... plus the cotangents of the returned statistics (zero when only running averages use them).
    dx = dx + gmean / m + gvar * 2.0 * xc / m
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


batch_norm_train.defvjp(_bn_train_fwd, _bn_train_bwd)


class BatchNorm(nn.Module):
    """nn.BatchNorm over the last axis (its variables, update rule and defaults), with the
    training-mode statistics and gradient of `batch_norm_train`."""

    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_ra = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        dtype = self.dtype or x.dtype
        if use_ra:
            inv = lax.rsqrt(ra_var.value + self.epsilon) * scale
            return ((x.astype(jnp.float32) - ra_mean.value) * inv + bias).astype(dtype)
        y, mean, var = batch_norm_train(
            x, scale.astype(jnp.float32), bias.astype(jnp.float32), float(self.epsilon)
        )
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y.astype(dtype)
