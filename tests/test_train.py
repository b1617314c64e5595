"""The jitted steps, sharding, multi-process equality, resume after SIGKILL, entry point."""

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, one_device, tiny_config
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rkd_jax import pretrained, steps, train
from rkd_jax.models import build
from rkd_jax.optim import make_optimizer

# Each test compiles a train step of the tiny models or trains them (tens of seconds each).
pytestmark = pytest.mark.slow


def random_batch(config, batch: int = 8, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    s, t = config.data.image_size, config.data.max_tokens
    tokens = rng.integers(1000, 3000, size=(batch, t)).astype(np.int32)
    lengths = rng.integers(3, t + 1, size=batch)
    token_mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    tokens[:, 0] = 101
    tokens = np.where(token_mask > 0, tokens, 0).astype(np.int32)
    return {
        "image": rng.random((batch, s, s, 3), dtype=np.float32),
        "mask": (rng.random((batch, s, s)) > 0.7).astype(np.int32),
        "tokens": tokens,
        "token_mask": token_mask,
        "sentence_id": np.arange(batch, dtype=np.int32),
    }


_INITIAL_VARIABLES: dict = {}


def initial_variables(model_cfg, seed: int, size: int, length: int) -> dict:
    """build.init_variables of a model config, computed once per process and kept on the host:
    every caller gets its own device arrays (the train step donates the state it is given)."""
    key = (json.dumps(model_cfg.to_dict(), sort_keys=True, default=list), seed, size, length)
    if key not in _INITIAL_VARIABLES:
        model = build.build_model(model_cfg)
        variables = pretrained.init_variables(model, model_cfg, build.make_key(seed), size, length)
        _INITIAL_VARIABLES[key] = jax.tree.map(np.asarray, variables)
    return jax.tree.map(jnp.asarray, _INITIAL_VARIABLES[key])


def setup_models(config, mode="distill", tx=None):
    student = build.build_model(config.student)
    teacher = build.build_model(config.teacher)
    size, length = config.data.image_size, config.data.max_tokens
    s_vars = initial_variables(config.student, 1, size, length)
    t_vars = initial_variables(config.teacher, 2, size, length)
    if tx is None:
        tx, _ = make_optimizer(config.train, 10, frozen=steps.text_frozen)
    state = steps.TrainState(
        jnp.zeros((), jnp.int32), s_vars["params"], s_vars["batch_stats"], tx.init(s_vars["params"])
    )
    step = steps.make_train_step(config, mode, tx, student, teacher if mode == "distill" else None)
    return step, state, t_vars


@pytest.fixture(scope="module")
def tiny_models():
    config = tiny_config()
    return config, setup_models(config)


def count_convs(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            n += 1
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += count_convs(inner)
    return n


def test_distill_step_leaves_teacher_untouched_and_never_differentiates_it(tiny_models):
    config, (step, state, t_vars) = tiny_models
    batch = random_batch(config)
    tables = {"student": None, "teacher": None}
    before = jax.tree.map(np.array, t_vars)
    jaxpr_distill = jax.make_jaxpr(step)(state, batch, t_vars, tables).jaxpr
    _, metrics = step(jax.tree.map(jnp.copy, state), batch, t_vars, tables)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, t_vars))
    assert set(metrics) >= {"loss", "loss_seg", "loss_vl", "loss_channel", "grad_norm"}
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["loss_vl"]) > 0 and float(metrics["loss_channel"]) > 0

    # Convolutions in the distill step = the student's forward and backward (as in the
    # student-only step) + the teacher's forward, exactly: a teacher backward would add more.
    s_step, s_state, _ = setup_models(config, mode="student")
    jaxpr_student = jax.make_jaxpr(s_step)(s_state, batch, t_vars, tables).jaxpr
    teacher = build.build_model(config.teacher)
    jaxpr_teacher = jax.make_jaxpr(
        lambda v, b: teacher.apply(v, b["image"], b["tokens"], b["token_mask"])
    )(t_vars, batch).jaxpr
    assert count_convs(jaxpr_teacher) > 10
    assert count_convs(jaxpr_distill) == count_convs(jaxpr_student) + count_convs(jaxpr_teacher)


