"""EfficientNet-B0 state dicts in timm's and torchvision's key layouts load into our model.

The dicts are built here from a lukemelas-layout B0 (the plain-torch reference of
tests/torch_refs.py, random weights) by renaming its tensors to the names and module structure
those libraries publish; nothing is downloaded. Every Flax leaf must equal its source tensor.
"""

import re

import jax
import numpy as np
import pytest
from torch_refs import TorchEfficientNet, numpy_state, randomize_batchnorm

from rkd_jax.convert.common import ConversionError
from rkd_jax.convert.efficientnet_layouts import detect_layout
from rkd_jax.convert.vision import convert_efficientnet
from rkd_jax.models.efficientnet import EfficientNetB0

# Blocks per stage of B0 (timm's blocks.<s>, torchvision's features.<s+1>).
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
STAGE_OF = [(s, j) for s, n in enumerate(STAGE_DEPTHS) for j in range(n)]

# Names and shapes as timm's efficientnet_b0 / tf_efficientnet_b0 and torchvision's
# efficientnet_b0 state dicts have them.
TIMM_PUBLISHED = {
    "conv_stem.weight": (32, 3, 3, 3),
    "bn1.running_var": (32,),
    "blocks.0.0.conv_dw.weight": (32, 1, 3, 3),
    "blocks.0.0.bn1.weight": (32,),
    "blocks.0.0.se.conv_reduce.weight": (8, 32, 1, 1),
    "blocks.0.0.se.conv_reduce.bias": (8,),
    "blocks.0.0.conv_pw.weight": (16, 32, 1, 1),
    "blocks.1.0.conv_pw.weight": (96, 16, 1, 1),
    "blocks.1.0.conv_dw.weight": (96, 1, 3, 3),
    "blocks.1.0.se.conv_expand.weight": (96, 4, 1, 1),
    "blocks.1.0.conv_pwl.weight": (24, 96, 1, 1),
    "blocks.1.0.bn3.running_mean": (24,),
    "blocks.5.3.conv_dw.weight": (1152, 1, 5, 5),
    "blocks.6.0.conv_pwl.weight": (320, 1152, 1, 1),
    "conv_head.weight": (1280, 320, 1, 1),
    "bn2.weight": (1280,),
    "classifier.weight": (1000, 1280),
    "classifier.bias": (1000,),
}
TORCHVISION_PUBLISHED = {
    "features.0.0.weight": (32, 3, 3, 3),
    "features.0.1.running_mean": (32,),
    "features.1.0.block.0.0.weight": (32, 1, 3, 3),
    "features.1.0.block.1.fc1.weight": (8, 32, 1, 1),
    "features.1.0.block.1.fc2.bias": (32,),
    "features.1.0.block.2.0.weight": (16, 32, 1, 1),
    "features.2.0.block.0.0.weight": (96, 16, 1, 1),
    "features.2.0.block.1.0.weight": (96, 1, 3, 3),
    "features.2.0.block.2.fc1.weight": (4, 96, 1, 1),
    "features.2.0.block.3.0.weight": (24, 96, 1, 1),
    "features.2.0.block.3.1.running_var": (24,),
    "features.6.3.block.1.0.weight": (1152, 1, 5, 5),
    "features.7.0.block.3.0.weight": (320, 1152, 1, 1),
    "features.8.0.weight": (1280, 320, 1, 1),
    "features.8.1.weight": (1280,),
    "classifier.1.weight": (1000, 1280),
}

TOP = {
    "timm": {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    },
    "torchvision": {
        "_conv_stem": "features.0.0",
        "_bn0": "features.0.1",
        "_conv_head": "features.8.0",
        "_bn1": "features.8.1",
        "_fc": "classifier.1",
    },
}
# Module names inside a block: (expand ratio 1, expand ratio 6).
BLOCK = {
    "timm": (
        {
            "_depthwise_conv": "conv_dw",
            "_bn1": "bn1",
            "_se_reduce": "se.conv_reduce",
            "_se_expand": "se.conv_expand",
            "_project_conv": "conv_pw",
            "_bn2": "bn2",
        },
        {
            "_expand_conv": "conv_pw",
            "_bn0": "bn1",
            "_depthwise_conv": "conv_dw",
            "_bn1": "bn2",
            "_se_reduce": "se.conv_reduce",
            "_se_expand": "se.conv_expand",
            "_project_conv": "conv_pwl",
            "_bn2": "bn3",
        },
    ),
    "torchvision": (
        {
            "_depthwise_conv": "0.0",
            "_bn1": "0.1",
            "_se_reduce": "1.fc1",
            "_se_expand": "1.fc2",
            "_project_conv": "2.0",
            "_bn2": "2.1",
        },
        {
            "_expand_conv": "0.0",
            "_bn0": "0.1",
            "_depthwise_conv": "1.0",
            "_bn1": "1.1",
            "_se_reduce": "2.fc1",
            "_se_expand": "2.fc2",
            "_project_conv": "3.0",
            "_bn2": "3.1",
        },
    ),
}


