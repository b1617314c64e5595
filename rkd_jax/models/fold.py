"""BatchNorm folding for frozen inference: Conv + BatchNorm(running stats) -> Conv with bias.

In inference mode a BatchNorm after a bias-free convolution is an affine map per output
channel, y = (conv(x) - mean) * g + beta with g = scale / sqrt(var + eps), so it can live in
the convolution itself:

    kernel' = kernel * g          (scaled along the output-channel axis, the last one)
    bias'   = beta - mean * g

The folded model is the same Segmenter (or backbone, or FPN) built with `fold_bn=True`: the
convs that a BatchNorm followed get a `bias`, the BatchNorms and the `batch_stats` collection
are gone, and nothing else changes, so every other variable keeps its name. It saves one
normalisation pass over every activation of the frozen teacher in the distillation step, and
of the student in prediction. It is inference-only: calling it with `train=True` raises.

Agreement with the unfolded model: the folding is done in float32, so outputs differ only by
float32 rounding (tests/test_fold.py checks rtol 1e-5 / atol 1e-5 relative to each output's
scale, for ResNet and EfficientNet segmenters).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rkd_jax.models import efficientnet, fpn, resnet
from rkd_jax.models.segmenter import Segmenter

# BatchNorm name -> the names of the convs it can follow. A module holds at most one of them
# (e.g. `bn1` follows `conv1` in a ResNet block, `depthwise_conv` in an MBConv block and
# `conv_head` in the EfficientNet head).
CONV_OF_NORM: dict[str, tuple[str, ...]] = {
    "bn0": ("conv_stem", "expand_conv"),
    "bn1": ("conv1", "depthwise_conv", "conv_head"),
    "bn2": ("conv2", "project_conv"),
    "bn3": ("conv3",),
    "downsample_bn": ("downsample_conv",),
    "smooth_bn": ("smooth",),
}


def fold_conv_bn(
    kernel: jax.Array,
    bn_params: dict,
    bn_stats: dict,
    eps: float,
    conv_bias: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One Conv + inference-mode BatchNorm -> (kernel', bias').

    kernel: [kh, kw, C_in / groups, C_out]; bn_params {scale, bias} [C_out];
    bn_stats {mean, var} [C_out]. Returns float32 kernel' (same shape) and bias' [C_out].
    """
    kernel = jnp.asarray(kernel, jnp.float32)
    c_out = kernel.shape[-1]
    scale = jnp.asarray(bn_params.get("scale", jnp.ones((c_out,))), jnp.float32)
    beta = jnp.asarray(bn_params.get("bias", jnp.zeros((c_out,))), jnp.float32)
    mean = jnp.asarray(bn_stats["mean"], jnp.float32)
    var = jnp.asarray(bn_stats["var"], jnp.float32)
    for name, v in (("scale", scale), ("bias", beta), ("mean", mean), ("var", var)):
        if v.shape != (c_out,):
            raise ValueError(
                f"fold_conv_bn: BatchNorm {name} has shape {v.shape}, the conv kernel "
                f"{kernel.shape} has {c_out} output channels"
            )
    g = scale * jax.lax.rsqrt(var + eps)
    b0 = jnp.zeros((c_out,), jnp.float32) if conv_bias is None else conv_bias.astype(jnp.float32)
    return kernel * g, beta + (b0 - mean) * g


