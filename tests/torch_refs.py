"""Plain-torch reference networks for parity tests (torchvision cannot be imported here).

`TorchResNet` uses torchvision's module names (conv1, bn1, layer1.0.conv1, downsample.0/1, fc)
and `TorchEfficientNet` the lukemelas EfficientNet-PyTorch names (_conv_stem, _blocks.N._bn1,
_fc, ...), so their `state_dict()`s have the real key layouts. Both are written from the
papers' descriptions, independently of rkd_jax's code.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = x if self.downsample is None else self.downsample(x)
        return F.relu(y + s)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        s = x if self.downsample is None else self.downsample(x)
        return F.relu(y + s)


class TorchResNet(nn.Module):
    """torchvision-named ResNet; `taps(x)` returns V1..V5 for an already normalised NCHW x."""

    def __init__(self, stage_sizes, block="basic", width=64, num_classes=1000):
        super().__init__()
        blk = BasicBlock if block == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for i, n in enumerate(stage_sizes):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                s = stride if j == 0 else 1
                ds = None
                if j == 0 and (s != 1 or cin != planes * blk.expansion):
                    ds = nn.Sequential(
                        nn.Conv2d(cin, planes * blk.expansion, 1, s, bias=False),
                        nn.BatchNorm2d(planes * blk.expansion),
                    )
                blocks.append(blk(cin, planes, s, ds))
                cin = planes * blk.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, num_classes)

    def taps(self, x):
        v1 = F.relu(self.bn1(self.conv1(x)))
        v2 = self.layer1(self.maxpool(v1))
        v3 = self.layer2(v2)
        v4 = self.layer3(v3)
        v5 = self.layer4(v4)
        return [v1, v2, v3, v4, v5]

    def forward(self, x):
        return self.fc(self.taps(x)[-1].mean(dim=(2, 3)))


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding computed from the input size (extra pixel last)."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, 1, self.groups)


# (repeats, kernel, stride, expand, in, out) of EfficientNet-B0's seven stages (Tan & Le 2019).
B0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]


class MBConvBlock(nn.Module):
    def __init__(self, k, stride, expand, cin, cout, se, act):
        super().__init__()
        mid = cin * expand
        self.expand, self.stride, self.skip, self.act = (
            expand,
            stride,
            stride == 1 and cin == cout,
            act,
        )
        bn = {"eps": 1e-3, "momentum": 0.01}
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **bn)
        self._depthwise_conv = SameConv2d(mid, mid, k, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **bn)
        self.se = se
        if se:
            squeezed = max(1, int(cin * 0.25))
            self._se_reduce = nn.Conv2d(mid, squeezed, 1)
            self._se_expand = nn.Conv2d(squeezed, mid, 1)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **bn)

    def forward(self, x):
        y = x
        if self.expand != 1:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        if self.se:
            s = self._se_expand(self.act(self._se_reduce(y.mean(dim=(2, 3), keepdim=True))))
            y = torch.sigmoid(s) * y
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class TorchEfficientNet(nn.Module):
    """lukemelas-named EfficientNet-B0 (`lite=False`) or -Lite0 (`lite=True`), width/depth 1.

    `taps(x)` returns V1..V5 (after blocks 0, 2, 4, 10, 15) for a normalised NCHW x.
    """

    TAP_AFTER = (0, 2, 4, 10, 15)

    def __init__(self, lite: bool, num_classes=1000):
        super().__init__()
        act = (lambda t: F.relu6(t)) if lite else F.silu
        self.act = act
        bn = {"eps": 1e-3, "momentum": 0.01}
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **bn)
        blocks = []
        for reps, k, s, e, cin, cout in B0_STAGES:
            for r in range(reps):
                blocks.append(
                    MBConvBlock(
                        k, s if r == 0 else 1, e, cin if r == 0 else cout, cout, not lite, act
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **bn)
        self._fc = nn.Linear(1280, num_classes)

    def taps(self, x):
        x = self.act(self._bn0(self._conv_stem(x)))
        out = []
        for i, blk in enumerate(self._blocks):
            x = blk(x)
            if i in self.TAP_AFTER:
                out.append(x)
        return out

    def forward(self, x):
        h = self.act(self._bn1(self._conv_head(self.taps(x)[-1])))
        return self._fc(h.mean(dim=(2, 3)))


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))


def numpy_state(model: nn.Module) -> dict[str, np.ndarray]:
    """`model.state_dict()` as numpy arrays (what convert.common.read_state_dict returns)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).cpu().numpy()
