"""Loss values: hand-computed tiny cases, an independent numpy implementation, gradients."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rkd_jax import losses as _losses

RNG = np.random.default_rng(0)
TOL = {"rtol": 1e-5, "atol": 1e-6}
_STATIC = (str, int, float, type(None), ml_collections.ConfigDict)


class _Jitted:
    """`losses.f(...)` run under jax.jit: one compile per call instead of one per op, which is
    several times faster on the shared 2-core CPU. Non-array positional arguments and all
    keyword arguments are bound statically."""

    def __getattr__(self, name):
        fn = getattr(_losses, name)

        def wrapped(*args, **kw):
            dyn = [i for i, a in enumerate(args) if not isinstance(a, _STATIC)]

            def f(*arrays):
                full = list(args)
                for i, a in zip(dyn, arrays):
                    full[i] = a
                return fn(*full, **kw)

            return jax.jit(f)(*[args[i] for i in dyn])

        return functools.wraps(fn)(wrapped)


losses = _Jitted()


def rand(*shape):
    return RNG.normal(size=shape).astype(np.float32)


# --- independent numpy references ----------------------------------------------------------


def np_upsample_bilinear(x, out_h, out_w):
    """[B, h, w, C] -> [B, out_h, out_w, C], half-pixel centres, edge clamped (torch
    align_corners=False), written as two 1-D interpolation matrices."""

    def matrix(n_in, n_out):
        m = np.zeros((n_out, n_in))
        for o in range(n_out):
            src = min(max((o + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
            i0 = math.floor(src)
            i1 = min(i0 + 1, n_in - 1)
            f = src - i0
            m[o, i0] += 1 - f
            m[o, i1] += f
        return m

    mh, mw = matrix(x.shape[1], out_h), matrix(x.shape[2], out_w)
    return np.einsum("Hh,bhwc,Ww->bHWc", mh, x.astype(np.float64), mw)


def np_log_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def np_seg_ce(logits, mask, weights=None):
    up = np_upsample_bilinear(logits, *mask.shape[1:])
    b, h, w = mask.shape
    per_example = np.zeros(b)
    for i in range(b):
        total = 0.0
        for y in range(h):
            for x in range(w):
                z = up[i, y, x]
                p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
                total -= math.log(p[mask[i, y, x]])
        per_example[i] = total / (h * w)
    if weights is None:
        return per_example.mean()
    return (weights * per_example).sum() / weights.sum()


def np_vl(a_t, a_s, token_mask):
    stage_losses = []
    for at, as_ in zip(a_t, a_s):
        per_example = []
        for i in range(at.shape[0]):
            words = np.flatnonzero(token_mask[i])
            d = at[i][:, words].astype(np.float64) - as_[i][:, words]
            per_example.append((d**2).sum() / (at.shape[1] * len(words)))
        stage_losses.append(np.mean(per_example))
    return np.mean(stage_losses)


def np_channel(d_t, d_s, norm):
    out = []
    for i in range(d_t.shape[0]):
        grams = []
        for d in (d_t[i].astype(np.float64), d_s[i].astype(np.float64)):
            if norm == "l2":
                d = d / np.linalg.norm(d, axis=0, keepdims=True)
                grams.append(d.T @ d)
            else:
                grams.append(d.T @ d / d.shape[0])
        out.append(((grams[0] - grams[1]) ** 2).mean())
    return np.mean(out)


def np_logit_kd(t, s, temp):
    lt = np_log_softmax(t.astype(np.float64) / temp, -1)
    ls = np_log_softmax(s.astype(np.float64) / temp, -1)
    kl = (np.exp(lt) * (lt - ls)).sum(-1)
    return temp**2 * kl.reshape(kl.shape[0], -1).mean(1).mean()


def np_skd(ft, fs, scale):
    def nodes(f):
        b, h, w, c = f.shape
        if scale is None:
            return f.reshape(b, h * w, c)
        ph, pw = max(1, int(h * scale)), max(1, int(w * scale))
        out = []
        for y0 in range(0, h, ph):
            for x0 in range(0, w, pw):
                out.append(f[:, y0 : y0 + ph, x0 : x0 + pw].max(axis=(1, 2)))
        return np.stack(out, axis=1)

    def sim(f):
        n = nodes(f.astype(np.float64))
        n = n / np.linalg.norm(n, axis=-1, keepdims=True)
        return np.einsum("bic,bjc->bij", n, n)

    return ((sim(ft) - sim(fs)) ** 2).mean(axis=(1, 2)).mean()


def np_cwd(ft, fs, tau):
    b, c = ft.shape[0], ft.shape[-1]
    ft = ft.reshape(b, -1, c).astype(np.float64)
    fs = fs.reshape(b, -1, c).astype(np.float64)
    total = 0.0
    for i in range(b):
        for ch in range(c):
            lt = np_log_softmax(ft[i, :, ch] / tau, 0)
            ls = np_log_softmax(fs[i, :, ch] / tau, 0)
            total += (np.exp(lt) * (lt - ls)).sum()
    return tau**2 * total / (b * c)


def np_ickd(dt, ds):
    b, c = dt.shape[0], dt.shape[-1]
    total = 0.0
    for i in range(b):
        g = []
        for d in (dt[i].astype(np.float64), ds[i].astype(np.float64)):
            gram = d.T @ d
            g.append(gram / np.linalg.norm(gram, axis=1, keepdims=True))
        total += ((g[0] - g[1]) ** 2).sum()
    return total / (c * b)


# --- segmentation loss ---------------------------------------------------------------------


def test_seg_ce_hand_computed_2x2():
    mask = np.array([[[1, 0], [0, 1]]])
    logits = np.zeros((1, 2, 2, 2), np.float32)
    logits[..., 1] = math.log(3.0)  # p(fg) = 3/4 everywhere
    expected = (2 * -math.log(0.75) + 2 * -math.log(0.25)) / 4
    assert float(losses.segmentation_loss(logits, mask)) == pytest.approx(expected, rel=1e-6)
    # All-zero logits: log 2 whatever the mask.
    assert float(losses.segmentation_loss(np.zeros_like(logits), mask)) == pytest.approx(
        math.log(2.0), rel=1e-6
    )


def test_seg_constant_logits_upsampled():
    # A 1x1 logit map upsampled to 4x4 stays constant, so the loss is hand-computable.
    logits = np.array([[[[0.0, math.log(3.0)]]]], np.float32)
    mask = np.zeros((1, 4, 4), np.int32)
    mask[0, :2] = 1
    expected = 0.5 * -math.log(0.75) + 0.5 * -math.log(0.25)
    assert float(losses.segmentation_loss(logits, mask)) == pytest.approx(expected, rel=1e-6)


def test_seg_ce_matches_numpy_with_upsampling_and_weights():
    logits = rand(3, 3, 4, 2) * 2
    mask = RNG.integers(0, 2, size=(3, 12, 16))
    np.testing.assert_allclose(
        losses.segmentation_loss(logits, mask), np_seg_ce(logits, mask), **TOL
    )
    w = np.array([1.0, 0.0, 1.0], np.float32)
    got = losses.segmentation_loss(logits, mask, weights=w)
    np.testing.assert_allclose(got, np_seg_ce(logits, mask, w), **TOL)
    # The padded example does not matter at all.
    logits2 = logits.copy()
    logits2[1] = 100.0
    assert float(losses.segmentation_loss(logits2, mask, weights=w)) == float(got)


def test_seg_bce_equals_ce_and_dtype():
    logits = rand(2, 3, 3, 2) * 3
    mask = RNG.integers(0, 2, size=(2, 6, 6))
    ce = losses.segmentation_loss(logits, mask, kind="ce")
    bce = losses.segmentation_loss(logits, mask, kind="bce")
    np.testing.assert_allclose(ce, bce, rtol=1e-6)
    half = losses.segmentation_loss(jnp.asarray(logits, jnp.bfloat16), mask)
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(half, ce, rtol=2e-2)
    with pytest.raises(ValueError, match="kind='dice'.*'ce', 'bce', 'ce_dice'"):
        losses.segmentation_loss(logits, mask, kind="dice")
    with pytest.raises(ValueError, match=r"logits: expected \[B, h, w, 2\]"):
        losses.segmentation_loss(rand(2, 3, 3, 3), mask)


def test_seg_ce_dice_hand_computed():
    # p(fg) = 3/4 everywhere on a 2x2 image with 2 foreground pixels:
    # Dice = 1 - (2 * 1.5 + 1) / (3 + 2 + 1) = 1/3, added to the CE of the same logits.
    mask = np.array([[[1, 0], [0, 1]]])
    logits = np.zeros((1, 2, 2, 2), np.float32)
    logits[..., 1] = math.log(3.0)
    ce = (2 * -math.log(0.75) + 2 * -math.log(0.25)) / 4
    got = losses.segmentation_loss(logits, mask, kind="ce_dice")
    assert float(got) == pytest.approx(ce + 1.0 / 3.0, rel=1e-6)
    # An empty mask and a near-empty prediction: the Dice term is ~0, not 0/0.
    empty = np.zeros_like(mask)
    sure_bg = np.zeros_like(logits)
    sure_bg[..., 0] = 30.0
    assert float(losses.segmentation_loss(sure_bg, empty, kind="ce_dice")) < 1e-6
    # The padded example does not count; the per-image Dice weighs a small object's image as
    # much as a large one's (unlike the per-pixel CE).
    w = np.array([1.0, 0.0], np.float32)
    two = np.concatenate([logits, 100 * np.ones_like(logits)])
    m2 = np.concatenate([mask, mask])
    assert float(losses.segmentation_loss(two, m2, kind="ce_dice", weights=w)) == pytest.approx(
        float(got), rel=1e-6
    )


def test_category_loss_hand_computed():
    # A 2x2 grid over a 4x4 mask: the object covers cell (0, 0) fully and half of cell (0, 1),
    # so the pooled scores are (1 * s00 + 0.5 * s01) / 1.5.
    mask = np.zeros((1, 4, 4), np.int32)
    mask[0, :2, :3] = 1
    scores = np.zeros((1, 2, 2, 3), np.float32)
    scores[0, 0, 0] = [2, 0, 0]
    scores[0, 0, 1] = [0, 4, 0]
    scores[0, 1, :] = [0, 0, 50]  # cells the object does not touch never count
    pooled = np.array([2.0, 2.0, 0.0]) / 1.5
    expected = -(pooled[1] - math.log(np.exp(pooled).sum()))
    got = losses.category_loss([scores], mask, np.array([1]))
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # Levels are averaged; a second level at the mask's own resolution.
    fine = np.zeros((1, 4, 4, 3), np.float32)
    both = losses.category_loss([scores, fine], mask, np.array([1]))
    assert float(both) == pytest.approx((expected + math.log(3.0)) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="does not divide"):
        losses.category_loss([np.zeros((1, 3, 3, 3), np.float32)], mask, np.array([1]))


def test_category_term_joins_both_losses():
    mask = np.zeros((2, 4, 4), np.int32)
    mask[:, 1:3, 1:3] = 1
    batch = {"mask": mask, "category_id": np.array([0, 2]), "token_mask": np.ones((2, 3))}
    cats = [rand(2, 2, 2, 3)]
    out = {"logits": rand(2, 2, 2, 2), "category_logits": cats}
    cfg = ml_collections.ConfigDict({"seg_loss": "ce", "category_weight": 0.5, "method": "none"})
    sup = losses.supervised_losses(out, batch, cfg)
    want = losses.category_loss(cats, mask, batch["category_id"])
    np.testing.assert_allclose(sup["loss_category"], want, rtol=1e-6)
    np.testing.assert_allclose(sup["loss"], sup["loss_seg"] + 0.5 * want, rtol=1e-6)
    dist = losses.distillation_losses({"logits": out["logits"]}, out, batch, cfg)
    np.testing.assert_allclose(dist["loss"], sup["loss"], rtol=1e-6)
    with pytest.raises(ValueError, match="no 'category_id'"):
        losses.supervised_losses(out, {"mask": mask}, cfg)


# --- L_VL ----------------------------------------------------------------------------------


def test_vl_hand_computed():
    # One example, HW = 2, L = 3 with the last word padded: T = 2 real words.
    tm = np.array([[1, 1, 0]])
    at = np.array([[[1.0, 0.0, 7.0], [0.0, 1.0, -3.0]]], np.float32)
    as_ = np.array([[[0.5, 0.5, 0.0], [0.0, 1.0, 9.0]]], np.float32)
    stage1 = (0.25 + 0.25) / (2 * 2)  # 0.125
    assert float(losses.vl_attention_loss([at], [as_], tm)) == pytest.approx(stage1)
    # A second stage with HW = 1: (1 - 0)^2 / (1 * 2) = 0.5; mean over stages.
    bt = np.array([[[1.0, 0.0, 0.0]]], np.float32)
    bs = np.array([[[0.0, 0.0, 5.0]]], np.float32)
    got = losses.vl_attention_loss([at, bt], [as_, bs], tm)
    assert float(got) == pytest.approx((stage1 + 0.5) / 2)


def stages(b=2, l=5, hws=(16, 4, 1)):
    return [RNG.uniform(size=(b, hw, l)).astype(np.float32) for hw in hws]


def test_vl_matches_numpy_and_zero_when_equal():
    tm = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    at, as_ = stages(), stages()
    np.testing.assert_allclose(losses.vl_attention_loss(at, as_, tm), np_vl(at, as_, tm), **TOL)
    assert float(losses.vl_attention_loss(at, at, tm)) == 0.0


def test_vl_padded_words_do_not_change_it():
    tm = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    at, as_ = stages(), stages()
    ref = float(losses.vl_attention_loss(at, as_, tm))
    at2, as2 = [a.copy() for a in at], [a.copy() for a in as_]
    for a in at2:
        a[0, :, 2:] = 50.0
        a[1, :, 4] = -9.0
    for a in as2:
        a[0, :, 2:] = np.nan  # even NaN in a padded column stays out
        a[1, :, 4] = 123.0
    assert float(losses.vl_attention_loss(at2, as2, tm)) == ref


def test_vl_gradients_reach_real_words_only():
    tm = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    at, as_ = stages(), stages()
    grads = jax.jit(jax.grad(lambda s: _losses.vl_attention_loss(at, s, tm)))(as_)
    for g in grads:
        g = np.asarray(g)
        assert np.all(g[0, :, 3:] == 0.0) and np.all(g[1, :, 2:] == 0.0)
        assert np.all(g[0, :, :3] != 0.0) and np.all(g[1, :, :2] != 0.0)


def test_vl_shape_errors():
    tm = np.ones((2, 5))
    with pytest.raises(ValueError, match="stage 0"):
        losses.vl_attention_loss(stages(), stages(hws=(8, 4, 1)), tm)
    with pytest.raises(ValueError, match="3 stages, student 2"):
        losses.vl_attention_loss(stages(), stages()[:2], tm)


# --- L_C -----------------------------------------------------------------------------------


def test_channel_correlation_hand_computed():
    d = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)  # [B=1, HW=2, C=2]
    np.testing.assert_allclose(losses.channel_correlation(d), [0.5 * np.eye(2)])
    d_l2 = np.array([[[3.0, 0.0], [4.0, 1.0]]], np.float32)  # columns (3,4)/5 and (0,1)
    np.testing.assert_allclose(
        losses.channel_correlation(d_l2, "l2"), [[[1.0, 0.8], [0.8, 1.0]]], rtol=1e-6
    )


def test_channel_loss_hand_computed():
    dt = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)  # A_c = 0.5 I
    ds = np.array([[[1.0, 0.0], [1.0, 0.0]]], np.float32)  # A_c = [[1, 0], [0, 0]]
    assert float(losses.channel_loss(dt, ds)) == pytest.approx((0.25 + 0.25) / 4)


@pytest.mark.parametrize("norm", ["hw", "l2"])
def test_channel_loss_matches_numpy(norm):
    dt, ds = rand(3, 20, 6), rand(3, 20, 6)
    np.testing.assert_allclose(losses.channel_loss(dt, ds, norm), np_channel(dt, ds, norm), **TOL)
    assert float(losses.channel_loss(dt, dt, norm)) < 1e-12  # exactly 0 up to XLA reassociation
    # [B, H, W, C] is read as [B, HW, C].
    np.testing.assert_allclose(
        losses.channel_loss(dt.reshape(3, 4, 5, 6), ds.reshape(3, 4, 5, 6), norm),
        losses.channel_loss(dt, ds, norm),
        rtol=1e-6,
    )


def test_channel_norms_properties():
    dt, ds = rand(2, 12, 4), rand(2, 12, 4)
    # 'hw': the same content at twice the resolution gives the same loss.
    np.testing.assert_allclose(
        losses.channel_loss(np.tile(dt, (1, 2, 1)), np.tile(ds, (1, 2, 1))),
        losses.channel_loss(dt, ds),
        rtol=1e-5,
    )
    # 'l2': scaling a student channel by a positive factor changes nothing.
    ds2 = ds.copy()
    ds2[..., 1] *= 7.0
    np.testing.assert_allclose(
        losses.channel_loss(dt, ds2, "l2"), losses.channel_loss(dt, ds, "l2"), rtol=1e-5
    )
    # A dead (all-zero) channel keeps 'l2' finite, gradients included.
    ds2[..., 2] = 0.0
    g = jax.jit(jax.grad(lambda s: _losses.channel_loss(dt, s, "l2")))(ds2)
    assert np.isfinite(float(losses.channel_loss(dt, ds2, "l2"))) and np.all(np.isfinite(g))
    with pytest.raises(ValueError, match="channel_norm='max'"):
        losses.channel_loss(dt, ds, "max")


@pytest.mark.parametrize("norm", ["hw", "l2"])
def test_channel_loss_gradient_reaches_student(norm):
    dt, ds = rand(2, 9, 4), rand(2, 9, 4)
    g = np.asarray(jax.jit(jax.grad(lambda s: _losses.channel_loss(dt, s, norm)))(ds))
    assert np.abs(g).sum() > 0 and np.count_nonzero(g) == g.size


# --- baselines -----------------------------------------------------------------------------


def test_logit_kd_hand_and_numpy():
    t = np.zeros((1, 1, 1, 2), np.float32)  # p_t = (1/2, 1/2)
    s = np.array([[[[0.0, math.log(3.0)]]]], np.float32)  # p_s = (1/4, 3/4)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(losses.logit_kd_loss(t, s)) == pytest.approx(expected, rel=1e-6)
    # T = 2 on logits doubled is the same distribution pair, scaled by T^2.
    assert float(losses.logit_kd_loss(2 * t, 2 * s, temperature=2.0)) == pytest.approx(
        4 * expected, rel=1e-6
    )
    t, s = rand(2, 5, 5, 2), rand(2, 5, 5, 2)
    for temp in (1.0, 4.0):
        np.testing.assert_allclose(losses.logit_kd_loss(t, s, temp), np_logit_kd(t, s, temp), **TOL)
    assert abs(float(losses.logit_kd_loss(t, t, 3.0))) < 1e-7


def test_pairwise_similarity_hand_and_numpy():
    # Two nodes, no pooling: teacher orthogonal (sim = I), student parallel (sim = all ones).
    ft = np.array([[[[1.0, 0.0], [0.0, 1.0]]]], np.float32)  # [1, 1, 2, 2]
    fs = np.array([[[[1.0, 0.0], [2.0, 0.0]]]], np.float32)
    assert float(losses.pairwise_similarity_loss(ft, fs, pool_scale=None)) == pytest.approx(0.5)
    # Teacher and student may differ in C; pooled grids divisible or not (ceil mode).
    for (h, w), scale in (((5, 7), 0.5), ((4, 4), 0.25), ((3, 2), None)):
        ft, fs = rand(2, h, w, 6), rand(2, h, w, 3)
        np.testing.assert_allclose(
            losses.pairwise_similarity_loss(ft, fs, scale), np_skd(ft, fs, scale), **TOL
        )


def test_cwd_hand_and_numpy():
    # One channel over two positions: p_t = (1/2, 1/2), p_s = (1/4, 3/4) at tau 1.
    t = np.zeros((1, 2, 1), np.float32)
    s = np.array([[[0.0], [math.log(3.0)]]], np.float32)
    kl = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    assert float(losses.cwd_loss(t, s, tau=1.0)) == pytest.approx(kl, rel=1e-6)
    assert float(losses.cwd_loss(4 * t, 4 * s, tau=4.0)) == pytest.approx(16 * kl, rel=1e-6)
    t, s = rand(2, 3, 4, 5), rand(2, 3, 4, 5)
    np.testing.assert_allclose(losses.cwd_loss(t, s, 4.0), np_cwd(t, s, 4.0), **TOL)
    np.testing.assert_allclose(losses.cwd_loss(t, s, 1.0), np_cwd(t, s, 1.0), **TOL)


def test_ickd_hand_and_numpy():
    dt = np.array([[[1.0, 0.0], [0.0, 2.0]]], np.float32)  # Gram diag(1, 4) -> rows I
    ds = np.array([[[1.0, 1.0], [1.0, 1.0]]], np.float32)  # Gram all 2 -> rows (1, 1)/sqrt 2
    expected = 2 * ((1 - 2**-0.5) ** 2 + 0.5) / 2  # two rows, divided by C = 2
    assert float(losses.ickd_loss(dt, ds)) == pytest.approx(expected, rel=1e-6)
    dt, ds = rand(3, 10, 4), rand(3, 10, 4)
    np.testing.assert_allclose(losses.ickd_loss(dt, ds), np_ickd(dt, ds), **TOL)
    assert float(losses.ickd_loss(dt, dt)) < 1e-12


# --- Eq. (9) and the method switch ---------------------------------------------------------

B, L, HW_GRID = 2, 4, (4, 4)


def model_out(seed):
    r = np.random.default_rng(seed)
    h, w = HW_GRID
    return {
        "logits": jnp.asarray(r.normal(size=(B, h, w, 2)), jnp.float32),
        "vl_attention": [jnp.asarray(r.uniform(size=(B, hw, L)), jnp.float32) for hw in (4, 2, 1)],
        "decoder": jnp.asarray(r.normal(size=(B, h * w, 8)), jnp.float32),
    }


BATCH = {
    "mask": jnp.asarray(RNG.integers(0, 2, size=(B, 16, 16)), jnp.int32),
    "token_mask": jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0]], jnp.int32),
}


def distill_cfg(**kw):
    c = ml_collections.ConfigDict()
    c.method = "vl_channel"
    c.lambda_vl = 0.5
    c.lambda_channel = 0.5
    c.channel_norm = "hw"
    c.kd_temperature = 1.0
    c.kd_weight = 10.0
    c.skd_weight = 1.0
    c.cwd_tau = 4.0
    c.cwd_weight = 3.0
    c.ickd_weight = 2.5
    c.update(kw)
    return c


def test_rkd_total_is_eq9():
    t, s = model_out(1), model_out(2)
    terms = losses.distillation_losses(t, s, BATCH, distill_cfg(lambda_vl=0.3, lambda_channel=2))
    assert set(terms) == {"loss_seg", "loss_vl", "loss_channel", "loss"}
    seg = np_seg_ce(np.asarray(s["logits"]), np.asarray(BATCH["mask"]))
    vl = np_vl(
        [np.asarray(a) for a in t["vl_attention"]],
        [np.asarray(a) for a in s["vl_attention"]],
        np.asarray(BATCH["token_mask"]),
    )
    ch = np_channel(np.asarray(t["decoder"]), np.asarray(s["decoder"]), "hw")
    np.testing.assert_allclose(terms["loss_seg"], seg, **TOL)
    np.testing.assert_allclose(terms["loss_vl"], vl, **TOL)
    np.testing.assert_allclose(terms["loss_channel"], ch, **TOL)
    np.testing.assert_allclose(terms["loss"], seg + 0.3 * vl + 2 * ch, **TOL)
    l2 = losses.distillation_losses(t, s, BATCH, distill_cfg(channel_norm="l2"))
    np.testing.assert_allclose(
        l2["loss_channel"],
        np_channel(np.asarray(t["decoder"]), np.asarray(s["decoder"]), "l2"),
        **TOL,
    )


def test_ablations_skip_the_zeroed_term():
    t, s = model_out(1), model_out(2)
    # With a lambda at 0 its inputs are never read: outputs without them still work.
    no_dec = ({k: v for k, v in t.items() if k != "decoder"}, s)
    terms = losses.distillation_losses(*no_dec, BATCH, distill_cfg(lambda_channel=0.0))
    assert float(terms["loss_channel"]) == 0.0 and float(terms["loss_vl"]) > 0
    np.testing.assert_allclose(terms["loss"], terms["loss_seg"] + 0.5 * terms["loss_vl"], **TOL)
    no_vl = ({k: v for k, v in t.items() if k != "vl_attention"}, s)
    terms = losses.distillation_losses(*no_vl, BATCH, distill_cfg(lambda_vl=0.0))
    assert float(terms["loss_vl"]) == 0.0 and float(terms["loss_channel"]) > 0
    with pytest.raises(ValueError, match="teacher output has no 'decoder'"):
        losses.distillation_losses(*no_dec, BATCH, distill_cfg())


@pytest.mark.parametrize(
    "method,key,weight_field,fn",
    [
        ("logit_kd", "loss_kd", "kd_weight", lambda t, s: np_logit_kd(t["logits"], s["logits"], 1)),
        (
            "skd",
            "loss_skd",
            "skd_weight",
            lambda t, s: np_skd(
                np.asarray(t["decoder"]).reshape(B, 4, 4, 8),
                np.asarray(s["decoder"]).reshape(B, 4, 4, 8),
                0.5,
            ),
        ),
        ("cwd", "loss_cwd", "cwd_weight", lambda t, s: np_cwd(t["logits"], s["logits"], 4.0)),
        ("ickd", "loss_ickd", "ickd_weight", lambda t, s: np_ickd(t["decoder"], s["decoder"])),
    ],
)
def test_baseline_methods(method, key, weight_field, fn):
    t, s = model_out(3), model_out(4)
    cfg = distill_cfg(method=method)
    terms = losses.distillation_losses(t, s, BATCH, cfg)
    assert set(terms) == {"loss_seg", key, "loss"}
    ref = fn(
        {k: np.asarray(v) if k != "vl_attention" else v for k, v in t.items()},
        {k: np.asarray(v) if k != "vl_attention" else v for k, v in s.items()},
    )
    np.testing.assert_allclose(terms[key], ref, **TOL)
    np.testing.assert_allclose(
        terms["loss"], terms["loss_seg"] + cfg[weight_field] * terms[key], **TOL
    )


def test_none_method_and_supervised():
    t, s = model_out(1), model_out(2)
    terms = losses.distillation_losses(t, s, BATCH, distill_cfg(method="none"))
    assert set(terms) == {"loss_seg", "loss"} and float(terms["loss"]) == float(terms["loss_seg"])
    sup = losses.supervised_losses(s, BATCH, distill_cfg())
    assert set(sup) == {"loss_seg", "loss"}
    assert float(sup["loss"]) == float(terms["loss_seg"])


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="method='fitnet'.*'vl_channel'.*'ickd'"):
        losses.distillation_losses(model_out(1), model_out(2), BATCH, distill_cfg(method="fitnet"))
    with pytest.raises(ValueError, match="lambda_vl=-1.0"):
        losses.distillation_losses(model_out(1), model_out(2), BATCH, distill_cfg(lambda_vl=-1.0))


def test_rkd_is_an_alias_of_the_papers_method_that_warns():
    """'rkd' means Park et al.'s relational KD elsewhere: it still runs the paper's loss here,
    with a warning that names the new method."""
    t, s = model_out(1), model_out(2)
    want = losses.distillation_losses(t, s, BATCH, distill_cfg())
    with pytest.warns(FutureWarning, match="'rkd' is an alias of 'vl_channel'"):
        got = losses.distillation_losses(t, s, BATCH, distill_cfg(method="rkd"))
    assert set(got) == set(want)
    for k in want:
        assert float(got[k]) == float(want[k])
    assert float(want["loss_vl"]) > 0 and float(want["loss_channel"]) > 0


def test_teacher_targets_pass_precomputed_values_through():
    """Targets computed once give exactly the losses of the raw teacher outputs."""
    t, s = model_out(1), model_out(2)
    for method in ("vl_channel", "logit_kd", "cwd", "skd", "ickd"):
        cfg = distill_cfg(method=method)
        targets = losses.teacher_targets(t, cfg)
        assert set(targets) == set(_losses.target_keys(cfg))
        a = losses.distillation_losses(t, s, BATCH, cfg)
        b = losses.distillation_losses(targets, s, BATCH, cfg)
        for k in a:
            assert float(a[k]) == float(b[k]), (method, k)
    assert _losses.target_keys(distill_cfg(lambda_vl=0.0)) == ("channel_correlation",)
    assert _losses.target_keys(distill_cfg(lambda_channel=0.0)) == ("vl_attention",)
    assert _losses.target_keys(distill_cfg(method="none")) == ()


def test_gradients_reach_student_not_teacher():
    t, s = model_out(5), model_out(6)
    cfg = distill_cfg()

    def total(t, s):
        return _losses.distillation_losses(t, s, BATCH, cfg)["loss"]

    g_t, g_s = jax.jit(jax.grad(total, argnums=(0, 1)))(t, s)
    assert all(float(jnp.abs(x).sum()) == 0.0 for x in jax.tree.leaves(g_t))
    for a in g_s["vl_attention"]:
        a = np.asarray(a)
        assert np.all(a[0, :, :3] != 0) and np.all(a[0, :, 3:] == 0) and np.all(a[1, :, 2:] == 0)
    assert np.count_nonzero(np.asarray(g_s["decoder"])) == g_s["decoder"].size
    assert float(jnp.abs(g_s["logits"]).sum()) > 0


def test_valid_mask_drops_padded_examples():
    t, s = model_out(7), model_out(8)
    batch = dict(BATCH, valid=jnp.asarray([1.0, 0.0]))
    terms = losses.distillation_losses(t, s, batch, distill_cfg())
    first = functools.partial(jax.tree.map, lambda x: x[:1])
    alone = losses.distillation_losses(first(t), first(s), first(BATCH), distill_cfg())
    for k in terms:
        np.testing.assert_allclose(terms[k], alone[k], rtol=1e-6, atol=1e-7)
