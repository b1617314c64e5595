"""Optimizer: schedule boundaries in steps, weight-decay mask, frozen sub-trees, clipping,
and one AdamW trajectory against torch.optim.AdamW."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from rkd_jax import optim


def train_cfg(**kw):
    c = ml_collections.ConfigDict()
    c.lr = 0.1
    c.lr_decay_epochs = (2, 4)
    c.lr_decay_factor = 0.1
    c.weight_decay = 0.01
    c.grad_clip_norm = 0.0
    c.warmup_steps = 0
    c.update(kw)
    return c


def lr_at(schedule, counts):
    return [float(schedule(c)) for c in counts]


def test_schedule_boundaries_in_steps():
    # 5 steps per epoch: boundaries at steps 10 and 20 (count = updates already applied).
    _, schedule = optim.make_optimizer(train_cfg(), steps_per_epoch=5)
    counts = [0, 9, 10, 11, 19, 20, 21, 1000]
    expected = [0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001, 0.001]
    np.testing.assert_allclose(lr_at(schedule, counts), expected, rtol=1e-6)
    # Traced counts inside jit give the same values.
    np.testing.assert_allclose(
        jax.jit(jax.vmap(schedule))(jnp.asarray(counts)), expected, rtol=1e-6
    )
    # The paper: 2e-5, x0.1 after epoch 20.
    _, paper = optim.make_optimizer(
        train_cfg(lr=2e-5, lr_decay_epochs=(20,)), steps_per_epoch=7_000
    )
    np.testing.assert_allclose(lr_at(paper, [139_999, 140_000]), [2e-5, 2e-6], rtol=1e-6)


def test_schedule_with_warmup():
    _, schedule = optim.make_optimizer(train_cfg(warmup_steps=4), steps_per_epoch=5)
    counts = [0, 1, 2, 3, 4, 5, 9, 10, 11, 20]
    expected = [0.0, 0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001]
    np.testing.assert_allclose(lr_at(schedule, counts), expected, rtol=1e-6, atol=1e-12)
    # A warmup longer than the first boundary: both factors apply, boundaries do not move.
    _, long = optim.make_optimizer(train_cfg(warmup_steps=15), steps_per_epoch=5)
    np.testing.assert_allclose(
        lr_at(long, [9, 10, 12, 15, 19, 20]),
        [0.1 * 9 / 15, 0.01 * 10 / 15, 0.01 * 12 / 15, 0.01, 0.01, 0.001],
        rtol=1e-6,
    )


def test_no_decay_epochs_is_constant():
    _, schedule = optim.make_optimizer(train_cfg(lr_decay_epochs=()), steps_per_epoch=3)
    np.testing.assert_allclose(lr_at(schedule, [0, 5, 500]), [0.1] * 3, rtol=1e-6)


@pytest.mark.parametrize(
    "kw,spe,match",
    [
        ({"lr_decay_epochs": (4, 2)}, 5, r"lr_decay_epochs=\(4, 2\)"),
        ({"lr_decay_epochs": (0,)}, 5, "lr_decay_epochs"),
        ({"warmup_steps": -1}, 5, "warmup_steps=-1"),
        ({"lr": 0.0}, 5, r"config.train.lr=0.0"),
        ({"grad_clip_norm": -1.0}, 5, "grad_clip_norm"),
        ({}, 0, "steps_per_epoch=0"),
    ],
)
def test_bad_config_is_one_clear_error(kw, spe, match):
    with pytest.raises(ValueError, match=match):
        optim.make_optimizer(train_cfg(**kw), steps_per_epoch=spe)


def test_weight_decay_must_be_given():
    cfg = train_cfg()
    del cfg["weight_decay"]
    with pytest.raises(ValueError, match="config.train.weight_decay is missing"):
        optim.make_optimizer(cfg, steps_per_epoch=5)


class Tiny(nn.Module):
    """One of each layer kind the decay rule must classify."""

    @nn.compact
    def __call__(self, image, ids):
        words = nn.Embed(11, 4, name="word_embeddings")(ids)
        pos = self.param("position_embedding", nn.initializers.normal(0.02), (3, 4))
        h = nn.Conv(4, (3, 3), name="conv")(image)
        h = nn.BatchNorm(use_running_average=False, name="bn")(h)
        h = nn.Dense(4, name="dense")(h.mean(axis=(1, 2)))
        h = nn.LayerNorm(name="ln")(h + words.mean(1) + pos.sum(0))
        return nn.DenseGeneral((2, 2), name="heads")(h)  # kernel [4, 2, 2], bias [2, 2]


@functools.cache
def tiny_params():
    init = jax.jit(Tiny().init)  # one compile instead of one per op
    return init(jax.random.key(0), jnp.zeros((1, 5, 5, 3)), jnp.zeros((1, 3), jnp.int32))["params"]


def test_decay_mask_rule():
    mask = optim.decay_mask(tiny_params())
    expected = {
        "word_embeddings": {"embedding": False},
        "position_embedding": False,
        "conv": {"kernel": True, "bias": False},
        "bn": {"scale": False, "bias": False},
        "dense": {"kernel": True, "bias": False},
        "ln": {"scale": False, "bias": False},
        "heads": {"kernel": True, "bias": False},
    }
    assert jax.tree.map(bool, mask) == expected


def test_weight_decay_applied_only_where_masked():
    params = tiny_params()
    lr, wd = 0.1, 0.01
    tx, _ = optim.make_optimizer(train_cfg(lr=lr, weight_decay=wd), steps_per_epoch=5)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zero_grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    mask = optim.decay_mask(params)
    for m, old, p in zip(jax.tree.leaves(mask), jax.tree.leaves(params), jax.tree.leaves(new)):
        if m:  # one AdamW step on a zero gradient shrinks a kernel by lr * wd
            np.testing.assert_allclose(p, old * (1 - lr * wd), rtol=1e-6, atol=1e-9)
            assert np.any(np.asarray(p) != np.asarray(old))
        else:
            np.testing.assert_array_equal(p, old)


def split_params():
    r = np.random.default_rng(1)
    arr = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)
    return {
        "text_encoder": {"layer_0": {"kernel": arr(4, 4), "bias": arr(4)}},
        "text_encoder_proj": {"kernel": arr(4, 3)},
        "visual": {"conv": {"kernel": arr(3, 3, 2, 2)}, "bn": {"scale": arr(2)}},
    }


@pytest.mark.parametrize(
    "frozen",
    [
        ("text_encoder",),
        # The predicate form, on the jax key path, as train.py writes it.
        lambda path: getattr(path[0], "key", None) == "text_encoder",
    ],
    ids=["prefixes", "predicate"],
)
def test_frozen_subtree_gets_zero_update_and_no_state(frozen):
    params = split_params()
    tx, _ = optim.make_optimizer(train_cfg(), steps_per_epoch=5, frozen=frozen)
    state = tx.init(params)
    trainable = sum(
        x.size for k, v in params.items() if k != "text_encoder" for x in jax.tree.leaves(v)
    )
    # Adam keeps mu and nu for trainable parameters only (plus scalar step counts).
    assert sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0) == 2 * trainable
    grads = jax.tree.map(jnp.ones_like, params)
    step = jax.jit(tx.update)
    for _ in range(2):
        updates, state = step(grads, state, params)
        params_new = optax.apply_updates(params, updates)
        assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates["text_encoder"]))
        for old, new in zip(
            jax.tree.leaves(params["text_encoder"]), jax.tree.leaves(params_new["text_encoder"])
        ):
            np.testing.assert_array_equal(new, old)
        # 'text_encoder' is a path prefix, not a string prefix: text_encoder_proj trains.
        for name in ("text_encoder_proj", "visual"):
            for old, new in zip(jax.tree.leaves(params[name]), jax.tree.leaves(params_new[name])):
                assert np.all(np.asarray(new) != np.asarray(old))
        params = params_new


def test_frozen_mask_and_bad_prefix():
    mask = optim.frozen_mask(split_params(), ("visual/bn",))
    assert mask["visual"] == {"conv": {"kernel": False}, "bn": {"scale": True}}
    assert mask["text_encoder"]["layer_0"] == {"kernel": False, "bias": False}
    with pytest.raises(ValueError, match="frozen prefix ''"):
        optim.make_optimizer(train_cfg(), steps_per_epoch=5, frozen=("",))
    with pytest.raises(TypeError, match="not one string"):
        optim.make_optimizer(train_cfg(), steps_per_epoch=5, frozen="text_encoder")


def test_grad_clipping_by_global_norm_over_trainable_params():
    params = {"a": jnp.zeros((4, 4)), "frozen": {"b": jnp.zeros((3,))}}
    tx, _ = optim.make_optimizer(train_cfg(grad_clip_norm=1.0), steps_per_epoch=5)
    grads = {"a": jnp.full((4, 4), 10.0), "frozen": {"b": jnp.zeros((3,))}}  # norm 40
    _, state = tx.update(grads, tx.init(params), params)
    # Adam's first moment after one step is (1 - b1) * (clipped gradient).
    mu = optax.tree.get(state, "mu")
    np.testing.assert_allclose(mu["a"], 0.1 * 10.0 / 40.0, rtol=1e-6)
    # Frozen gradients, however large, do not count towards the clipping norm.
    tx, _ = optim.make_optimizer(
        train_cfg(grad_clip_norm=1.0), steps_per_epoch=5, frozen=("frozen",)
    )
    grads = {"a": jnp.full((4, 4), 0.1), "frozen": {"b": jnp.full((3,), 1e6)}}  # a: norm 0.4
    _, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(optax.tree.get(state, "mu")["a"], 0.1 * 0.1, rtol=1e-6)


def test_adamw_matches_torch_adamw():
    import torch  # the test extra; reference only

    r = np.random.default_rng(2)
    kernel0, bias0 = r.normal(size=(3, 2)), r.normal(size=(2,))
    grads = [(r.normal(size=(3, 2)), r.normal(size=(2,))) for _ in range(4)]
    lr, wd = 0.05, 0.1

    # torch: weight decay on the kernel only, MultiStepLR stepped once per epoch (1 step each).
    k = torch.nn.Parameter(torch.tensor(kernel0, dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor(bias0, dtype=torch.float64))
    opt = torch.optim.AdamW(
        [{"params": [k], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}], lr=lr
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.1)
    for gk, gb in grads:
        k.grad, b.grad = torch.tensor(gk), torch.tensor(gb)
        opt.step()
        sched.step()

    params = {
        "dense": {
            "kernel": jnp.asarray(kernel0, jnp.float32),
            "bias": jnp.asarray(bias0, jnp.float32),
        }
    }
    tx, _ = optim.make_optimizer(
        train_cfg(lr=lr, weight_decay=wd, lr_decay_epochs=(2,)), steps_per_epoch=1
    )
    state, step = tx.init(params), jax.jit(tx.update)
    for gk, gb in grads:
        g = {
            "dense": {"kernel": jnp.asarray(gk, jnp.float32), "bias": jnp.asarray(gb, jnp.float32)}
        }
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params["dense"]["kernel"], k.detach().numpy(), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(params["dense"]["bias"], b.detach().numpy(), rtol=2e-5, atol=1e-6)


def test_backbone_lr_mult_trains_the_backbone_as_adamw_at_the_smaller_lr():
    r = np.random.default_rng(3)
    params = {
        "visual": {"conv": {"kernel": jnp.asarray(r.normal(size=(3, 3)), jnp.float32)}},
        "decoder": {"conv": {"kernel": jnp.asarray(r.normal(size=(3, 3)), jnp.float32)}},
    }
    grads = [
        jax.tree.map(lambda p: jnp.asarray(r.normal(size=p.shape), p.dtype), params)
        for _ in range(3)
    ]

    def run(cfg):
        tx, _ = optim.make_optimizer(cfg, steps_per_epoch=1)
        p, state = params, tx.init(params)
        for g in grads:
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
        return p, state

    scaled, _ = run(train_cfg(backbone_lr_mult=0.1))
    plain, plain_state = run(train_cfg())
    small_lr, _ = run(train_cfg(lr=0.01, backbone_lr_mult=1.0))
    # The backbone moves as AdamW at lr * 0.1 (weight decay included), the decoder at lr.
    np.testing.assert_allclose(
        scaled["visual"]["conv"]["kernel"], small_lr["visual"]["conv"]["kernel"], rtol=1e-6
    )
    np.testing.assert_allclose(
        scaled["decoder"]["conv"]["kernel"], plain["decoder"]["conv"]["kernel"], rtol=1e-6
    )
    assert not np.allclose(scaled["visual"]["conv"]["kernel"], plain["visual"]["conv"]["kernel"])
    # A multiplier of 1 adds nothing to the state: checkpoints from before still restore.
    _, one_state = run(train_cfg(backbone_lr_mult=1.0))
    adamw = optax.chain(
        optax.adamw(optax.constant_schedule(0.1), weight_decay=0.01, mask=optim.decay_mask)
    )
    assert jax.tree.structure(one_state) == jax.tree.structure(adamw.init(params))
    assert jax.tree.structure(plain_state) == jax.tree.structure(adamw.init(params))
    with pytest.raises(ValueError, match="backbone_lr_mult=0"):
        optim.make_optimizer(train_cfg(backbone_lr_mult=0), steps_per_epoch=1)
