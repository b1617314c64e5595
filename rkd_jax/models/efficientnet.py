"""EfficientNet-B0 and EfficientNet-Lite0 in Flax linen, returning five stage outputs.

The architecture follows the lukemelas EfficientNet-PyTorch port of the TF reference, whose
layout the offline Lite0 checkpoint (and users' B0 .pth files) use: TF 'SAME' padding (for a
stride-2 conv on an even input the extra pixel goes bottom/right, computed from the input size),
BatchNorm eps 1e-3 and TF momentum 0.99, bias-free convs except squeeze-excitation. B0 has SiLU
and squeeze-excitation (reduce to a quarter of the block's input channels); Lite0 has ReLU6, no
squeeze-excitation, and its stem (32) and head (1280) channels and first/last stage depths are
never scaled.

Inputs are images in [0, 1], NHWC `[B, H, W, 3]`, normalised inside: ImageNet mean/std for B0,
mean 0.5 / std 0.5 for Lite0 (the constants its checkpoint was trained with).

Taps (timm `features_only` convention; channels at width 1.0):
    V1 = stem + stage 1 (MBConv1, k3)        stride 2   16
    V2 = stage 2 (MBConv6, k3, x2)           stride 4   24
    V3 = stage 3 (MBConv6, k5, x2)           stride 8   40
    V4 = stages 4-5 (k3 x3, k5 x3)           stride 16  112
    V5 = stages 6-7 (k5 x4, k3 x1)           stride 32  320
The 1x1 head conv to 1280 channels is not part of V5: it only exists when `num_classes > 0` and
is used by `classify`, so a segmenter's backbone carries no classifier weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from rkd_jax.models.layers import BatchNorm, DepthwiseConv, input_normalisation, norm_or_folded

BN_EPSILON = 1e-3  # the TF reference's BatchNorm

VARIANTS = ("b0", "lite0")

# (repeats, kernel, stride, expand ratio, in channels, out channels) of the seven MBConv stages.
_BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# Which of the seven MBConv stages end at each tap V1..V5.
_TAP_STAGES = ((0,), (1,), (2,), (3, 4), (5, 6))
_STEM, _HEAD = 32, 1280


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One MBConv block: `se` = squeeze-excitation channels (0 = none)."""

    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int
    se: int


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The block list of a variant; `taps[i]` = indices of the blocks that form stage i+1."""

    stem: int
    head: int
    blocks: tuple[BlockSpec, ...]
    taps: tuple[tuple[int, ...], ...]


def _round_filters(ch: int, width_mult: float, divisor: int = 8) -> int:
    # The TF reference's rounding: nearest multiple of 8, never more than 10% below.
    if width_mult == 1.0:
        return ch
    scaled = ch * width_mult
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def architecture(variant: str, width_mult: float = 1.0, depth_mult: float = 1.0) -> Architecture:
    """The blocks of EfficientNet `variant` ('b0' | 'lite0') scaled by width/depth multipliers."""
    if variant not in VARIANTS:
        raise ValueError(f"EfficientNet variant '{variant}' unknown; expected one of {VARIANTS}")
    lite = variant == "lite0"
    stem = _STEM if lite else _round_filters(_STEM, width_mult)
    head = _HEAD if lite else _round_filters(_HEAD, width_mult)
    blocks: list[BlockSpec] = []
    stage_blocks: list[list[int]] = []
    for s, (reps, k, stride, e, cin, cout) in enumerate(_BASE_STAGES):
        cin = stem if s == 0 else _round_filters(cin, width_mult)
        cout = _round_filters(cout, width_mult)
        if not (lite and s in (0, len(_BASE_STAGES) - 1)):
            reps = math.ceil(depth_mult * reps)
        idx = []
        for r in range(reps):
            b_in = cin if r == 0 else cout
            se = 0 if lite else max(1, int(b_in * 0.25))
            idx.append(len(blocks))
            blocks.append(BlockSpec(k, stride if r == 0 else 1, e, b_in, cout, se))
        stage_blocks.append(idx)
    taps = tuple(tuple(i for s in group for i in stage_blocks[s]) for group in _TAP_STAGES)
    return Architecture(stem, head, tuple(blocks), taps)


def _relu6(x):
    return jnp.minimum(jnp.maximum(x, 0), 6)


def _bn_factory(fold_bn: bool, dtype: Any):
    """BatchNorm constructor, or one that gives None where the norm is folded into the conv."""
    if fold_bn:
        return lambda: None
    return functools.partial(
        BatchNorm, momentum=0.99, epsilon=BN_EPSILON, dtype=dtype, param_dtype=jnp.float32
    )


class _MBConv(nn.Module):
    """Inverted residual: expand 1x1 -> depthwise kxk -> (SE) -> project 1x1 (+ skip)."""

    spec: BlockSpec
    act: Any
    drop_path: float = 0.0
    dtype: Any = jnp.float32
    fold_bn: bool = False

    def setup(self):
        sp = self.spec
        conv = functools.partial(
            nn.Conv,
            use_bias=self.fold_bn,
            padding="SAME",
            dtype=self.dtype,
            param_dtype=jnp.float32,
        )
        bn = _bn_factory(self.fold_bn, self.dtype)
        mid = sp.in_ch * sp.expand
        if sp.expand != 1:
            self.expand_conv = conv(mid, (1, 1))
            self.bn0 = bn()
        self.depthwise_conv = DepthwiseConv(
            mid, sp.kernel, sp.stride, use_bias=self.fold_bn, dtype=self.dtype
        )
        self.bn1 = bn()
        if sp.se:
            se_conv = functools.partial(
                nn.Conv, kernel_size=(1, 1), dtype=self.dtype, param_dtype=jnp.float32
            )
            self.se_reduce = se_conv(sp.se)
            self.se_expand = se_conv(mid)
        self.project_conv = conv(sp.out_ch, (1, 1))
        self.bn2 = bn()

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        sp = self.spec
        y = x
        if sp.expand != 1:
            y = self.act(norm_or_folded(self.bn0, self.expand_conv(y), train))
        y = self.act(norm_or_folded(self.bn1, self.depthwise_conv(y), train))
        if sp.se:
            s = jnp.mean(y, axis=(1, 2), keepdims=True)
            s = self.se_expand(self.act(self.se_reduce(s)))
            y = y * nn.sigmoid(s)
        y = norm_or_folded(self.bn2, self.project_conv(y), train)
        if sp.stride == 1 and sp.in_ch == sp.out_ch:
            if train and self.drop_path > 0:
                keep = 1.0 - self.drop_path
                mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (y.shape[0], 1, 1, 1))
                y = jnp.where(mask, y / keep, 0).astype(y.dtype)
            y = y + x
        return y


class EfficientNet(nn.Module):
    """EfficientNet backbone ('b0' | 'lite0') with V1..V5 taps and an optional ImageNet head.

    Attributes:
      variant: 'b0' (SiLU, squeeze-excitation) or 'lite0' (ReLU6, no SE, fixed stem/head).
      width_mult, depth_mult: channel and depth multipliers (1.0 = the published model).
      num_classes: fc size for `classify` (adds conv_head/bn1/fc); 0 = backbone only.
      drop_path_rate: stochastic depth of the last block, scaled linearly over blocks as in
        the reference; when > 0, training needs a 'dropout' rng.
      dtype: compute dtype; parameters and BatchNorm statistics stay float32.
      fold_bn: inference-only variant whose convs carry a bias and no BatchNorm follows them
        (variables from `rkd_jax.models.fold.fold_batch_norm`).
    """

    variant: str
    width_mult: float = 1.0
    depth_mult: float = 1.0
    num_classes: int = 0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    fold_bn: bool = False

    def setup(self):
        arch = architecture(self.variant, self.width_mult, self.depth_mult)
        self.arch = arch
        self.act = _relu6 if self.variant == "lite0" else nn.silu
        conv = functools.partial(
            nn.Conv,
            use_bias=self.fold_bn,
            padding="SAME",
            dtype=self.dtype,
            param_dtype=jnp.float32,
        )
        bn = _bn_factory(self.fold_bn, self.dtype)
        self.conv_stem = conv(arch.stem, (3, 3), strides=(2, 2))
        self.bn0 = bn()
        n = len(arch.blocks)
        self.blocks = [
            _MBConv(
                spec,
                self.act,
                drop_path=self.drop_path_rate * i / n,
                dtype=self.dtype,
                fold_bn=self.fold_bn,
                name=f"blocks_{i}",
            )
            for i, spec in enumerate(arch.blocks)
        ]
        if self.num_classes:
            self.conv_head = conv(arch.head, (1, 1))
            self.bn1 = bn()
            self.fc = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32)

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Channels of V1..V5."""
        arch = architecture(self.variant, self.width_mult, self.depth_mult)
        return tuple(arch.blocks[t[-1]].out_ch for t in arch.taps)

    def stage(self, i: int, x: jax.Array, train: bool) -> jax.Array:
        """Run stage `i` (1..5): images `[B, H, W, 3]` in [0, 1] -> V1; V_{i-1} -> V_i."""
        if not 1 <= i <= 5:
            raise ValueError(f"EfficientNet stage {i}: expected 1..5")
        if i == 1:
            mean, std = input_normalisation(f"efficientnet_{self.variant}")
            mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
            x = ((x.astype(jnp.float32) - mean) / std).astype(self.dtype)
            x = self.act(norm_or_folded(self.bn0, self.conv_stem(x), train))
        for b in self.arch.taps[i - 1]:
            x = self.blocks[b](x, train)
        return x

    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        """Images `[B, H, W, 3]` in [0, 1] -> [V1..V5], V_i `[B, ~H/2**i, ~W/2**i, C_i]`.

        With TF 'SAME' padding each stride-2 step gives ceil(H / 2).
        """
        feats = []
        for i in range(1, 6):
            x = self.stage(i, x, train)
            feats.append(x)
        return feats

    def classify(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Images `[B, H, W, 3]` in [0, 1] -> logits `[B, num_classes]` (head conv, pool, fc)."""
        return self.head(self(x, train)[-1], train)

    def head(self, v5: jax.Array, train: bool = False) -> jax.Array:
        """V5 `[B, h, w, C5]` -> logits `[B, num_classes]`: conv 1x1 + BN + act, pool, fc."""
        if not self.num_classes:
            raise ValueError("EfficientNet.classify/head need num_classes > 0")
        h = self.act(norm_or_folded(self.bn1, self.conv_head(v5), train))
        return self.fc(jnp.mean(h, axis=(1, 2)))


EfficientNetB0 = functools.partial(EfficientNet, variant="b0")
EfficientNetLite0 = functools.partial(EfficientNet, variant="lite0")
