"""The on-disk cache of frozen text features: keys, round trips, bad files, and runs that
read it train exactly as runs that compute the features themselves."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from rkd_jax import feature_cache, train
from rkd_jax.checkpoint import restore


def test_fingerprint_changes_with_every_input():
    w = {"layer": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    tokens = np.array([[101, 7, 102]], np.int32)
    base = feature_cache.fingerprint(w, {"layers": 4}, tokens, "float32")
    assert base == feature_cache.fingerprint(
        {"layer": {"kernel": w["layer"]["kernel"].copy()}}, {"layers": 4}, tokens.copy(), "float32"
    )
    changed_weight = {"layer": {"kernel": w["layer"]["kernel"] + np.float32(1e-7)}}
    others = [
        feature_cache.fingerprint(changed_weight, {"layers": 4}, tokens, "float32"),
        feature_cache.fingerprint({"other": w["layer"]}, {"layers": 4}, tokens, "float32"),
        feature_cache.fingerprint(
            {"layer": {"kernel": w["layer"]["kernel"].reshape(3, 2)}},
            {"layers": 4},
            tokens,
            "float32",
        ),
        feature_cache.fingerprint(w, {"layers": 2}, tokens, "float32"),
        feature_cache.fingerprint(w, {"layers": 4}, tokens + 1, "float32"),
        feature_cache.fingerprint(w, {"layers": 4}, tokens, "bfloat16"),
    ]
    assert len({base, *others}) == 1 + len(others)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_exact_and_atomic(tmp_path, dtype):
    rng = np.random.default_rng(0)
    array = np.asarray(jnp.asarray(rng.standard_normal((5, 4, 3)), dtype))
    calls = []

    def compute():
        calls.append(1)
        return array

    first, hit = feature_cache.load_or_compute(tmp_path, "k", compute, {"sentences": 5})
    np.testing.assert_array_equal(first, array)
    assert not hit and len(calls) == 1
    second, hit = feature_cache.load_or_compute(tmp_path, "k", compute)
    assert hit and len(calls) == 1
    assert second.dtype == array.dtype and second.shape == array.shape
    np.testing.assert_array_equal(second.view(np.uint8), array.view(np.uint8))
    assert json.loads((tmp_path / "k.json").read_text())["sentences"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json", "k.npy"]  # no temp files


def test_unreadable_entry_is_reported_and_recomputed(tmp_path, caplog):
    array = np.ones((2, 3), np.float32)
    feature_cache.store(tmp_path, "k", array)
    (tmp_path / "k.npy").write_bytes(b"not an npy file")
    with caplog.at_level(logging.WARNING, logger="rkd_jax"):
        out, hit = feature_cache.load_or_compute(tmp_path, "k", lambda: array * 2)
    assert not hit
    np.testing.assert_array_equal(out, array * 2)
    assert "k.npy" in caplog.text and "recomputing" in caplog.text
    # The recomputed array replaced the broken file.
    np.testing.assert_array_equal(feature_cache.load(tmp_path, "k"), array * 2)
    # A file of the wrong size for its recorded shape is refused the same way.
    meta = json.loads((tmp_path / "k.json").read_text())
    (tmp_path / "k.json").write_text(json.dumps({**meta, "shape": [3, 3]}))
    assert feature_cache.load(tmp_path, "k") is None


def test_store_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        feature_cache.store(tmp_path, "k", np.ones(3, np.float32))
    assert list(tmp_path.iterdir()) == []


def test_without_a_directory_arrays_are_shared_in_memory(monkeypatch):
    """An empty directory keeps arrays in this process's memory: a second request with the same
    key computes nothing; beyond MEMORY_ENTRIES the oldest is dropped and computed again."""
    monkeypatch.setattr(feature_cache, "_memory", {})
    calls = []

    def compute(value):
        def run():
            calls.append(value)
            return np.full((2, 3), value, np.float32)

        return run

    a, hit = feature_cache.load_or_compute("", "k0", compute(0.0))
    assert not hit and calls == [0.0]
    b, hit = feature_cache.load_or_compute("", "k0", compute(9.0))
    assert hit and calls == [0.0] and np.array_equal(a, b) and float(b[0, 0]) == 0.0
    for i in range(1, feature_cache.MEMORY_ENTRIES + 1):
        feature_cache.load_or_compute("", f"k{i}", compute(float(i)))
    assert "k0" not in feature_cache._memory
    assert len(feature_cache._memory) == feature_cache.MEMORY_ENTRIES
    _, hit = feature_cache.load_or_compute("", "k0", compute(5.0))
    assert not hit and calls[-1] == 5.0


def test_distill_run_from_the_cache_equals_a_run_without_it(tiny_run, tmp_path):
    """Three 2-step distillation runs from the same teacher: without a cache, filling it,
    reading it. Both tables (student, teacher) come from the cache in the third, and all three
    end with bit-identical parameters."""
    cache = tmp_path / "text_cache"
    params = {}
    for name, directory in (("plain", ""), ("cold", str(cache)), ("warm", str(cache))):
        config = tiny_config(max_steps=2, max_eval_examples=8, text_cache_dir=directory)
        assert config.run.cache_text_features
        config.teacher_checkpoint = str(tiny_run / "teacher")
        config.data.eval_splits = ("val",)
        workdir = tmp_path / name
        train.train_and_evaluate(config, workdir)
        _, variables, _ = restore(workdir / "checkpoints" / "2")
        params[name] = variables
        if name == "cold":
            assert len(list(cache.glob("*.npy"))) == 2  # the student's and the teacher's
            stamps = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps  # read, not rewritten
    for name in ("cold", "warm"):
        jax.tree.map(np.testing.assert_array_equal, params["plain"], params[name])
