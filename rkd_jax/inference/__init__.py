"""Inference on trained checkpoints: `predictor` (`rkd_jax.load(path).predict(images, texts)`).

Deployment artifacts (ONNX, jax.export, safetensors) are made by `rkd_jax.export`.
"""
