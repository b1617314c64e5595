"""The RIS network of the paper (Fig. 1): visual encoder with progressive vision-language
fusion at V3, V4, V5, a BERT text encoder, and an FPN decoder with a 2-class head."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rkd_jax.models.bert import Bert, BertConfig
from rkd_jax.models.efficientnet import EfficientNetB0, EfficientNetLite0
from rkd_jax.models.fpn import FPN
from rkd_jax.models.fusion import ATTENTION_NORMS, VLFusion
from rkd_jax.models.resnet import ResNet18, ResNet34, ResNet50, ResNet101

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "efficientnet_b0": EfficientNetB0,
    "efficientnet_lite0": EfficientNetLite0,
}

FUSED_STAGES = (3, 4, 5)


def check_backbone_name(name: str) -> None:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(sorted(BACKBONES))}")


def make_backbone(
    name: str, width: int, stage_sizes: tuple[int, ...], dtype: Any, fold_bn: bool = False
) -> nn.Module:
    """Backbone constructor by config name; `width`/`stage_sizes` apply to ResNets only."""
    check_backbone_name(name)
    if name.startswith("resnet"):
        kwargs = {"width": width, "dtype": dtype, "fold_bn": fold_bn}
        if stage_sizes:
            kwargs["stage_sizes"] = tuple(stage_sizes)
        return BACKBONES[name](**kwargs)
    return BACKBONES[name](dtype=dtype, fold_bn=fold_bn)


class Segmenter(nn.Module):
    """Image [B, H, W, 3] in [0, 1] + tokens [B, L] -> dict of named taps.

    Returns:
      logits: [B, H/4, W/4, 2] foreground/background scores at stride 4.
      vl_attention: list of A [B, HW_i, L] for V3, V4, V5 (strides 8, 16, 32).
      decoder: D [B, HW/16, fpn_dim], the FPN output distilled by L_C.
      text: [B, L, D] text features (after the encoder, or the precomputed ones).
      category_logits (only with category_classes > 0): list of [B, h_i, w_i, K] category
        scores of the visual features entering the fusions at V3, V4, V5.
    """

    backbone: str
    text_config: BertConfig
    backbone_width: int = 64
    backbone_stage_sizes: tuple[int, ...] = ()
    text_num_layers: int | None = None
    text_trainable: bool = True
    fusion_dim: int = 256
    fpn_dim: int = 256
    attention_norm: str = "softmax"
    coord_map: bool = False  # beyond the paper: pixel coordinates enter the fusion
    fusion_mode: str = "add"  # "add" (the paper's V + Linear(O)) | "multiply" (beyond it)
    # Beyond the paper: > 0 adds a 1x1 category classifier on the visual features entering each
    # fusion (V3, V4, V5 before language), trained on the referred object's category
    # (`losses.category_loss`): a stand-in for the ImageNet pre-training the paper's backbones
    # start from, which a backbone trained from scratch on referring data lacks.
    category_classes: int = 0
    dtype: Any = jnp.float32
    fold_bn: bool = False  # inference-only, BatchNorm folded into convs (rkd_jax.models.fold)

    def setup(self):
        if self.attention_norm not in ATTENTION_NORMS:
            raise ValueError(
                f"attention_norm={self.attention_norm!r}; expected one of {ATTENTION_NORMS}"
            )
        self.visual = make_backbone(
            self.backbone,
            self.backbone_width,
            self.backbone_stage_sizes,
            self.dtype,
            self.fold_bn,
        )
        self.text_encoder = Bert(
            self.text_config, num_layers=self.text_num_layers, dtype=self.dtype
        )
        self.fusions = [
            VLFusion(
                self.fusion_dim,
                self.attention_norm,
                self.dtype,
                coord_map=self.coord_map,
                mode=self.fusion_mode,
                name=f"fusion_v{s}",
            )
            for s in FUSED_STAGES
        ]
        self.decoder = FPN(self.fpn_dim, self.dtype, fold_bn=self.fold_bn)
        if self.category_classes > 0:
            self.category_heads = [
                nn.Dense(
                    self.category_classes,
                    dtype=self.dtype,
                    param_dtype=jnp.float32,
                    name=f"category_v{s}",
                )
                for s in FUSED_STAGES
            ]

    def encode_text(self, tokens: jax.Array, token_mask: jax.Array, train: bool = False):
        """[B, L] token ids and mask -> [B, L, D] text features (stop_gradient when frozen)."""
        t = self.text_encoder(tokens, token_mask, deterministic=not (train and self.text_trainable))
        return t if self.text_trainable else jax.lax.stop_gradient(t)

    def __call__(
        self,
        images: jax.Array,
        tokens: jax.Array,
        token_mask: jax.Array,
        train: bool = False,
        text_features: jax.Array | None = None,
    ) -> dict[str, Any]:
        if text_features is None:
            text = self.encode_text(tokens, token_mask, train)
        else:
            text = text_features
        x = images.astype(self.dtype)
        taps, attentions, categories = [], [], []
        for stage in range(1, 6):
            x = self.visual.stage(stage, x, train)
            if stage in FUSED_STAGES:
                k = stage - FUSED_STAGES[0]
                if self.category_classes > 0:
                    categories.append(self.category_heads[k](x).astype(jnp.float32))
                x, attn = self.fusions[k](x, text, token_mask)
                attentions.append(attn)
            taps.append(x)
        d, logits = self.decoder(taps[1:], train)
        b, h, w, c = d.shape
        out = {
            "logits": logits.astype(jnp.float32),
            "vl_attention": attentions,
            "decoder": d.reshape(b, h * w, c),
            "text": text,
        }
        if categories:
            out["category_logits"] = categories
        return out
