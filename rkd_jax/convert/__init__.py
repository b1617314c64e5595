"""Pretrained weights (HF BERT, torchvision/timm ResNet, EfficientNet) -> Flax variable trees."""

from rkd_jax.convert.common import ConversionError, read_state_dict  # noqa: F401
