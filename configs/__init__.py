"""The configs of rkd_jax: distill.py (teacher, student and distillation in one file) and
teacher.py / student.py (the same with `mode` set).

This directory is their one source; an installed rkd_jax carries it as the package
`rkd_jax.configs` (pyproject.toml's package-dir), so `--config=distill:paper` names the file
from any directory and `--config=configs/distill.py:paper` reads it from a checkout
(rkd_jax/config_loader.py resolves both).
"""
