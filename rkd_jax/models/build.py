"""Model construction from config, abstract variables and the architecture fields of a config.

Pretrained weights are loaded above the models, by `rkd_jax.pretrained.init_variables`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rkd_jax.models.bert import BertConfig, text_encoder_dir
from rkd_jax.models.segmenter import Segmenter, check_backbone_name

ARCH_FIELDS = (
    "backbone",
    "backbone_width",
    "backbone_stage_sizes",
    "text_num_layers",
    "fusion_dim",
    "fpn_dim",
    "attention_norm",
    "coord_map",
    "fusion_mode",
    "category_classes",
)


# What configs saved before a field existed meant (the paper's fusion).
FIELD_DEFAULTS = {"coord_map": False, "fusion_mode": "add", "category_classes": 0}


def resolve_dtype(name: str) -> Any:
    """'auto' -> bfloat16 on GPU/TPU, float32 on CPU; or an explicit 'float32'/'bfloat16'."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if name in ("float32", "bfloat16"):
        return jnp.dtype(name)
    raise ValueError(f"run.compute_dtype={name!r}; expected auto, float32 or bfloat16")


def text_config(model_cfg) -> BertConfig:
    """The text encoder's architecture, read from its directory's config.json."""
    return BertConfig.from_dir(text_encoder_dir(model_cfg.text_encoder_dir))


def build_model(model_cfg, dtype: Any = jnp.float32, bert_config: BertConfig | None = None):
    """Segmenter for a model config (configs/distill.py: model_config)."""
    check_backbone_name(model_cfg.backbone)
    bert_config = bert_config or text_config(model_cfg)
    if not 1 <= int(model_cfg.text_num_layers) <= bert_config.num_layers:
        where = model_cfg.text_encoder_dir or "the offline MiniLM (6 layers)"
        raise ValueError(
            f"text_num_layers={model_cfg.text_num_layers}, but the text encoder ({where}) has "
            f"{bert_config.num_layers} layers; the paper variants need a BERT-base directory: "
            "--config.teacher.text_encoder_dir=... --config.student.text_encoder_dir=..."
        )
    return Segmenter(
        backbone=model_cfg.backbone,
        text_config=bert_config,
        backbone_width=int(model_cfg.backbone_width),
        backbone_stage_sizes=tuple(int(s) for s in model_cfg.backbone_stage_sizes),
        text_num_layers=int(model_cfg.text_num_layers),
        text_trainable=bool(model_cfg.text_trainable),
        fusion_dim=int(model_cfg.fusion_dim),
        fpn_dim=int(model_cfg.fpn_dim),
        attention_norm=model_cfg.attention_norm,
        # Configs saved before the field existed had no coordinate map.
        coord_map=bool(model_cfg.get("coord_map", FIELD_DEFAULTS["coord_map"])),
        fusion_mode=str(model_cfg.get("fusion_mode", FIELD_DEFAULTS["fusion_mode"])),
        category_classes=int(model_cfg.get("category_classes", FIELD_DEFAULTS["category_classes"])),
        dtype=dtype,
    )


def make_key(seed: int) -> jax.Array:
    """PRNG key for init and dropout. XLA compiles the default threefry generator slowly on
    CPU (70 s vs 18 s for initialising the tiny model here), so we use the rbg generator."""
    return jax.random.key(seed, impl="rbg")


def dummy_inputs(image_size: int, max_tokens: int, batch: int = 1):
    images = jnp.zeros((batch, image_size, image_size, 3), jnp.float32)
    tokens = jnp.zeros((batch, max_tokens), jnp.int32)
    mask = jnp.ones((batch, max_tokens), jnp.int32)
    return images, tokens, mask


def abstract_variables(model, image_size: int, max_tokens: int) -> dict:
    """Shapes and dtypes of the model's variables, computed without allocating them."""
    return jax.eval_shape(lambda: model.init(make_key(0), *dummy_inputs(image_size, max_tokens)))


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def shape_mismatch(target, loaded) -> str | None:
    """The first difference of two variable trees' structure or shapes, in words, or None.

    target: the model's variables (arrays or ShapeDtypeStructs); loaded: restored or converted.
    """
    t = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(target)}
    s = {
        jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(loaded)
    }
    for key, shape in t.items():
        if key not in s:
            return f"lacks parameter {key} {tuple(shape)}"
        if tuple(s[key]) != tuple(shape):
            return f"parameter {key} has shape {tuple(s[key])}, expected {tuple(shape)}"
    extra = sorted(set(s) - set(t))
    if extra:
        return f"unexpected parameters {extra[:3]}"
    return None


def architecture(model_cfg) -> dict:
    """The config fields that decide the parameter shapes (for mismatch errors)."""
    return {
        k: (
            list(model_cfg[k])
            if k == "backbone_stage_sizes"
            else model_cfg.get(k, FIELD_DEFAULTS.get(k))
        )
        for k in ARCH_FIELDS
    }
