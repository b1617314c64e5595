"""ResNet-18/34/50/101 in Flax linen, torchvision layout, returning the five stage outputs.

Inputs are images in [0, 1], NHWC `[B, H, W, 3]`; the model normalises them with ImageNet's
mean/std itself so that every backbone shares one input batch. The variable tree mirrors
torchvision's module names (`conv1`, `bn1`, `layer1_0/conv1`, `layer2_0/downsample_conv`, ...)
so that `rkd_jax.convert.vision.convert_resnet` is a renaming plus transposes.

Taps (channels for width 64, basic / bottleneck):
    V1 = relu(bn1(conv1(x)))        stride 2   64 / 64
    V2 = layer1(maxpool(V1))        stride 4   64 / 256
    V3 = layer2(V2)                 stride 8   128 / 512
    V4 = layer3(V3)                 stride 16  256 / 1024
    V5 = layer4(V4)                 stride 32  512 / 2048
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from rkd_jax.models.layers import IMAGENET_MEAN, IMAGENET_STD, norm_or_folded

BN_EPSILON = 1e-5  # torchvision's BatchNorm2d

BLOCK_KINDS = ("basic", "bottleneck")
# torchvision's init: kaiming normal, fan_out, relu gain.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _expansion(block: str) -> int:
    return 4 if block == "bottleneck" else 1


class _Block(nn.Module):
    """One basic or bottleneck block; `downsample` = conv1x1(stride) + BN on the shortcut."""

    block: str
    planes: int
    stride: int
    downsample: bool
    dtype: Any = jnp.float32
    fold_bn: bool = False

    def setup(self):
        conv = functools.partial(
            nn.Conv,
            use_bias=self.fold_bn,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=_conv_init,
        )
        bn = functools.partial(
            nn.BatchNorm,
            momentum=0.9,
            epsilon=BN_EPSILON,
            dtype=self.dtype,
            param_dtype=jnp.float32,
        )
        # Folded: the BatchNorm lives in the conv's kernel and bias (rkd_jax.models.fold).
        bn = None if self.fold_bn else bn
        s, p = self.stride, ((1, 1), (1, 1))
        if self.block == "basic":
            self.conv1 = conv(self.planes, (3, 3), strides=(s, s), padding=p)
            self.bn1 = bn and bn()
            self.conv2 = conv(self.planes, (3, 3), padding=p)
            self.bn2 = bn and bn()
        else:
            # torchvision v1.5: the stride sits on the 3x3 conv, not the first 1x1.
            self.conv1 = conv(self.planes, (1, 1))
            self.bn1 = bn and bn()
            self.conv2 = conv(self.planes, (3, 3), strides=(s, s), padding=p)
            self.bn2 = bn and bn()
            self.conv3 = conv(self.planes * 4, (1, 1))
            self.bn3 = bn and bn()
        if self.downsample:
            out = self.planes * _expansion(self.block)
            self.downsample_conv = conv(out, (1, 1), strides=(s, s))
            self.downsample_bn = bn and bn()

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = functools.partial(norm_or_folded, train=train)
        y = nn.relu(norm(self.bn1, self.conv1(x)))
        y = norm(self.bn2, self.conv2(y))
        if self.block == "bottleneck":
            y = norm(self.bn3, self.conv3(nn.relu(y)))
        shortcut = x
        if self.downsample:
            shortcut = norm(self.downsample_bn, self.downsample_conv(x))
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """torchvision-layout ResNet backbone with V1..V5 taps and an optional ImageNet head.

    Attributes:
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
      block: 'basic' (ResNet-18/34) or 'bottleneck' (ResNet-50/101).
      width: stem channels; stage i has width * 2**(i-1) planes (64 = torchvision).
      num_classes: size of the fc head used by `classify`; 0 = no head (backbone only).
      dtype: compute dtype; parameters and BatchNorm statistics stay float32.
      fold_bn: inference-only variant whose convs carry a bias and no BatchNorm follows them
        (variables from `rkd_jax.models.fold.fold_batch_norm`).
    """

    stage_sizes: Sequence[int]
    block: str
    width: int = 64
    num_classes: int = 0
    dtype: Any = jnp.float32
    fold_bn: bool = False

    def setup(self):
        if self.block not in BLOCK_KINDS:
            raise ValueError(f"ResNet block '{self.block}' unknown; expected one of {BLOCK_KINDS}")
        if len(self.stage_sizes) != 4 or min(self.stage_sizes) < 1:
            raise ValueError(
                f"ResNet stage_sizes {tuple(self.stage_sizes)}: expected 4 positive block counts"
            )
        self.conv1 = nn.Conv(
            self.width,
            (7, 7),
            strides=(2, 2),
            padding=((3, 3), (3, 3)),
            use_bias=self.fold_bn,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=_conv_init,
        )
        self.bn1 = (
            None
            if self.fold_bn
            else nn.BatchNorm(
                momentum=0.9, epsilon=BN_EPSILON, dtype=self.dtype, param_dtype=jnp.float32
            )
        )
        expansion = _expansion(self.block)
        in_ch = self.width
        layers = []
        for i, n in enumerate(self.stage_sizes):
            planes = self.width * 2**i
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                s = stride if j == 0 else 1
                ds = j == 0 and (s != 1 or in_ch != planes * expansion)
                blocks.append(
                    _Block(
                        self.block,
                        planes,
                        s,
                        ds,
                        dtype=self.dtype,
                        fold_bn=self.fold_bn,
                        name=f"layer{i + 1}_{j}",
                    )
                )
                in_ch = planes * expansion
            layers.append(blocks)
        self.layers = layers
        if self.num_classes:
            self.fc = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32)

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Channels of V1..V5."""
        e = _expansion(self.block)
        w = self.width
        return (w, w * e, 2 * w * e, 4 * w * e, 8 * w * e)

    def stage(self, i: int, x: jax.Array, train: bool) -> jax.Array:
        """Run stage `i` (1..5): images `[B, H, W, 3]` in [0, 1] -> V1; V_{i-1} -> V_i."""
        if i == 1:
            mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
            std = jnp.asarray(IMAGENET_STD, jnp.float32)
            x = ((x.astype(jnp.float32) - mean) / std).astype(self.dtype)
            return nn.relu(norm_or_folded(self.bn1, self.conv1(x), train))
        if not 2 <= i <= 5:
            raise ValueError(f"ResNet stage {i}: expected 1..5")
        if i == 2:
            # torch's MaxPool2d(3, 2, padding=1) pads with -inf, as reduce_window's max does.
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for blk in self.layers[i - 2]:
            x = blk(x, train)
        return x

    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        """Images `[B, H, W, 3]` in [0, 1] -> [V1..V5], V_i `[B, H/2**i, W/2**i, C_i]`."""
        feats = []
        for i in range(1, 6):
            x = self.stage(i, x, train)
            feats.append(x)
        return feats

    def classify(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Images `[B, H, W, 3]` in [0, 1] -> logits `[B, num_classes]` (global pool + fc)."""
        return self.head(self(x, train)[-1], train)

    def head(self, v5: jax.Array, train: bool = False) -> jax.Array:
        """V5 `[B, h, w, C5]` -> logits `[B, num_classes]` (global average pool + fc).

        `train` is unused (no dropout), kept for the same signature as EfficientNet.head.
        """
        del train
        if not self.num_classes:
            raise ValueError("ResNet.classify/head need num_classes > 0")
        return self.fc(jnp.mean(v5, axis=(1, 2)))


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block="basic")
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="basic")
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck")
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block="bottleneck")

RESNET_ARCHS = {
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
    "resnet101": ((3, 4, 23, 3), "bottleneck"),
}