def test_distillation_gradients_reach_student_fusion_and_fpn(tiny_models):
    config, (step, state, t_vars) = tiny_models
    batch = random_batch(config, seed=3)
    tables = {"student": None, "teacher": None}
    new_state, _ = step(jax.tree.map(jnp.copy, state), batch, t_vars, tables)
    moved = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params, new_state.params
    )
    for name in ("fusion_v3", "fusion_v4", "fusion_v5", "decoder", "visual"):
        assert max(jax.tree.leaves(moved[name])) > 0, name
    # the frozen text encoder does not move
    assert max(jax.tree.leaves(moved["text_encoder"])) == 0


def test_sharded_step_equals_single_device_step(tiny_models):
    """A batch split over 4 devices gives the single-device result (rtol 1e-4: only the
    order of floating-point reductions differs). Plain SGD, so that the parameters show the
    gradients: Adam's first step is lr * sign(g) and would magnify rounding near g = 0."""
    import optax

    config, _ = tiny_models
    step, state, t_vars = setup_models(config, tx=optax.sgd(0.1))
    batch = random_batch(config, seed=5)
    tables = {"student": None, "teacher": None}
    results = []
    for n in (1, 4):
        mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
        rep = NamedSharding(mesh, P())
        b = {k: jax.device_put(v, NamedSharding(mesh, P("data"))) for k, v in batch.items()}
        s = jax.device_put(jax.tree.map(jnp.copy, state), rep)
        tv = jax.device_put(t_vars, rep)
        new_state, metrics = step(s, b, tv, tables)
        results.append((jax.tree.map(np.asarray, new_state), float(metrics["loss"])))
    (a, loss_a), (b, loss_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a.params, b.params
    )
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
        a.batch_stats,
        b.batch_stats,
    )


WORKER = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import jax
    pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                                   num_processes=nproc, process_id=pid)
    sys.path.insert(0, os.environ["RKD_TESTS_DIR"])
    import jax.numpy as jnp
    from conftest import tiny_config
    import pickle, test_train
    from test_train import random_batch, setup_models
    from rkd_jax import parallel
    # The models' initial variables, computed once by the test process (initial_variables).
    with open(os.environ["RKD_TEST_INITIAL_VARIABLES"], "rb") as f:
        test_train._INITIAL_VARIABLES.update(pickle.load(f))
    config = tiny_config()
    step, state, t_vars = setup_models(config)
    mesh = parallel.make_mesh()
    state = parallel.replicate(state, mesh)
    t_vars = parallel.replicate(t_vars, mesh)
    tables = {"student": None, "teacher": None}
    for i in range(3):
        glob = random_batch(config, batch=8, seed=10 + i)
        rows = 8 // nproc
        local = {k: v[pid * rows:(pid + 1) * rows] for k, v in glob.items()}
        state, metrics = step(state, parallel.put_batch(local, mesh), t_vars, tables)
    leaves = [np.asarray(jax.device_get(x.addressable_shards[0].data))
              for x in jax.tree.leaves(state.params)]
    if pid == 0:
        np.savez(out, *leaves)
    print("done", pid, float(metrics["loss"]))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
    """jax.distributed on CPU (gloo): 2 processes x 1 device, 3 distill steps, each process
    feeding its half of the global batch -> the parameters of 1 process x 2 devices."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    # The three processes start from the same initial variables, computed here once by
    # setup_models (jitted model.init of the teacher and the student: ~14 s of CPU per process on
    # the 2-core machine).
    setup_models(tiny_config())
    (tmp_path / "init.pickle").write_bytes(pickle.dumps(_INITIAL_VARIABLES))
    env = dict(
        os.environ,
        RKD_TEST_INITIAL_VARIABLES=str(tmp_path / "init.pickle"),
        RKD_TESTS_DIR=str(ROOT / "tests"),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=1 "
        + " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f),
    )
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), "2", str(port), str(tmp_path / "two.npz")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    env_one = dict(env, XLA_FLAGS=env["XLA_FLAGS"].replace("device_count=1", "device_count=2"))
    one = subprocess.run(
        [sys.executable, str(script), "0", "1", "0", str(tmp_path / "one.npz")],
        env=env_one,
        capture_output=True,
        check=False,
        text=True,
        timeout=600,
    )
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert one.returncode == 0, one.stdout + one.stderr
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert len(a.files) == len(b.files) > 50
    for k in a.files:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from orbax.checkpoint._src.path import atomicity
    target = int(os.environ["RKD_TEST_KILL_AT_SAVE"])
    calls = {"n": 0}
    orig = atomicity.AtomicRenameTemporaryPath.finalize
    async def finalize(self, *a, **k):
        if f"/{target}." in str(self.get()) or str(self.get()).rstrip("/").endswith(f"/{target}"):
            os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of saving `target`
        return await orig(self, *a, **k)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    from absl import app
    from rkd_jax import main
    app.run(lambda argv: sys.exit(main.main(argv)))
    """
)