def _fold_tree(params: dict, stats: dict, eps: float, where: str) -> tuple[dict, dict]:
    """Fold every (conv, BatchNorm) pair of a module's variable subtree; returns
    (params, leftover batch_stats) with the folded BatchNorms removed."""
    params, leftover = dict(params), {}
    for name, sub in stats.items():
        if not isinstance(sub, dict):
            leftover[name] = sub
            continue
        if "mean" in sub and "var" in sub:
            convs = [c for c in CONV_OF_NORM.get(name, ()) if c in params]
            if len(convs) != 1:
                raise ValueError(
                    f"fold_batch_norm: BatchNorm {where}/{name} follows no known conv "
                    f"(expected one of {CONV_OF_NORM.get(name, ())} beside it, found "
                    f"{sorted(params)})"
                )
            conv = dict(params[convs[0]])
            if name not in params:
                raise ValueError(f"fold_batch_norm: {where}/{name} has statistics but no params")
            kernel, bias = fold_conv_bn(
                conv["kernel"], params.pop(name), sub, eps, conv.get("bias")
            )
            conv["kernel"], conv["bias"] = kernel, bias
            params[convs[0]] = conv
        else:
            params[name], rest = _fold_tree(params[name], sub, eps, f"{where}/{name}")
            if rest:
                leftover[name] = rest
    return params, leftover


def _epsilon(module: nn.Module) -> float:
    if isinstance(module, resnet.ResNet):
        return resnet.BN_EPSILON
    if isinstance(module, efficientnet.EfficientNet):
        return efficientnet.BN_EPSILON
    if isinstance(module, fpn.FPN):
        return fpn.BN_EPSILON
    raise TypeError(
        f"fold_batch_norm: cannot fold a {type(module).__name__}; expected a Segmenter, "
        "ResNet, EfficientNet or FPN"
    )


def _fold_variables(model: nn.Module, variables: dict) -> dict:
    params = _as_dict(variables["params"])
    stats = _as_dict(variables.get("batch_stats", {}))
    if isinstance(model, Segmenter):
        eps = resnet.BN_EPSILON if model.backbone.startswith("resnet") else efficientnet.BN_EPSILON
        parts = {"visual": eps, "decoder": fpn.BN_EPSILON}
        leftover = {k: v for k, v in stats.items() if k not in parts}
        for part, part_eps in parts.items():
            if part in stats:
                params[part], rest = _fold_tree(params[part], stats[part], part_eps, part)
                if rest:
                    leftover[part] = rest
    else:
        params, leftover = _fold_tree(params, stats, _epsilon(model), type(model).__name__)
    if leftover:
        raise ValueError(
            "fold_batch_norm: batch_stats left after folding (a BatchNorm not after a conv?): "
            f"{sorted(leftover)}"
        )
    out = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
    out["params"] = params
    return out


def _as_dict(tree: Any) -> dict:
    # FrozenDicts and other mappings -> nested plain dicts (leaves untouched).
    if hasattr(tree, "items"):
        return {k: _as_dict(v) for k, v in tree.items()}
    return tree


def fold_batch_norm(model: Any, variables: dict, dtype: Any = None) -> tuple[nn.Module, dict]:
    """(folded model, folded variables) for inference with the BatchNorms inside the convs.

    model: a Segmenter (or a ResNet / EfficientNet / FPN), or a model config
      (configs/distill.py `model_config`) that `build.build_model(config, dtype)` turns into one.
    variables: {"params": ..., "batch_stats": ...} of the unfolded model (device arrays keep
      their placement: the folding runs under jit, so replicated in -> replicated out).
    Returns the same module with `fold_bn=True` and {"params": ...} without `batch_stats`;
    `folded.apply(folded_vars, ..., train=False)` equals `model.apply(variables, ...,
    train=False)` up to float32 rounding. Folding an already folded model is an error.
    """
    if not isinstance(model, nn.Module):
        from rkd_jax.models import build

        model = build.build_model(model, jnp.float32 if dtype is None else dtype)
    if getattr(model, "fold_bn", None) is None:
        _epsilon(model)  # raises the TypeError naming the module
    if model.fold_bn:
        raise ValueError("fold_batch_norm: the model is already folded (fold_bn=True)")
    if "params" not in variables:
        raise ValueError(
            f"fold_batch_norm: variables need 'params' (and 'batch_stats'); got {sorted(variables)}"
        )
    folded_vars = jax.jit(lambda v: _fold_variables(model, v))(dict(variables))
    return model.clone(fold_bn=True), folded_vars
