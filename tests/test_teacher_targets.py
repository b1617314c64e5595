"""Cached teacher targets: the same losses and gradients as the teacher run in the step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from rkd_jax import losses, parallel, pretrained, steps, teacher_targets, text_features
from rkd_jax.data import pipeline, prepare
from rkd_jax.models import build
from rkd_jax.models.fold import fold_batch_norm
from rkd_jax.optim import make_optimizer

# Initialises and folds the tiny teacher, computes target tables, compiles a distill step twice.
pytestmark = pytest.mark.slow

# Tolerance: the cached path computes the same float32 operations on the same inputs, but in
# batches of run.eval_batch_size instead of the training batch, so XLA may order sums
# differently (measured: |diff| <= ~1e-6 relative here).
RTOL, ATOL = 2e-5, 1e-6
# One method per kind of target: A maps + A_c (the paper), logits (also CWD's), ICKD's Gram
# (SKD's decoder features pass through unchanged).
METHODS = {
    "vl_channel": {},
    "logit_kd": {},
    "ickd": {"ickd_adapter": False},
}


@pytest.fixture(scope="module")
def setting():
    config = tiny_config()
    prepare.ensure_prepared(config.data)
    mesh = parallel.make_mesh()
    size, length = config.data.image_size, config.data.max_tokens
    teacher = build.build_model(config.teacher)
    t_vars = pretrained.init_variables(teacher, config.teacher, build.make_key(2), size, length)
    # Random BatchNorm statistics, so the folded inference teacher is not the identity.
    t_vars["batch_stats"] = jax.tree.map(
        lambda x: x + 0.1 * jax.random.uniform(build.make_key(3), x.shape), t_vars["batch_stats"]
    )
    teacher, t_vars = fold_batch_norm(teacher, t_vars)
    student = build.build_model(config.student)
    s_vars = pretrained.init_variables(student, config.student, build.make_key(1), size, length)
    tokenize = text_features.make_tokenizer(config, ("student", "teacher"))
    return config, mesh, teacher, t_vars, student, s_vars, tokenize


def test_train_pairs_index_every_sentence_of_every_object(setting):
    config, *_ = setting
    offsets, sentence_ids = pipeline.train_pairs(config.data)
    n_objects = pipeline._builder(config.data).info.splits["train"].num_examples
    assert len(offsets) == n_objects + 1 and offsets[0] == 0
    assert offsets[-1] == len(sentence_ids) > n_objects  # several sentences per object
    tokenize = setting[-1]
    it = pipeline.make_train_iterator(config.data, tokenize, 8, seed=0, pair_offsets=offsets)
    for _ in range(3):
        batch = next(it)
        # The pair a row names is the (object, sentence) the row holds.
        np.testing.assert_array_equal(sentence_ids[batch["pair_id"]], batch["sentence_id"])
        assert np.all(batch["pair_id"] < offsets[-1])
    it.close()


@pytest.fixture(scope="module")
def outputs(setting):
    """One train batch and what both models give on it: the method decides only the targets."""
    config, _, teacher, t_vars, student, s_vars, tokenize = setting
    offsets, _ = pipeline.train_pairs(config.data)
    it = pipeline.make_train_iterator(config.data, tokenize, 8, seed=3, pair_offsets=offsets)
    batch = next(it)
    it.close()
    args = batch["image"], batch["tokens"], batch["token_mask"]
    online = jax.jit(lambda v, *a: teacher.apply(v, *a, train=False))(t_vars, *args)
    student_out = jax.jit(lambda v, *a: student.apply(v, *a, train=False))(s_vars, *args)
    return batch, online, student_out


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cached_targets_give_the_online_teachers_losses_and_gradients(setting, outputs, method):
    """The losses and their gradients with respect to everything the student outputs are the
    same with the cached targets as with the online teacher's outputs. The gradients with
    respect to the student's parameters are these times the student's own Jacobian, the same in
    both cases (the train step with the cached table: the test below)."""
    config, mesh, teacher, t_vars, _, _, tokenize = setting
    batch, online, student_out = outputs
    config = config.copy_and_resolve_references()
    config.distill.method = method
    config.distill.update(METHODS[method])
    with parallel.set_mesh(mesh):
        table, offsets, hit = teacher_targets.compute_table(
            config, teacher, config.teacher, t_vars, tokenize, None, mesh
        )
    assert not hit
    np.testing.assert_array_equal(offsets, pipeline.train_pairs(config.data)[0])
    assert set(teacher_targets.unflatten(dict(table))) == set(losses.target_keys(config.distill))

    @jax.jit
    @functools.partial(jax.value_and_grad, has_aux=True)
    def loss(student_out, teacher_out):
        terms = losses.distillation_losses(teacher_out, student_out, batch, config.distill)
        return terms["loss"], terms

    cached = teacher_targets.lookup(table, jnp.asarray(batch["pair_id"]))
    (_, t_on), g_on = loss(student_out, online)
    (_, t_ca), g_ca = loss(student_out, cached)
    assert float(t_on["loss"]) > float(t_on["loss_seg"])  # the distillation term is live
    for key in t_on:
        np.testing.assert_allclose(float(t_ca[key]), float(t_on[key]), rtol=RTOL, atol=ATOL)
    flat_on = jax.tree_util.tree_leaves_with_path(g_on)
    flat_ca = dict(jax.tree_util.tree_leaves_with_path(g_ca))
    assert sum(float(jnp.abs(g).sum()) for _, g in flat_on) > 0
    for path, g in flat_on:
        # A gradient per output element is a small part of a parameter's (a sum over many
        # pixels): the absolute tolerance is relative to the output's largest gradient
        # (measured: differences <= 6e-7 of it).
        atol = RTOL * float(jnp.abs(g).max())
        np.testing.assert_allclose(flat_ca[path], g, rtol=RTOL, atol=atol, err_msg=str(path))


def test_train_step_with_cached_targets_equals_the_step_with_the_teacher(setting):
    config, mesh, teacher, t_vars, student, s_vars, tokenize = setting
    with parallel.set_mesh(mesh):
        table, offsets, _ = teacher_targets.compute_table(
            config, teacher, config.teacher, t_vars, tokenize, None, mesh
        )
        tx, _ = make_optimizer(config.train, 10, frozen=steps.text_frozen)
        step = steps.make_train_step(config, "distill", tx, student, teacher)
        it = pipeline.make_train_iterator(config.data, tokenize, 8, seed=0, pair_offsets=offsets)
        batches = [parallel.put_batch(next(it), mesh) for _ in range(2)]
        it.close()
        results = []
        for targets in (None, table):
            # A fresh copy each time: the step donates (deletes) the state it is given.
            fresh = jax.tree.map(np.array, (s_vars["params"], s_vars["batch_stats"]))
            state = parallel.replicate(
                steps.TrainState(jnp.zeros((), jnp.int32), *fresh, tx.init(fresh[0])), mesh
            )
            tables = {"student": None, "teacher": None, "targets": targets}
            for b in batches:
                state, metrics = step(state, b, t_vars, tables)
            results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (p_on, m_on), (p_ca, m_ca) = results
    for key in m_on:
        np.testing.assert_allclose(m_ca[key], m_on[key], rtol=1e-4, atol=1e-6, err_msg=key)
    # Adam divides by sqrt(v): on parameters whose gradient is ~0 a 1e-9 difference can move
    # the update by a good part of lr (1e-3); 1e-4 absolute over two steps bounds that.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), p_ca, p_on)