def _params(run_dir: Path):
    from rkd_jax.checkpoint import Checkpointer

    c = Checkpointer(run_dir / "checkpoints", read_only=True)
    step = c.latest_step()
    c.close()
    from rkd_jax.checkpoint import restore

    _, variables, _ = restore(run_dir / "checkpoints" / str(step))
    return step, variables


def test_sigkill_during_save_then_resume_equals_uninterrupted(tmp_path):
    """Teacher mode, 6 steps, checkpoints every 2: the process is SIGKILLed while saving
    step 4; the same command resumes from step 2 and ends with the parameters of an
    uninterrupted run (bit-identical on CPU)."""
    overrides = [
        "--config.run.max_steps=6",
        "--config.run.checkpoint_every_steps=2",
        "--config.run.max_eval_examples=8",
        "--config.data.eval_splits=('val',)",
    ]
    cmd = ["--config", str(ROOT / "configs" / "teacher.py") + ":tiny"] + overrides
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    # One device, as a laptop runs it: the 8 fake devices would run the replicated parts of the
    # step (and the model's initialisation) 8 times over; sharding is tested above.
    env = one_device(dict(os.environ, JAX_PLATFORMS="cpu"))
    killed = subprocess.run(
        [sys.executable, str(killer), *cmd, "--workdir", str(tmp_path / "b")],
        env=dict(env, RKD_TEST_KILL_AT_SAVE="4"),
        capture_output=True,
        check=False,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    steps = sorted(
        int(p.name) for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.isdigit()
    )
    assert steps == [2]  # step 4 never completed

    # The uninterrupted run (a) and the resume of the killed one (b): the same command line.
    for workdir in ("a", "b"):
        run = subprocess.run(
            [sys.executable, "-m", "rkd_jax.main", *cmd, "--workdir", str(tmp_path / workdir)],
            env=env,
            capture_output=True,
            check=False,
            text=True,
            timeout=900,
            cwd=ROOT,
        )
        assert run.returncode == 0, run.stderr[-3000:]
    step_a, va = _params(tmp_path / "a")
    step_b, vb = _params(tmp_path / "b")
    assert step_a == step_b == 6
    jax.tree.map(np.testing.assert_array_equal, va, vb)
    log_b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").open()]
    assert log_b[0]["step"] == 2 and log_b[-1]["step"] == 6
    # Step 4 was logged before the kill and again after the resume: it is in the file once.
    assert [r["step"] for r in log_b] == [2, 4, 6]


def test_entry_point_all_modes_and_results(tiny_run):
    """The tiny distill run (fixture): teacher trained first in its own subdirectory, the
    student distilled, every eval split scored with the protocol written down."""
    assert (tiny_run / "teacher" / "checkpoints").is_dir()
    for split in ("val", "testA", "testB"):
        res = json.loads((tiny_run / "results" / f"refcoco_{split}.json").read_text())
        for resolution in ("network", "original"):
            m = res["metrics"][resolution]
            assert 0.0 <= m["mIoU"] <= 1.0 and 0.0 <= m["oIoU"] <= 1.0
            assert {"P@0.5", "P@0.9"} <= set(m)
        assert res["protocol"]["split"] == split
        assert res["role"] == "student"
    log = [json.loads(line) for line in (tiny_run / "metrics.jsonl").open()]
    assert {"loss_vl", "loss_channel", "lr", "images_per_s", "grad_norm"} <= set(log[-1])
    assert any("val_mIoU" in entry for entry in log)
    assert list((tiny_run / "tensorboard").iterdir())


def test_teacher_checkpoint_of_another_architecture_is_refused(tiny_run, tmp_path):
    config = tiny_config()
    config.teacher_checkpoint = str(tiny_run)  # the student run, not a teacher
    # Its meta records the role: refused before its shapes are compared.
    with pytest.raises(ValueError, match=r"holds the student model .*expected the teacher"):
        train.train_and_evaluate(config, tmp_path)


def test_nan_loss_stops_with_step_and_term(tmp_path):
    config = tiny_config(max_steps=4, log_every_steps=1)
    config.mode = "teacher"
    config.teacher_train.lr = 1e30  # diverges at once
    with pytest.raises(FloatingPointError, match=r"step \d+: (loss|grad_norm)"):
        train.train_and_evaluate(config, tmp_path)


def test_ickd_step_trains_its_adapter_outside_the_student():
    config = tiny_config()
    config.distill.method = "ickd"
    tx, _ = make_optimizer(config.train, 10, frozen=steps.text_frozen)
    step, state, t_vars = setup_models(config, tx=tx)
    batch = random_batch(config, seed=5)
    tables = {"student": None, "teacher": None}
    with pytest.raises(ValueError, match="init_aux"):
        step(state, batch, t_vars, tables)
    state = state.replace(aux=steps.init_aux(config, "distill", tx, build.make_key(3)))
    assert set(state.aux["params"]) == {"conv1x1", "bn"}
    new_state, metrics = step(jax.tree.map(jnp.copy, state), batch, t_vars, tables)
    assert np.isfinite(float(metrics["loss_ickd"])) and float(metrics["loss_ickd"]) > 0
    moved = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), state.aux["params"], new_state.aux["params"]
    )
    assert min(jax.tree.leaves(moved)) > 0  # the adapter trains (kernel, BN scale and bias)
    stats = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))),
        state.aux["batch_stats"],
        new_state.aux["batch_stats"],
    )
    assert min(jax.tree.leaves(stats)) > 0  # its BatchNorm statistics update
    assert "conv1x1" not in new_state.params and "bn" not in new_state.params
    # Without the adapter (ickd_adapter=False) the state has no aux and the loss differs.
    config.distill.ickd_adapter = False
    plain_step, plain_state, _ = setup_models(config, tx=tx)
    assert not steps.uses_adapter(config, "distill")
    assert steps.init_aux(config, "distill", tx, build.make_key(3)) is None
    _, plain = plain_step(plain_state, batch, t_vars, tables)
    assert float(plain["loss_ickd"]) != pytest.approx(float(metrics["loss_ickd"]))


