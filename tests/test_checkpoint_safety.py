"""Checkpoints that stay usable: stray step directories, damaged files named, no non-finite
save, the architecture of a resumed run checked, the run-directory lock, metrics.jsonl rows."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

from rkd_jax import checkpoint as ckpt_lib
from rkd_jax.checkpoint import Checkpointer, CheckpointError, NonFiniteStateError


def small_state(scale: float = 1.0, width: int = 3) -> dict:
    return {
        "params": {"dense": {"kernel": jnp.full((2, width), scale), "bias": jnp.zeros(width)}},
        "batch_stats": {},
        "step": jnp.array(5, jnp.int32),
    }


def abstract(state):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)


def save_steps(directory, steps, **state_kwargs) -> Checkpointer:
    ckpt = Checkpointer(directory, keep=5)
    for step in steps:
        meta = {"role": "student", "config": {}, "model": {}}
        ckpt.save(step, small_state(float(step), **state_kwargs), {}, meta, {"val_mIoU": 0.1})
    return ckpt


def test_a_stray_empty_step_directory_is_left_out(tmp_path):
    save_steps(tmp_path / "checkpoints", [2, 4]).close()
    (tmp_path / "checkpoints" / "9").mkdir()  # an interrupted copy
    # Read-only users (load, eval, export) skip it and find the complete steps.
    directory, step = ckpt_lib.find_checkpoint(tmp_path)
    assert step in (2, 4) and directory == tmp_path / "checkpoints"
    reader = Checkpointer(tmp_path / "checkpoints", read_only=True)
    assert reader.all_steps() == [2, 4] and reader.latest_step() == 4
    assert reader.incomplete == {9: ["state/", "data/", "meta/", ckpt_lib.COMMIT_FILE]}
    reader.close()
    assert (tmp_path / "checkpoints" / "9").is_dir()  # read-only: nothing moved
    # A training run moves it aside (never deletes it), resumes from 4 and can save step 9.
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=5)
    assert ckpt.latest_step() == 4
    assert (tmp_path / "checkpoints" / "9.incomplete").is_dir()
    state, _, _ = ckpt.restore(4, abstract(small_state()))
    np.testing.assert_array_equal(state["params"]["dense"]["kernel"], np.full((2, 3), 4.0))
    ckpt.save(9, small_state(9.0), {}, {"role": "student"}, {"val_mIoU": 0.2})
    assert ckpt.latest_step() == 9
    ckpt.close()


def test_only_incomplete_steps_name_them(tmp_path):
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"no complete checkpoint.*checkpoints/3"):
        ckpt_lib.find_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"checkpoints/3: incomplete checkpoint \(lacks"):
        ckpt_lib.find_checkpoint(tmp_path / "checkpoints" / "3")


def test_damaged_files_are_named(tmp_path):
    save_steps(tmp_path / "checkpoints", [2]).close()
    meta = tmp_path / "checkpoints" / "2" / "meta" / "metadata"
    meta.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"checkpoints/2/meta/metadata: damaged checkpoint"):
        ckpt_lib.restore(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints")
    save_steps(tmp_path / "checkpoints", [2]).close()
    state_dir = tmp_path / "checkpoints" / "2" / "state"
    for f in state_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0" * 7)
    with pytest.raises(CheckpointError, match=r"checkpoints/2(/state)?: damaged or unreadable"):
        ckpt_lib.restore(tmp_path)


def test_a_non_finite_state_is_never_saved(tmp_path):
    ckpt = save_steps(tmp_path / "checkpoints", [2])
    bad = small_state()
    bad["params"]["dense"]["kernel"] = bad["params"]["dense"]["kernel"].at[1, 2].set(jnp.inf)
    with pytest.raises(
        NonFiniteStateError, match=r"step 4: not saved: .*dense.*kernel.*\(step 2\)"
    ):
        ckpt.save(4, bad, {}, {"role": "student"}, {"val_mIoU": 0.5})
    bad["params"]["dense"]["kernel"] = jnp.full((2, 3), jnp.nan)
    with pytest.raises(NonFiniteStateError):
        ckpt.save(6, bad, {}, {"role": "student"}, None)
    assert ckpt.all_steps() == [2]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
    ckpt.close()
    assert ckpt_lib.first_non_finite(small_state()) is None


def test_non_finite_found_in_replicated_and_sharded_arrays():
    """Replicated arrays are checked on the host (one local copy), arrays sharded over the
    devices in a jitted reduction: both name the first bad leaf."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("data",))
    n = len(jax.devices())
    rep = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, PartitionSpec("data"))
    ok = np.zeros((n, 3), np.float32)
    state = {
        "a": jax.device_put(ok, rep),
        "b": jax.device_put(ok, split),
        "c": jax.device_put(np.arange(n, dtype=np.int32), split),  # not floating point
    }
    assert ckpt_lib.first_non_finite(state) is None
    bad = ok.copy()
    bad[n - 1, 2] = np.nan  # on the last device only
    assert ckpt_lib.first_non_finite({**state, "b": jax.device_put(bad, split)}) == "['b']"
    bad[n - 1, 2] = -np.inf
    assert ckpt_lib.first_non_finite({**state, "a": jax.device_put(bad, rep)}) == "['a']"
    assert ckpt_lib.first_non_finite({"h": bad}) == "['h']"  # a host array


def test_resume_with_another_architecture_names_the_parameter(tmp_path):
    ckpt = save_steps(tmp_path / "checkpoints", [2])
    with pytest.raises(
        CheckpointError, match=r"another architecture.*params/dense/bias has shape \(3,\).*\(5,\)"
    ):
        ckpt.restore(2, abstract(small_state(width=5)))
    wider = small_state()
    wider["params"]["extra"] = {"kernel": jnp.zeros(4)}
    with pytest.raises(CheckpointError, match=r"another architecture.*lacks params/extra/kernel"):
        ckpt.restore(2, abstract(wider))
    ckpt.close()


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in (2, 4, 6, 8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ckpt_lib.truncate_metrics(path, 4) == 2
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [2, 4]
    assert ckpt_lib.truncate_metrics(path, 4) == 0
    assert ckpt_lib.truncate_metrics(tmp_path / "absent.jsonl", 0) == 0


HOLDER = textwrap.dedent(
    """
    import sys, time
    from rkd_jax.checkpoint import RunLock
    lock = RunLock(sys.argv[1])
    lock.acquire()
    print("held", flush=True)
    time.sleep(120)
    """
)


def test_run_lock_names_the_live_holder_and_takes_over_a_stale_one(tmp_path, caplog):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ckpt_lib.RunBusyError, match=rf"in use by pid {holder.pid} on "):
            ckpt_lib.RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the killed holder's lock: its file is stale and taken over.
    assert f"pid {holder.pid}" in (tmp_path / ".lock").read_text()
    with ckpt_lib.RunLock(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()
    assert f"lock of pid {holder.pid}" in caplog.text
    # Released: a later run takes it without a word about a previous holder.
    caplog.clear()
    with ckpt_lib.RunLock(tmp_path):
        pass
    assert "taking over" not in caplog.text
