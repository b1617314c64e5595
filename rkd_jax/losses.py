"""Loss functions: segmentation, the paper's two relational distillation losses, baselines.

Every function here is pure `jax.numpy`, takes batch-first arrays in NHWC (or flattened
`[B, HW, C]`) layout and computes in float32 whatever the input dtype (bf16 activations are
cast up first), so the losses are exact enough to compare teacher and student statistics.

Paper terms (docs/paper.md):
- `segmentation_loss`  L_seg, 2-class cross-entropy on logits upsampled to the input size.
- `vl_attention_loss`  L_VL, Eq. (6), on the vision-language correlation maps A of V3..V5.
- `channel_loss`       L_C, Eqs. (7)-(8), on the FPN output D.
- `distillation_losses` Eq. (9) and the comparison baselines, chosen by `config.distill.method`.

Every per-example quantity is averaged over the batch with optional `weights [B]` (1 for a real
example, 0 for padding in an evaluation batch), so padded rows never move a loss.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

# "vl_channel" is the paper's L_VL + L_C. "rkd" was its name before 2026-11-30; in every KD
# toolkit (mdistiller, torchdistill) "rkd" means Park et al.'s distance/angle Relational KD,
# so it stays only as an alias that warns.
PAPER_METHOD = "vl_channel"
METHOD_ALIASES = {"rkd": PAPER_METHOD}
VALID_METHODS = (PAPER_METHOD, "none", "logit_kd", "skd", "cwd", "ickd")
SEG_LOSS_KINDS = ("ce", "bce", "ce_dice")
CHANNEL_NORMS = ("hw", "l2")

# Gram matrices of wide decoder features are where TF32 (the GPU default for f32 matmuls)
# would cost 3 decimal digits; they are small next to the model, so ask for full f32.
_PRECISION = jax.lax.Precision.HIGHEST

# torch.nn.functional.normalize's eps; squared, because we clamp the squared norm (whose
# gradient stays finite at an all-zero row, unlike jnp.linalg.norm's).
_NORM_EPS_SQ = 1e-24


def _f32(x: Array) -> Array:
    return jnp.asarray(x).astype(jnp.float32)


def _batch_mean(per_example: Array, weights: Array | None) -> Array:
    """Mean of `per_example [B]` over the batch, weighted by `weights [B]` when given."""
    if weights is None:
        return jnp.mean(per_example)
    w = _f32(weights)
    if w.shape != per_example.shape:
        raise ValueError(
            f"weights: expected shape {per_example.shape} (one per example), got {w.shape}"
        )
    # All-zero weights (an entirely padded batch) give 0, not NaN.
    return jnp.sum(w * per_example) / jnp.maximum(jnp.sum(w), 1e-12)


def _l2_normalize(x: Array, axis: int) -> Array:
    """x / max(||x||, 1e-12) along `axis`, with finite gradients at x = 0."""
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS_SQ))


def _flatten_spatial(x: Array, name: str) -> Array:
    """[B, HW, C] or [B, H, W, C] -> [B, HW, C]."""
    if x.ndim == 3:
        return x
    if x.ndim == 4:
        return x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])
    raise ValueError(f"{name}: expected [B, HW, C] or [B, H, W, C], got shape {x.shape}")


def _check_same_shape(a: Array, b: Array, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: teacher shape {a.shape} != student shape {b.shape}")


def segmentation_loss(
    logits: Array, mask: Array, kind: str = "ce", weights: Array | None = None
) -> Array:
    """L_seg: 2-class segmentation loss on logits upsampled to the mask's size.

    Args:
      logits: `[B, h, w, 2]` (background, foreground) at the network's output stride.
      mask: `[B, H, W]` ints in {0, 1}, the ground-truth mask at the input resolution.
      kind: 'ce' (default): softmax cross-entropy over the 2 classes. 'bce': sigmoid binary
        cross-entropy on z = logits[..., 1] - logits[..., 0]. For two classes the two are the
        same function of the logits (-log softmax = softplus of the logit difference), so
        'bce' exists for configs written in those terms, not as a different objective.
        'ce_dice' (beyond the paper): 'ce' + the soft Dice loss 1 - 2|P.Y| / (|P| + |Y|) of
        each image's foreground probabilities P, which weighs a small object as much as a
        large one where the per-pixel mean lets background pixels dominate.
      weights: optional `[B]` validity weights (0 for padded examples).

    Returns:
      Scalar float32: mean over the H x W pixels, then (weighted) mean over the batch. The
      logits are resized with `jax.image.resize(..., 'bilinear', antialias=False)` (half-pixel
      centres, like PyTorch's `align_corners=False`).
    """
    if kind not in SEG_LOSS_KINDS:
        raise ValueError(f"segmentation_loss kind={kind!r}: expected one of {SEG_LOSS_KINDS}")
    if logits.ndim != 4 or logits.shape[-1] != 2:
        raise ValueError(f"logits: expected [B, h, w, 2], got shape {logits.shape}")
    if mask.ndim != 3 or mask.shape[0] != logits.shape[0]:
        raise ValueError(
            f"mask: expected [B, H, W] with B={logits.shape[0]}, got shape {mask.shape}"
        )
    b, h, w = mask.shape
    x = _f32(logits)
    if x.shape[1:3] != (h, w):
        x = jax.image.resize(x, (b, h, w, 2), method="bilinear", antialias=False)
    y = _f32(mask)
    if kind == "bce":
        z = x[..., 1] - x[..., 0]
        per_pixel = jnp.logaddexp(0.0, z) - y * z
        return _batch_mean(jnp.mean(per_pixel, axis=(1, 2)), weights)
    logp = jax.nn.log_softmax(x, axis=-1)
    per_pixel = -(y * logp[..., 1] + (1.0 - y) * logp[..., 0])
    per_example = jnp.mean(per_pixel, axis=(1, 2))
    if kind == "ce_dice":
        p = jnp.exp(logp[..., 1])
        overlap = jnp.sum(p * y, axis=(1, 2))
        total = jnp.sum(p, axis=(1, 2)) + jnp.sum(y, axis=(1, 2))
        # +1 in both terms: an empty mask and an empty prediction give 0, never 0/0.
        per_example = per_example + 1.0 - (2.0 * overlap + 1.0) / (total + 1.0)
    return _batch_mean(per_example, weights)


def category_loss(
    category_logits: Sequence[Array],
    mask: Array,
    category_id: Array,
    weights: Array | None = None,
) -> Array:
    """Cross-entropy of the referred object's category, read from its pixels' scores.

    Beyond the paper (model.category_classes > 0): at each level the per-cell category scores
    are averaged over the object's cells, weighted by the fraction of each cell the mask covers
    (the mask area-pooled to the level's grid), and scored against the object's category.

    Args:
      category_logits: list of `[B, h, w, K]` per level; h, w must divide the mask's H, W.
      mask: `[B, H, W]` ints in {0, 1}, the referred object at the input resolution.
      category_id: `[B]` ints in [0, K), the object's category.
      weights: optional `[B]` validity weights (0 for padded examples).

    Returns:
      Scalar float32: mean over levels of the (weighted) batch mean.
    """
    if not category_logits:
        raise ValueError("category_logits: expected at least one level")
    b, hm, wm = mask.shape
    y = _f32(mask)
    total = jnp.zeros((), jnp.float32)
    for logits in category_logits:
        if logits.ndim != 4 or logits.shape[0] != b:
            raise ValueError(f"category_logits: expected [B={b}, h, w, K], got {logits.shape}")
        h, w = logits.shape[1:3]
        if hm % h or wm % w:
            raise ValueError(f"category_logits: grid {h}x{w} does not divide the mask's {hm}x{wm}")
        cover = y.reshape(b, h, hm // h, w, wm // w).mean(axis=(2, 4))  # [B, h, w]
        area = jnp.maximum(jnp.sum(cover, axis=(1, 2)), 1e-6)
        pooled = jnp.einsum("bhw,bhwk->bk", cover, _f32(logits)) / area[:, None]
        logp = jax.nn.log_softmax(pooled, axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.asarray(category_id)[:, None], axis=-1)[:, 0]
        total = total + _batch_mean(nll, weights)
    return total / len(category_logits)


def _category_term(out: Mapping[str, Any], batch: Mapping[str, Any], cfg: Any) -> Array | None:
    """weight * category_loss when the model has a category head (else None)."""
    if "category_logits" not in out:
        return None
    if "category_id" not in batch:
        raise ValueError("the model has a category head but the batch has no 'category_id'")
    return category_loss(
        out["category_logits"], batch["mask"], batch["category_id"], batch.get("valid")
    )


def vl_attention_loss(
    a_teacher: Sequence[Array],
    a_student: Sequence[Array],
    token_mask: Array,
    weights: Array | None = None,
) -> Array:
    """L_VL, Eq. (6): MSE between teacher and student vision-language maps, mean over stages.

    Args:
      a_teacher: list over stages (V3, V4, V5) of `[B, HW_i, L]` correlation maps A.
      a_student: same shapes as `a_teacher`.
      token_mask: `[B, L]`, 1 (or True) for real word tokens, 0 for padding.
      weights: optional `[B]` validity weights.

    Returns:
      Scalar float32. Per stage and example: sum over the HW_i positions and the real words of
      (A^t - A^s)^2 divided by HW_i * (number of real words), i.e. Eq. (6) with T = the
      expression's own length; padded words are excluded from both the sum and the count, and
      get exactly zero gradient. Then the (weighted) batch mean, then the mean over stages.
    """
    if len(a_teacher) != len(a_student) or not a_teacher:
        raise ValueError(
            f"vl_attention: teacher has {len(a_teacher)} stages, student {len(a_student)}; "
            "expected the same non-zero number"
        )
    m = jnp.asarray(token_mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"token_mask: expected [B, L], got shape {m.shape}")
    n_words = jnp.maximum(jnp.sum(m, axis=1).astype(jnp.float32), 1.0)  # [B]
    stage_losses = []
    for i, (at, as_) in enumerate(zip(a_teacher, a_student)):
        _check_same_shape(at, as_, f"vl_attention stage {i}")
        if at.ndim != 3 or at.shape[0] != m.shape[0] or at.shape[2] != m.shape[1]:
            raise ValueError(
                f"vl_attention stage {i}: expected [B, HW, L] with B, L = {m.shape}, "
                f"got shape {at.shape}"
            )
        diff = _f32(at) - _f32(as_)
        # where, not a product: a NaN/Inf in a padded column cannot leak into the loss.
        sq = jnp.where(m[:, None, :], diff * diff, 0.0)
        per_example = jnp.sum(sq, axis=(1, 2)) / (at.shape[1] * n_words)
        stage_losses.append(_batch_mean(per_example, weights))
    return jnp.mean(jnp.stack(stage_losses))


def channel_correlation(d: Array, norm: str = "hw") -> Array:
    """A_c = D^T D, Eq. (7): channel-by-channel correlation of decoder features.

    Args:
      d: `[B, HW, C]` (or `[B, H, W, C]`) FPN output D.
      norm: 'hw' (default, DESIGN.md): D^T D / HW, so the scale does not grow with the
        resolution. 'l2': each channel's column of D (its HW responses) is L2-normalised first
        and there is no HW division, so A_c holds cosine similarities between channels (scale
        free, diagonal 1 for live channels). Note: ICKD itself normalises the rows of the Gram
        matrix instead; see `ickd_loss`.

    Returns:
      `[B, C, C]` float32.
    """
    if norm not in CHANNEL_NORMS:
        raise ValueError(f"channel_norm={norm!r}: expected one of {CHANNEL_NORMS}")
    x = _f32(_flatten_spatial(d, "decoder features"))
    if norm == "l2":
        x = _l2_normalize(x, axis=1)
    gram = jnp.einsum("bnc,bnd->bcd", x, x, precision=_PRECISION)
    if norm == "hw":
        gram = gram / x.shape[1]
    return gram


def channel_loss(
    d_teacher: Array, d_student: Array, norm: str = "hw", weights: Array | None = None
) -> Array:
    """L_C, Eq. (8): mean over the C x C entries of (A_c^t - A_c^s)^2, then over the batch.

    Args:
      d_teacher: `[B, HW, C]` (or `[B, H, W, C]`) teacher FPN output D_t.
      d_student: same shape, student FPN output D_s.
      norm: 'hw' or 'l2', see `channel_correlation`.
      weights: optional `[B]` validity weights.

    Returns:
      Scalar float32.
    """
    _check_same_shape(d_teacher, d_student, "decoder features")
    return channel_loss_to_target(channel_correlation(d_teacher, norm), d_student, norm, weights)


def channel_loss_to_target(
    corr_teacher: Array, d_student: Array, norm: str = "hw", weights: Array | None = None
) -> Array:
    """L_C, Eq. (8), against the teacher's precomputed A_c^t `[B, C, C]` (`channel_correlation`
    of its D): what `channel_loss` computes, for a teacher whose targets were cached."""
    corr_student = channel_correlation(d_student, norm)
    _check_same_shape(corr_teacher, corr_student, "channel correlation")
    diff = _f32(corr_teacher) - corr_student
    return _batch_mean(jnp.mean(diff * diff, axis=(1, 2)), weights)


def logit_kd_loss(
    logits_t: Array, logits_s: Array, temperature: float = 1.0, weights: Array | None = None
) -> Array:
    """Pixel-wise logit distillation (Hinton et al. 2015, "Distilling the knowledge in a
    neural network"; per pixel as the pixel-wise term of Liu et al. 2019, SKD).

    Args:
      logits_t: `[B, h, w, K]` teacher logits (K = 2 here).
      logits_s: same shape, student logits.
      temperature: T; both distributions are softmax(logits / T) and the loss is scaled by
        T^2 so its gradient does not shrink with T. Default 1.0 (SKD's pixel-wise setting).
      weights: optional `[B]` validity weights.

    Returns:
      Scalar float32: T^2 * KL(p_t || p_s) per pixel, mean over pixels, then over the batch.
      Suggested weight (`config.distill.kd_weight`): 10, SKD's lambda for the pixel-wise term
      (Liu et al. 2019, `--lambda-pi 10`).
    """
    _check_same_shape(logits_t, logits_s, "logits")
    if temperature <= 0:
        raise ValueError(f"kd_temperature={temperature}: expected > 0")
    logp_t = jax.nn.log_softmax(_f32(logits_t) / temperature, axis=-1)
    logp_s = jax.nn.log_softmax(_f32(logits_s) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)  # [B, h, w]
    per_example = jnp.mean(kl.reshape(kl.shape[0], -1), axis=1)
    return (temperature**2) * _batch_mean(per_example, weights)


def _max_pool_ceil(x: Array, scale: float) -> Array:
    """[B, H, W, C] -> [B, ceil(H/ph), ceil(W/pw), C], ph = max(1, int(H * scale)) (ceil mode)."""
    _, h, w, _ = x.shape
    ph, pw = max(1, int(h * scale)), max(1, int(w * scale))
    nh, nw = -(-h // ph), -(-w // pw)
    # A reduce-window max, like torch's max_pool2d (its gradient goes to one maximum). The
    # pad-reshape-max form gave NaN gradients inside the full distill step at XLA's
    # optimisation level 0 (the test suite's), from finite inputs.
    return jax.lax.reduce_window(
        x,
        -jnp.inf,
        jax.lax.max,
        (1, ph, pw, 1),
        (1, ph, pw, 1),
        ((0, 0), (0, nh * ph - h), (0, nw * pw - w), (0, 0)),
    )


def pairwise_similarity_loss(
    feat_t: Array,
    feat_s: Array,
    pool_scale: float | None = 0.5,
    weights: Array | None = None,
) -> Array:
    """SKD pair-wise distillation (Liu et al. 2019, "Structured knowledge distillation for
    semantic segmentation", CVPR).

    Each spatial node is a max-pooled patch of the feature map; a_ij is the cosine similarity
    (over channels) of nodes i and j; the loss is the mean over all N x N pairs of
    (a^t_ij - a^s_ij)^2. Teacher and student may have different C.

    Args:
      feat_t: `[B, H, W, C_t]` teacher features.
      feat_s: `[B, H, W, C_s]` student features (same H, W).
      pool_scale: a node covers a patch of int(H * pool_scale) x int(W * pool_scale)
        positions (max pooling, ceil mode). Default 0.5, the SKD code's `--pool-scale`, i.e. a
        2 x 2 grid of nodes; None uses every position as a node (N = HW, memory HW^2).
      weights: optional `[B]` validity weights.

    Returns:
      Scalar float32. Suggested weight (`config.distill.skd_weight`): 1.0, SKD's
      `--lambda-pa` default. Unlike the SKD code, the feature norm is not detached.
    """
    if feat_t.ndim != 4 or feat_s.ndim != 4 or feat_t.shape[:3] != feat_s.shape[:3]:
        raise ValueError(
            "pairwise_similarity_loss: expected [B, H, W, C] features with equal B, H, W; "
            f"got teacher {feat_t.shape}, student {feat_s.shape}"
        )

    def similarity(f: Array) -> Array:
        f = _f32(f)
        if pool_scale is not None:
            f = _max_pool_ceil(f, pool_scale)
        f = _l2_normalize(f.reshape(f.shape[0], -1, f.shape[-1]), axis=-1)
        return jnp.einsum("bic,bjc->bij", f, f, precision=_PRECISION)

    diff = similarity(feat_t) - similarity(feat_s)
    return _batch_mean(jnp.mean(diff * diff, axis=(1, 2)), weights)


def cwd_loss(feat_t: Array, feat_s: Array, tau: float = 4.0, weights: Array | None = None) -> Array:
    """Channel-wise distillation, CWD (Shu et al. 2021, "Channel-wise knowledge distillation
    for dense prediction", ICCV).

    Each channel's map is turned into a distribution over spatial positions,
    softmax(x_c / tau), and the student's is pulled to the teacher's with KL(t || s).

    Args:
      feat_t: `[B, HW, C]` or `[B, H, W, C]` teacher features or logits.
      feat_s: same shape, student.
      tau: temperature. Default 4.0 with weight 3 (`config.distill.cwd_tau`, `cwd_weight`),
        the logit-map setting used for CWD in the CIRKD benchmark code (Yang et al. 2022);
        the CWD authors' mmsegmentation config for PSPNet uses tau 1, weight 5.
      weights: optional `[B]` validity weights.

    Returns:
      Scalar float32: tau^2 * (1/C) * sum_c KL over positions, then the batch mean (the
      normalisation of the CWD code: sum / (B * C) times tau^2).
    """
    _check_same_shape(feat_t, feat_s, "cwd features")
    if tau <= 0:
        raise ValueError(f"cwd_tau={tau}: expected > 0")
    logp_t = jax.nn.log_softmax(_f32(_flatten_spatial(feat_t, "cwd teacher")) / tau, axis=1)
    logp_s = jax.nn.log_softmax(_f32(_flatten_spatial(feat_s, "cwd student")) / tau, axis=1)
    kl = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=1)  # [B, C]
    return (tau**2) * _batch_mean(jnp.mean(kl, axis=1), weights)


def ickd_loss(d_t: Array, d_s: Array, weights: Array | None = None) -> Array:
    """Inter-channel correlation distillation, ICKD (Liu et al. 2021, "Exploring inter-channel
    correlation for diversity-preserved knowledge distillation", ICCV).

    G = F^T F is the C x C channel Gram matrix (no HW division); each row of G is
    L2-normalised; the loss is sum_ij (G^t_ij - G^s_ij)^2 / C per example (the ICKD code's
    sum / (C * B)), i.e. C times the mean squared difference, so ICKD's own loss weights carry
    over. ICKD passes the student's features through a learned 1x1 conv + BN first; the
    train step does that (`rkd_jax.models.adapter`, `config.distill.ickd_adapter`) and hands
    the adapted features in as `d_s`.

    Args:
      d_t: `[B, HW, C]` (or `[B, H, W, C]`) teacher features.
      d_s: same shape, student.
      weights: optional `[B]` validity weights.

    Returns:
      Scalar float32. Suggested weight (`config.distill.ickd_weight`): 2.5, ICKD's released
      CIFAR-100 setting (`-b 2.5`); no segmentation weight was released.
    """
    _check_same_shape(d_t, d_s, "ickd features")
    return ickd_loss_to_target(ickd_gram(d_t), d_s, weights)


def ickd_gram(d: Array) -> Array:
    """ICKD's channel Gram F^T F `[B, C, C]` with each row L2-normalised (float32)."""
    x = _f32(_flatten_spatial(d, "ickd features"))
    return _l2_normalize(jnp.einsum("bnc,bnd->bcd", x, x, precision=_PRECISION), axis=2)


def ickd_loss_to_target(gram_t: Array, d_s: Array, weights: Array | None = None) -> Array:
    """`ickd_loss` against the teacher's precomputed `ickd_gram` (cached teacher targets)."""
    gram_s = ickd_gram(d_s)
    _check_same_shape(gram_t, gram_s, "ickd gram")
    diff = _f32(gram_t) - gram_s
    return _batch_mean(jnp.sum(diff * diff, axis=(1, 2)) / diff.shape[1], weights)


_REQUIRED = object()


def _field(cfg: Any, name: str, default: Any = _REQUIRED) -> Any:
    """Read `name` from a ConfigDict / Mapping / object, with an error naming the field."""
    if cfg is None:
        value = None
    elif isinstance(cfg, Mapping):
        value = cfg.get(name)
    else:
        value = getattr(cfg, name, None)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"config.distill.{name} is missing: it is required for this method")
        return default
    return value


def _output(out: Mapping[str, Any], key: str, who: str) -> Any:
    if key not in out:
        raise ValueError(f"{who} output has no {key!r}; it has {sorted(out)}")
    return out[key]


def supervised_losses(
    out: Mapping[str, Any], batch: Mapping[str, Any], cfg: Any = None
) -> dict[str, Array]:
    """Losses for training the teacher or the student alone (no distillation).

    Args:
      out: model outputs with `logits [B, h, w, 2]`.
      batch: `mask [B, H, W]` and optionally `valid [B]` (0 for padded examples).
      cfg: optional config with `seg_loss` ('ce' default or 'bce').

    Returns:
      {'loss_seg', 'loss'}, float32 scalars (here equal).
    """
    kind = _field(cfg, "seg_loss", "ce")
    loss_seg = segmentation_loss(
        _output(out, "logits", "model"), batch["mask"], kind=kind, weights=batch.get("valid")
    )
    terms = {"loss_seg": loss_seg, "loss": loss_seg}
    loss_category = _category_term(out, batch, cfg)
    if loss_category is not None:
        terms["loss_category"] = loss_category
        terms["loss"] = loss_seg + float(_field(cfg, "category_weight", 1.0)) * loss_category
    return terms


def canonical_method(method: str) -> str:
    """`config.distill.method` with the old alias resolved (warns) and checked."""
    if method in METHOD_ALIASES:
        new = METHOD_ALIASES[method]
        warnings.warn(
            f"config.distill.method={method!r} is an alias of {new!r} (the paper's L_VL + L_C); "
            f"'rkd' usually names Park et al.'s distance/angle relational KD, which rkd_jax "
            f"does not implement. Use {new!r}.",
            FutureWarning,  # shown by default, unlike DeprecationWarning
            stacklevel=2,
        )
        return new
    if method not in VALID_METHODS:
        raise ValueError(f"config.distill.method={method!r}: expected one of {VALID_METHODS}")
    return method


def target_keys(cfg: Any) -> tuple[str, ...]:
    """What the distillation method reads from the teacher (`teacher_targets`' keys)."""
    method = canonical_method(_field(cfg, "method"))
    if method == PAPER_METHOD:
        keys = []
        if float(_field(cfg, "lambda_vl")) > 0:
            keys.append("vl_attention")
        if float(_field(cfg, "lambda_channel")) > 0:
            keys.append("channel_correlation")
        return tuple(keys)
    return {
        "none": (),
        "logit_kd": ("logits",),
        "cwd": ("logits",),
        "skd": ("decoder",),
        "ickd": ("ickd_gram",),
    }[method]


def teacher_targets(teacher_out: Mapping[str, Any], cfg: Any) -> dict[str, Any]:
    """The teacher quantities the method's losses compare with, from its raw outputs.

    `channel_correlation` is A_c^t of Eq. (7) (with `cfg.channel_norm`), `ickd_gram` ICKD's
    row-normalised Gram; `vl_attention`, `logits` and `decoder` are the outputs themselves.
    A key already in `teacher_out` is passed through, so targets computed once per
    (image, sentence) and cached give the losses exactly what the online teacher gives.
    """
    out = {}
    for key in target_keys(cfg):
        if key in teacher_out:
            out[key] = teacher_out[key]
        elif key == "channel_correlation":
            d_t = _output(teacher_out, "decoder", "teacher")
            out[key] = channel_correlation(d_t, _field(cfg, "channel_norm", "hw"))
        elif key == "ickd_gram":
            out[key] = ickd_gram(_output(teacher_out, "decoder", "teacher"))
        else:
            out[key] = _output(teacher_out, key, "teacher")
    return out


def distillation_losses(
    teacher_out: Mapping[str, Any],
    student_out: Mapping[str, Any],
    batch: Mapping[str, Any],
    cfg: Any,
) -> dict[str, Array]:
    """Eq. (9) and the baselines: every term separately plus the weighted total `loss`.

    Args:
      teacher_out: teacher outputs: `logits [B, h, w, 2]` (stride 4), `vl_attention` (list of
        `[B, HW_i, L]` for V3..V5), `decoder [B, HW, C]` (stride 4), or the method's
        precomputed `teacher_targets`. Wrapped in `stop_gradient` here, so no gradient
        reaches the teacher whatever the caller does.
      student_out: the same keys for the student.
      batch: `mask [B, H, W]`, `token_mask [B, L]`, optionally `valid [B]`.
      cfg: `config.distill` with `method` and the fields it needs:
        - 'vl_channel' (the paper; old alias 'rkd'): loss_seg + lambda_vl * loss_vl + lambda_channel * loss_channel,
          L_C with `channel_norm` ('hw' | 'l2'). A lambda of 0 skips its term (returned as 0):
          the "L_VL only" / "L_C only" ablations.
        - 'none': loss_seg only.
        - 'logit_kd': + kd_weight * loss_kd (`kd_temperature`), on the logits.
        - 'skd': + skd_weight * loss_skd, pair-wise similarity of the decoder features
          (`skd_pool_scale`, default 0.5; 0 = every position is a node).
        - 'cwd': + cwd_weight * loss_cwd (`cwd_tau`), on the logits (CWD's segmentation setup).
        - 'ickd': + ickd_weight * loss_ickd, on the decoder features (the student's after
          ICKD's adapter when the train step applies one).
        Optional `seg_loss` ('ce' | 'bce' | 'ce_dice'); with a student category head,
        + category_weight * loss_category (`category_loss`; the batch's `category_id`).

    Returns:
      dict of float32 scalars: `loss_seg`, the method's terms (unweighted) and `loss`.
    """
    method = canonical_method(_field(cfg, "method"))
    teacher_out = jax.lax.stop_gradient(teacher_targets(teacher_out, cfg))
    valid = batch.get("valid")
    kind = _field(cfg, "seg_loss", "ce")
    logits_s = _output(student_out, "logits", "student")
    terms: dict[str, Array] = {
        "loss_seg": segmentation_loss(logits_s, batch["mask"], kind=kind, weights=valid)
    }
    total = terms["loss_seg"]
    zero = jnp.zeros((), jnp.float32)

    def weight(name: str) -> float:
        value = float(_field(cfg, name))
        if value < 0:
            raise ValueError(f"config.distill.{name}={value}: expected >= 0")
        return value

    if method == PAPER_METHOD:
        lam_vl, lam_c = weight("lambda_vl"), weight("lambda_channel")
        terms["loss_vl"] = zero
        terms["loss_channel"] = zero
        if lam_vl > 0:
            terms["loss_vl"] = vl_attention_loss(
                _output(teacher_out, "vl_attention", "teacher"),
                _output(student_out, "vl_attention", "student"),
                batch["token_mask"],
                weights=valid,
            )
            total = total + lam_vl * terms["loss_vl"]
        if lam_c > 0:
            terms["loss_channel"] = channel_loss_to_target(
                teacher_out["channel_correlation"],
                _output(student_out, "decoder", "student"),
                norm=_field(cfg, "channel_norm", "hw"),
                weights=valid,
            )
            total = total + lam_c * terms["loss_channel"]
    elif method == "logit_kd":
        terms["loss_kd"] = logit_kd_loss(
            _output(teacher_out, "logits", "teacher"),
            logits_s,
            temperature=float(_field(cfg, "kd_temperature")),
            weights=valid,
        )
        total = total + weight("kd_weight") * terms["loss_kd"]
    elif method == "skd":
        d_t = _output(teacher_out, "decoder", "teacher")
        d_s = _output(student_out, "decoder", "student")
        terms["loss_skd"] = pairwise_similarity_loss(
            _as_map(d_t, logits_s.shape[1:3], "teacher decoder"),
            _as_map(d_s, logits_s.shape[1:3], "student decoder"),
            pool_scale=float(_field(cfg, "skd_pool_scale", 0.5)) or None,
            weights=valid,
        )
        total = total + weight("skd_weight") * terms["loss_skd"]
    elif method == "cwd":
        terms["loss_cwd"] = cwd_loss(
            _output(teacher_out, "logits", "teacher"),
            logits_s,
            tau=float(_field(cfg, "cwd_tau")),
            weights=valid,
        )
        total = total + weight("cwd_weight") * terms["loss_cwd"]
    elif method == "ickd":
        terms["loss_ickd"] = ickd_loss_to_target(
            teacher_out["ickd_gram"],
            _output(student_out, "decoder", "student"),
            weights=valid,
        )
        total = total + weight("ickd_weight") * terms["loss_ickd"]
    loss_category = _category_term(student_out, batch, cfg)
    if loss_category is not None:
        terms["loss_category"] = loss_category
        total = total + float(_field(cfg, "category_weight", 1.0)) * loss_category
    terms["loss"] = total
    return terms


def _as_map(d: Array, hw: tuple[int, int], name: str) -> Array:
    """Decoder features `[B, HW, C]` -> `[B, h, w, C]` on the logits' grid (both stride 4)."""
    if d.ndim == 4:
        return d
    h, w = hw
    if d.ndim != 3 or d.shape[1] != h * w:
        raise ValueError(
            f"{name}: expected [B, HW, C] with HW = {h}x{w} (the logits' grid), got {d.shape}"
        )
    return d.reshape(d.shape[0], h, w, d.shape[2])