def test_ickd_run_resumes_its_adapter_and_saves_only_the_student(tiny_run, tmp_path):
    from rkd_jax import checkpoint as ckpt_lib

    def run(workdir, max_steps):
        config = tiny_config(max_steps=max_steps, max_eval_examples=8, checkpoint_every_steps=2)
        config.distill.method = "ickd"
        config.teacher_checkpoint = str(tiny_run / "teacher")
        config.data.eval_splits = ("val",)
        train.train_and_evaluate(config, workdir)

    straight = tmp_path / "straight"
    run(straight, 4)  # checkpoints at steps 2 and 4
    # The same run stopped after its step-2 checkpoint: the directory without step 4 and the
    # results written at the end.
    split = tmp_path / "split"
    shutil.copytree(straight, split, ignore=shutil.ignore_patterns("4", "results", ".lock"))
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == ["2"]
    run(split, 4)  # resumes at step 2: student, optimizer, data order and adapter
    log = [json.loads(line) for line in (split / "metrics.jsonl").open()]
    assert [r["step"] for r in log if "loss_ickd" in r][-1] == 4
    _, a, _ = ckpt_lib.restore(straight / "checkpoints" / "4")
    _, b, _ = ckpt_lib.restore(split / "checkpoints" / "4")
    # Equal only if the resumed run restored the adapter instead of initialising a new one.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
    student = build.build_model(tiny_config().student)
    target = build.abstract_variables(
        student, tiny_config().data.image_size, tiny_config().data.max_tokens
    )
    assert set(a["params"]) == set(target["params"])  # no adapter in the student's variables
