"""Frozen text features: the tokenizer a phase uses, the features of every unique sentence and
their on-disk cache.

With a frozen text encoder a run computes the features of every unique training sentence once
(`text_table`) and the train step indexes them by sentence id, instead of running the encoder
on every batch. `feature_cache` stores them under a key that fingerprints what they depend on.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from rkd_jax import feature_cache, parallel
from rkd_jax.config_loader import phase_configs
from rkd_jax.models import build


def uses_text_cache(config, model_cfg) -> bool:
    """Whether a model's text features come from a precomputed table (frozen encoder and
    `run.cache_text_features`)."""
    return bool(config.run.cache_text_features) and not model_cfg.text_trainable


def _tokenizer(model_cfg, max_tokens: int):
    from rkd_jax.data.tokenizer import load_tokenizer, tokenize
    from rkd_jax.pretrained import resolve_text_encoder_dir

    tok = load_tokenizer(resolve_text_encoder_dir(model_cfg.text_encoder_dir))
    return functools.partial(tokenize, tok), tok


def make_tokenizer(config, roles: tuple[str, ...]):
    """The tokenising function shared by the phase's models (their vocabularies must agree)."""
    fns = [_tokenizer(phase_configs(config, r)[0], config.data.max_tokens) for r in roles]
    vocabs = [tok.get_vocab() for _, tok in fns]
    if any(v != vocabs[0] for v in vocabs[1:]):
        raise ValueError(
            "teacher.text_encoder_dir and student.text_encoder_dir have different vocabularies;"
            " distillation feeds both the same token ids"
        )
    return fns[0][0]


def text_features(
    model, variables, tokens: np.ndarray, mask: np.ndarray, chunk: int = 256
) -> np.ndarray:
    """Frozen text features of every unique sentence, [N, L, D], on the host."""
    encode = jax.jit(lambda v, t, m: model.apply(v, t, m, method=model.encode_text))
    out = []
    for i in range(0, len(tokens), chunk):
        t, m = tokens[i : i + chunk], mask[i : i + chunk]
        pad = chunk - len(t)
        if pad:
            t = np.concatenate([t, np.zeros((pad, t.shape[1]), t.dtype)])
            m = np.concatenate([m, np.repeat(m[:1], pad, 0)])
        out.append(np.asarray(encode(variables, t, m))[: chunk - pad])
    return np.concatenate(out)


def text_table(
    config, model, model_cfg, variables, tokens: np.ndarray, mask: np.ndarray, mesh
) -> tuple[jax.Array, bool]:
    """(`text_features` replicated over `mesh`, whether they came from the cache).

    They are read from / written to `config.run.text_cache_dir` (empty: this process's memory,
    so a job's phases share them; feature_cache.load_or_compute) under a key that
    fingerprints the frozen encoder's weights, the model config, the sentences' tokens and
    masks, the compute dtype, the backend and the jax version (feature_cache).
    """
    directory = config.run.get("text_cache_dir", "")

    def compute():
        return text_features(model, variables, tokens, mask)

    key = feature_cache.fingerprint(
        variables["params"]["text_encoder"],
        model_cfg.to_dict(),
        tokens,
        mask,
        str(config.run.compute_dtype),
        jax.default_backend(),
        jax.__version__,
    )
    info = {"sentences": len(tokens), "architecture": build.architecture(model_cfg)}
    table, hit = feature_cache.load_or_compute(directory, key, compute, info)
    return parallel.replicate(table, mesh), hit
