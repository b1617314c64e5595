"""TFDS builder and prepare: generated data read back through refer.py and the TFDS data source."""

import logging

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_data_refer import write_tiny_root

from rkd_jax.data import prepare, refer, synthetic, tfds_builder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    synthetic.generate(root, seed=1, num_images=24, eval_fraction=0.15, workers=1)
    data_dir = tmp_path_factory.mktemp("tfds")
    b = prepare.build(root, "refcoco+", "unc", data_dir)
    return root, data_dir, b


def test_identical_masks_and_sentences(built):
    root, _, b = built
    r = refer.Refer(root, "refcoco+", "unc")
    table_of = b.info.metadata["sentences"]
    for split in r.splits:
        refs = r.refs(split)
        source = b.as_data_source(split)
        assert len(source) == len(refs) > 0
        table = table_of[split]
        assert table == sorted({s for x in refs for s in x["sentences"]})
        for ex, ref in zip(source, refs, strict=True):  # disable_shuffling keeps file order
            assert int(ex["ref_id"]) == ref["ref_id"]
            np.testing.assert_array_equal(ex["mask"], r.mask(ref["ann_id"]))
            assert [s.decode() for s in ex["sentences"]] == ref["sentences"]
            assert [table[i] for i in ex["sentence_ids"]] == ref["sentences"]
            assert (int(ex["height"]), int(ex["width"])) == r.image_size(ref["image_id"])
            assert ex["image"] == r.image_path(ref["image_id"]).read_bytes()
            np.testing.assert_array_equal(ex["bbox"], r.box(ref["ann_id"]))
            assert r.category_name(int(ex["category_id"])) == ex["category"].decode()


def test_flat_splits_hold_every_sentence(built):
    root, data_dir, b = built
    r = refer.Refer(root, "refcoco+", "unc")
    assert "train_flat" not in b.info.splits
    for split in ("val", "testA", "testB"):
        refs = {x["ref_id"]: x for x in r.refs(split)}
        source = b.as_data_source(tfds_builder.flat_split(split))
        assert len(source) == r.counts(split)["sentences"]
        seen = set()
        for ex in source:
            ref = refs[int(ex["ref_id"])]
            j = int(ex["sent_index"])
            assert ex["sentence"].decode() == ref["sentences"][j]
            table = b.info.metadata["sentences"][split]
            assert table[int(ex["sentence_id"])] == ref["sentences"][j]
            np.testing.assert_array_equal(ex["mask"], r.mask(ref["ann_id"]))
            seen.add((ref["ref_id"], j))
        assert len(seen) == len(source)
    # tfds.data_source finds the registered builder by name.
    ds = tfds.data_source("refer_masks/refcoco+_unc", split="val_flat", data_dir=str(data_dir))
    assert len(ds) == r.counts("val")["sentences"]


def test_corrupt_image_is_named_or_skipped(tmp_path, caplog):
    root = write_tiny_root(tmp_path / "r", corrupt_image=2)
    with pytest.raises(ValueError, match=r"COCO_train2014_000000000002\.jpg: corrupt"):
        prepare.build(root, "refcoco", "unc", tmp_path / "a")
    with caplog.at_level(logging.WARNING):
        b = prepare.build(root, "refcoco", "unc", tmp_path / "b", skip_corrupt_images=True)
    assert "skipped 1 corrupt images" in caplog.text
    assert b.info.metadata["skipped_images"] == ["COCO_train2014_000000000002.jpg"]
    assert len(b.as_data_source("train")) == 2 and len(b.as_data_source("val_flat")) == 1
    # testA and testB refer only to image 2: nothing left to build.
    assert sorted(b.info.splits) == ["train", "val", "val_flat"]


def test_missing_image_names_the_path(tmp_path):
    root = write_tiny_root(tmp_path / "r", skip_image=1)
    with pytest.raises(FileNotFoundError, match=r"COCO_train2014_000000000001\.jpg: missing"):
        prepare.build(root, "refcoco", "unc", tmp_path / "a")


def _config(**kw):
    cfg = dict(
        root="",
        dataset="refcoco",
        split_by="unc",
        data_dir="",
        skip_corrupt_images=False,
        synthetic_num_images=8,
        synthetic_seed=5,
    )
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def test_embedded_dataset_is_generated_and_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("RKD_JAX_CACHE", str(tmp_path / "cache"))
    # A killed earlier generation: a directory without the completion marker.
    stale = tmp_path / "cache" / "synthetic" / "5-8"
    stale.mkdir(parents=True)
    (stale / "half-written").write_text("x")
    data_dir, name = prepare.ensure_prepared(_config())
    assert name == "refer_masks/refcoco_unc"
    version = synthetic.GENERATOR_VERSION
    assert data_dir == str(tmp_path / "cache" / "tfds" / f"synthetic-v{version}-5-8")
    assert (stale / prepare.DONE_MARKER).is_file() and not (stale / "half-written").exists()
    b = tfds_builder.builder(data_dir, "refcoco", "unc")
    assert b.info.metadata["refer_root"] == str(stale.resolve())
    assert len(b.as_data_source("train")) > 0

    def fail(*a, **k):
        raise AssertionError("generated or built twice")

    monkeypatch.setattr(synthetic, "generate", fail)
    monkeypatch.setattr(tfds_builder.ReferMasks, "download_and_prepare", fail)
    assert prepare.ensure_prepared(_config()) == (data_dir, name)
    # Output of an older generator version is generated again.
    (stale / prepare.DONE_MARKER).write_text(f"v{version - 1}\n")
    with pytest.raises(AssertionError, match="generated or built twice"):
        prepare.ensure_synthetic(5, 8)


def test_prepare_cli(tmp_path, capsys):
    root = write_tiny_root(tmp_path / "r")
    argv = [
        "--refer-root",
        str(root),
        "--dataset",
        "refcoco",
        "--split-by",
        "unc",
        "--data-dir",
        str(tmp_path / "out"),
    ]
    assert prepare.main(argv) == 0
    out = capsys.readouterr().out
    assert "refer_masks/refcoco_unc" in out and "train_flat" not in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    lines = {row[0]: int(row[1]) for row in rows}
    assert lines == {
        "testA": 1,
        "testA_flat": 3,
        "testB": 1,
        "testB_flat": 1,
        "train": 2,
        "val": 1,
        "val_flat": 1,
    }
    assert prepare.main(argv[:2] + ["--dataset", "refcocog", "--split-by", "unc"]) == 2
