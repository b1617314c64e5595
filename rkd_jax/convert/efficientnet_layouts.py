"""EfficientNet state dicts of timm and torchvision -> the lukemelas layout `convert_efficientnet`
reads.

The three libraries hold the same tensors under different names (`<s>.<j>`: block j of stage s):

    lukemelas               timm                          torchvision
    _conv_stem, _bn0        conv_stem, bn1                features.0.0, features.0.1
    _blocks.<i>             blocks.<s>.<j>                features.<s+1>.<j>.block
      _expand_conv, _bn0      conv_pw, bn1                  0.0, 0.1
      _depthwise_conv, _bn1   conv_dw, bn2 (bn1)            1.0, 1.1 (0.0, 0.1)
      _se_reduce, _se_expand  se.conv_reduce, .conv_expand  2.fc1, 2.fc2 (1.fc1, 1.fc2)
      _project_conv, _bn2     conv_pwl, bn3 (conv_pw, bn2)  3.0, 3.1 (2.0, 2.1)
    _conv_head, _bn1, _fc   conv_head, bn2, classifier    features.8.0, features.8.1, classifier.1
(in brackets: the first stage's blocks, which have no expansion conv). Blocks are numbered in
order of (stage, index in stage), which is lukemelas' flat order. Only names change: every
tensor keeps its shape, so `convert_efficientnet`'s strict shape checks apply unchanged.

The weights are the same tensors, but the networks that trained them are not all the same:
timm's `tf_efficientnet_b0` (ported from TF) uses TF 'SAME' padding and BatchNorm eps 1e-3 like
our model; timm's `efficientnet_b0` and torchvision's `efficientnet_b0` were trained with
symmetric padding and eps 1e-5 (see docs/weights.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from rkd_jax.convert.common import ConversionError

LAYOUTS = ("lukemelas", "timm", "torchvision")


def detect_layout(state: Mapping[str, np.ndarray]) -> str | None:
    """'lukemelas', 'timm' or 'torchvision' from the stem's key; None for none of them."""
    if "_conv_stem.weight" in state:
        return "lukemelas"
    if "conv_stem.weight" in state:
        return "timm"
    if "features.0.0.weight" in state:
        return "torchvision"
    return None


def _blocks(state: Mapping[str, np.ndarray], pattern: str) -> list[tuple[int, int]]:
    """(stage, index) of every block whose keys match `pattern`, in flat (lukemelas) order."""
    found = set()
    for key in state:
        m = re.match(pattern, key)
        if m:
            found.add((int(m.group(1)), int(m.group(2))))
    return sorted(found)


def _rename(
    state: Mapping[str, np.ndarray], names: dict[str, str], source: str
) -> dict[str, np.ndarray]:
    """Rename by module prefix (`names`: old prefix -> new prefix, longest match first); a key
    that no prefix covers is kept as is, so the converter reports it as unexpected."""
    prefixes = sorted(names, key=len, reverse=True)
    out = {}
    for key, value in state.items():
        for p in prefixes:
            if key.startswith(p + "."):
                new = names[p] + key[len(p) :]
                break
        else:
            new = key
        if new in out:
            raise ConversionError(f"{source}: two keys map to '{new}' (one is '{key}')")
        out[new] = value
    return out


def timm_names(state: Mapping[str, np.ndarray]) -> dict[str, str]:
    """{timm module: lukemelas module} for a timm EfficientNet state dict (`conv_stem`,
    `blocks.<stage>.<j>`, `classifier`)."""
    names = {
        "conv_stem": "_conv_stem",
        "bn1": "_bn0",
        "conv_head": "_conv_head",
        "bn2": "_bn1",
        "classifier": "_fc",
    }
    for i, (s, j) in enumerate(_blocks(state, r"blocks\.(\d+)\.(\d+)\.")):
        old, new = f"blocks.{s}.{j}", f"_blocks.{i}"
        # Only an inverted-residual block (expand ratio > 1) has a third conv and BatchNorm.
        expands = any(k.startswith((f"{old}.conv_pwl.", f"{old}.bn3.")) for k in state)
        block = {
            "conv_dw": "_depthwise_conv",
            "se.conv_reduce": "_se_reduce",
            "se.conv_expand": "_se_expand",
        }
        if expands:
            block.update(
                conv_pw="_expand_conv", bn1="_bn0", bn2="_bn1", conv_pwl="_project_conv", bn3="_bn2"
            )
        else:
            block.update(bn1="_bn1", conv_pw="_project_conv", bn2="_bn2")
        names.update({f"{old}.{a}": f"{new}.{b}" for a, b in block.items()})
    return names


def torchvision_names(state: Mapping[str, np.ndarray]) -> dict[str, str]:
    """{torchvision module: lukemelas module} for a torchvision EfficientNet state dict
    (`features.<n>...`, `classifier.1`)."""
    blocks = _blocks(state, r"features\.(\d+)\.(\d+)\.block\.")
    stages = {s for s, _ in blocks}
    head = [
        int(m.group(1))
        for k in state
        if (m := re.match(r"features\.(\d+)\.0\.weight$", k)) and int(m.group(1)) not in stages
    ]
    names = {
        "features.0.0": "_conv_stem",
        "features.0.1": "_bn0",
        "classifier.1": "_fc",
    }
    if max(head, default=0) > 0:
        names[f"features.{max(head)}.0"] = "_conv_head"
        names[f"features.{max(head)}.1"] = "_bn1"
    conv_bn = {
        "expand": ("_expand_conv", "_bn0"),
        "depthwise": ("_depthwise_conv", "_bn1"),
        "project": ("_project_conv", "_bn2"),
    }
    for i, (s, j) in enumerate(blocks):
        old, new = f"features.{s}.{j}.block", f"_blocks.{i}"
        has_se = any(k.startswith(old + ".") and ".fc1." in k for k in state)
        children = ["depthwise", "se", "project"] if has_se else ["depthwise", "project"]
        # The expansion conv comes first, so an expanding block has one child more.
        if any(k.startswith(f"{old}.{len(children)}.") for k in state):
            children.insert(0, "expand")
        for k, child in enumerate(children):
            if child == "se":
                names[f"{old}.{k}.fc1"] = f"{new}._se_reduce"
                names[f"{old}.{k}.fc2"] = f"{new}._se_expand"
            else:
                conv, bn = conv_bn[child]
                names[f"{old}.{k}.0"] = f"{new}.{conv}"
                names[f"{old}.{k}.1"] = f"{new}.{bn}"
    return names


def to_lukemelas(
    state: Mapping[str, np.ndarray], source: str = "state dict"
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Any supported layout -> (the state under lukemelas names, {lukemelas module: original
    module}); `detect_layout` decides. A lukemelas dict, or one of no known layout, is returned
    as it is with an empty map (the converter then names the first key it lacks)."""
    layout = detect_layout(state)
    if layout == "timm":
        names = timm_names(state)
    elif layout == "torchvision":
        names = torchvision_names(state)
    else:
        return dict(state), {}
    return _rename(state, names, source), {v: k for k, v in names.items()}


def original_names(message: str, back: dict[str, str]) -> str:
    """Rewrite the quoted lukemelas keys of an error message in the file's own names."""
    prefixes = sorted(back, key=len, reverse=True)

    def original(m: re.Match) -> str:
        key = m.group(1)
        for p in prefixes:
            if key.startswith(p + "."):
                return f"'{back[p]}{key[len(p) :]}'"
        return m.group(0)

    return re.sub(r"'([^']+)'", original, message)