def rename(luke: dict, layout: str) -> tuple[dict, dict]:
    """A lukemelas state dict in `layout`'s names -> (state, {new key: lukemelas key})."""
    out, origin = {}, {}
    for key, value in luke.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if m:
            i, module, leaf = int(m.group(1)), m.group(2), m.group(3)
            s, j = STAGE_OF[i]
            names = BLOCK[layout][0 if i == 0 else 1]
            prefix = f"blocks.{s}.{j}" if layout == "timm" else f"features.{s + 1}.{j}.block"
            new = f"{prefix}.{names[module]}.{leaf}"
        else:
            module, leaf = key.split(".")
            new = f"{TOP[layout][module]}.{leaf}"
        out[new], origin[new] = value, key
    return out, origin


def flax_leaf(variables: dict, luke_key: str) -> np.ndarray:
    """The Flax leaf a lukemelas key lands in, in the source tensor's layout (OIHW, [out, in])."""
    module, leaf = luke_key.rsplit(".", 1)
    path = [p.lstrip("_") for p in re.sub(r"_blocks\.(\d+)", r"blocks_\1", module).split(".")]
    collection, name = {
        "weight": ("params", "kernel"),
        "bias": ("params", "bias"),
        "running_mean": ("batch_stats", "mean"),
        "running_var": ("batch_stats", "var"),
    }[leaf]
    tree = variables[collection]
    for p in path:
        tree = tree[p]
    if name == "kernel" and "kernel" not in tree:
        name = "scale"  # a BatchNorm's weight
    value = np.asarray(tree[name])
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    return value.T if value.ndim == 2 else value


@pytest.fixture(scope="module")
def luke():
    ref = TorchEfficientNet(lite=False)
    randomize_batchnorm(ref, seed=5)
    return numpy_state(ref)


def classify(module, x):
    """Backbone and classifier head: every variable of the model."""
    return module.head(module(x, False)[-1], False)


def count_leaves(variables: dict) -> int:
    return len(jax.tree.leaves(variables))


@pytest.mark.parametrize(
    "layout, published", [("timm", TIMM_PUBLISHED), ("torchvision", TORCHVISION_PUBLISHED)]
)
def test_b0_in_another_layout_loads_every_tensor(luke, layout, published):
    state, origin = rename(luke, layout)
    for key, shape in published.items():
        assert state[key].shape == shape, key
    assert detect_layout(state) == layout and detect_layout(luke) == "lukemelas"

    variables = convert_efficientnet(state, "efficientnet_b0", include_head=True)
    used = [k for k in state if not k.endswith("num_batches_tracked")]
    assert count_leaves(variables) == len(used)
    for key in used:
        np.testing.assert_array_equal(flax_leaf(variables, origin[key]), state[key], err_msg=key)
    # The same tree the lukemelas file gives, shaped as the Flax model's own variables.
    direct = convert_efficientnet(luke, "b0", include_head=True)
    assert jax.tree.structure(variables) == jax.tree.structure(direct)
    model = EfficientNetB0(num_classes=1000)
    x = np.zeros((1, 64, 64, 3), np.float32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, method=classify))
    assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda a: a.shape, abstract)

    # A segmenter's backbone drops the classifier head of any layout.
    backbone = convert_efficientnet(state, "b0")
    assert "fc" not in backbone["params"] and "conv_head" not in backbone["params"]


def test_a_broken_timm_or_torchvision_dict_is_named(luke):
    state, _ = rename(luke, "timm")
    del state["blocks.1.0.conv_pwl.weight"]
    # The message names the key as the file has it.
    with pytest.raises(ConversionError, match=r"b0\.pth \(timm layout\).*'blocks\.1\.0\.conv_pwl"):
        convert_efficientnet(state, "b0", source="b0.pth")
    state, _ = rename(luke, "torchvision")
    state["features.2.0.block.3.0.weight"] = np.zeros((24, 95, 1, 1), np.float32)
    with pytest.raises(
        ConversionError, match=r"'features\.2\.0\.block\.3\.0\.weight' has shape \(24, 95, 1, 1\)"
    ):
        convert_efficientnet(state, "b0", source="b0.pth")
    state["features.2.0.block.3.0.weight"] = luke["_blocks.1._project_conv.weight"]
    state["features.2.0.block.3.7.weight"] = np.zeros((24,), np.float32)
    with pytest.raises(ConversionError, match=r"unexpected key\(s\) 'features\.2\.0\.block\.3\.7"):
        convert_efficientnet(state, "b0", source="b0.pth")
