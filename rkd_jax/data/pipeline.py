"""grain input pipeline: REFER examples from the TFDS data source -> numpy batches on the host.

Images are squashed to `image_size` x `image_size` (bilinear; masks nearest), pixels are float32
in [0, 1] (each model normalises with its own backbone's constants), expressions are BERT
WordPiece ids from the caller's tokenizer ([CLS] ... [SEP], at most `max_tokens`, padding mask).

Training draws one random sentence per object per epoch, in an order shuffled per epoch; both
depend only on (seed, epoch), so two runs with one seed see the same batches. The global batch is
`batch_size * process_count`; each process reads its own rows of every global batch (disjoint
shards) and the last incomplete global batch of an epoch is dropped. Evaluation visits every
sentence once; the last batch is padded, with `valid` False on padding rows.

The iterators (`BatchIterator`) load with grain; `get_state()` / `set_state(state)` resume at the
exact next batch. `num_workers` > 0 runs the loading in that many grain worker processes.

Fields of `data_config` used here: root, image_dir, dataset, split_by, train_split, data_dir,
image_size, max_tokens, num_workers, skip_corrupt_images, synthetic_num_images, synthetic_seed.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable

import grain
import numpy as np

from rkd_jax import platform
from rkd_jax.data import prepare, tfds_builder

Tokenizer = Callable[[list[str], int], tuple[np.ndarray, np.ndarray]]
_INFINITE = 2**62  # "forever" as a MapDataset length


@functools.lru_cache(maxsize=8)
def _prepared(key: tuple) -> tuple[str, str, str]:
    import ml_collections

    cfg = ml_collections.ConfigDict({k: v for k, v in key if k != "cache"})
    data_dir, _ = prepare.ensure_prepared(cfg)
    return data_dir, cfg.dataset, cfg.split_by


def _dataset_key(data_config) -> tuple:
    fields = (
        "root",
        "dataset",
        "split_by",
        "data_dir",
        "skip_corrupt_images",
        "synthetic_num_images",
        "synthetic_seed",
    )
    # The cache directory is part of the key: it decides where '' (embedded) and data_dir '' go.
    # Configs saved before skip_invalid_annotations existed lack the field: it was off then.
    skip = ("skip_invalid_annotations", bool(data_config.get("skip_invalid_annotations", False)))
    images = ("image_dir", str(data_config.get("image_dir", "")))
    cache = ("cache", str(platform.cache_dir()))
    return tuple((f, data_config[f]) for f in fields) + (skip, images, cache)


def _builder(data_config):
    return _open_builder(*_prepared(_dataset_key(data_config)))


@functools.lru_cache(maxsize=8)
def _open_builder(data_dir: str, dataset: str, split_by: str):
    # Reading dataset_info and the sentence tables once per process, not once per call.
    return tfds_builder.builder(data_dir, dataset, split_by)


def _check_split(data_config, split: str, flat: bool) -> str:
    b = _builder(data_config)
    name = tfds_builder.flat_split(split) if flat else split
    if name not in b.info.splits:
        have = sorted(s for s in b.info.splits if s.endswith(tfds_builder.FLAT_SUFFIX) == flat)
        if flat:
            have = [s[: -len(tfds_builder.FLAT_SUFFIX)] for s in have]
        what = "evaluation (per-sentence)" if flat else "training (per-object)"
        raise ValueError(
            f"{data_config.dataset}/{data_config.split_by}: no {what} split '{split}'; "
            f"available: {', '.join(have)}"
        )
    return name


class _Source:
    """A TFDS array_record data source that pickles as its location (opened once per process)."""

    def __init__(self, data_dir: str, dataset: str, split_by: str, split: str):
        self._where = (data_dir, dataset, split_by, split)
        self._source = None

    def _open(self):
        if self._source is None:
            data_dir, dataset, split_by, split = self._where
            self._source = tfds_builder.builder(data_dir, dataset, split_by).as_data_source(split)
        return self._source

    def __len__(self) -> int:
        return len(self._open())

    def read(self, indices: list[int]) -> list[dict]:
        return list(self._open().__getitems__([int(i) for i in indices]))

    def __getstate__(self):
        return {"_where": self._where, "_source": None}


def _source(data_config, split: str) -> _Source:
    data_dir, dataset, split_by = _prepared(_dataset_key(data_config))
    return _Source(data_dir, dataset, split_by, split)


def _decode_image(example: dict, size: int) -> np.ndarray:
    """Encoded image -> float32 [size, size, 3] in [0, 1] (squashed, bilinear)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(example["image"])) as im:
            if min(im.width, im.height) >= 2 * size:
                im.draft("RGB", (size, size))  # JPEG DCT scaling: decode big images at >= size
            rgb = im.convert("RGB").resize((size, size), Image.BILINEAR)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
        name = example["file_name"].decode()
        raise ValueError(
            f"{name} (image_id {int(example['image_id'])}): corrupt or unreadable image "
            f"({type(e).__name__}: {e})"
        ) from None
    return np.asarray(rgb, np.float32) * np.float32(1 / 255)


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W] -> int32 [size, size] in {0, 1}, nearest neighbour."""
    from PIL import Image

    small = Image.fromarray((mask > 0).astype(np.uint8)).resize((size, size), Image.NEAREST)
    return np.asarray(small, np.int32)


def sentence_table(data_config, tokenizer: Tokenizer, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of the split's unique sentences -> (ids int32 [N, T], mask int32 [N, T]).

    Row i is the sentence with `sentence_id == i` in that split's batches (T = max_tokens).
    An expression that tokenises to nothing raises ValueError naming it and the split.
    """
    b = _builder(data_config)
    tables = b.info.metadata["sentences"]
    if split not in tables:
        raise ValueError(
            f"{data_config.dataset}/{data_config.split_by}: unknown split '{split}'; "
            f"available: {', '.join(tables)}"
        )
    sentences = list(tables[split])
    where = f"{data_config.dataset}/{data_config.split_by} split '{split}'"
    if not sentences:
        raise ValueError(f"{where}: no sentences")
    try:
        ids, mask = tokenizer(sentences, int(data_config.max_tokens))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    expected = (len(sentences), int(data_config.max_tokens))
    if ids.shape != expected or mask.shape != expected:
        raise ValueError(
            f"tokenizer returned shapes {ids.shape} / {mask.shape}, expected {expected}"
        )
    # [CLS] and [SEP] alone: the tokenizer found nothing to encode in the expression.
    empty = np.nonzero(mask.sum(axis=1) <= 2)[0]
    if len(empty):
        raise ValueError(f"{where}: expression {sentences[empty[0]]!r} tokenises to nothing")
    return ids, mask


def split_counts(data_config, split: str) -> dict:
    """What a results file's protocol records of its split: referred objects, sentences
    (evaluation examples), unique sentences, and what preparing the data left out."""
    b = _builder(data_config)
    splits = b.info.splits
    counts = {}
    if split in splits:
        counts["objects"] = int(splits[split].num_examples)
    flat = tfds_builder.flat_split(split)
    if flat in splits:
        counts["sentences"] = int(splits[flat].num_examples)
    sentences = b.info.metadata.get("sentences", {})
    if split in sentences:
        counts["unique_sentences"] = len(sentences[split])
    for key in ("skipped_images", "skipped_refs"):
        value = b.info.metadata.get(key)
        if value:
            counts[key] = value
    return counts


def sentence_families(data_config, split: str) -> list[str] | None:
    """Expression family of each row of the split's sentence table (`sentence_table` order),
    for the embedded data (its grammar knows them: location, colour_shape, relation, ...);
    None for real REFER data, whose expressions have no families."""
    if data_config.root:
        return None
    from rkd_jax.data import synthetic

    tables = _builder(data_config).info.metadata["sentences"]
    if split not in tables:
        return None
    return [synthetic.expression_family(s) for s in tables[split]]


def steps_per_epoch(data_config, batch_size: int) -> int:
    """Training steps per epoch at global batch `batch_size` (remainder dropped)."""
    name = _check_split(data_config, data_config.train_split, flat=False)
    n = _builder(data_config).info.splits[name].num_examples
    steps = n // int(batch_size)
    if steps == 0:
        raise ValueError(
            f"{data_config.dataset}/{data_config.split_by} split '{data_config.train_split}' has "
            f"{n} objects, fewer than one global batch of {batch_size}"
        )
    return steps


def num_eval_examples(data_config, split: str) -> int:
    """Number of sentences (evaluation examples) in `split`."""
    name = _check_split(data_config, split, flat=True)
    return _builder(data_config).info.splits[name].num_examples


class _TrainBatches:
    """Step number -> this process's rows of that global batch (picklable for grain workers)."""

    def __init__(
        self, source, ids, mask, num_objects, batch_size, seed, index, count, size, offsets=None
    ):
        self.source, self.ids, self.mask = source, ids, mask
        self.num_objects, self.batch_size, self.seed = num_objects, batch_size, seed
        self.index, self.count, self.size = index, count, size
        self.offsets = offsets  # pair_id = offsets[object] + sentence index (train_pairs)
        self.steps = num_objects // (batch_size * count)
        self._epoch = None

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 0x7EA1])
            order = rng.permutation(self.num_objects)
            pick = rng.random(self.num_objects)  # sentence j = floor(pick * num_sentences)
            self._epoch = (epoch, order, pick)
        return self._epoch[1], self._epoch[2]

    def __call__(self, step: int) -> dict:
        epoch, s = divmod(int(step), self.steps)
        order, pick = self._epoch_plan(epoch)
        g = self.batch_size * self.count
        rows = order[
            s * g + self.index * self.batch_size : s * g + (self.index + 1) * self.batch_size
        ]
        examples = self.source.read(rows)
        sentence_id = np.empty(len(rows), np.int32)
        choice = np.empty(len(rows), np.int64)
        for r, (obj, ex) in enumerate(zip(rows, examples, strict=True)):
            choices = ex["sentence_ids"]
            choice[r] = min(int(pick[obj] * len(choices)), len(choices) - 1)
            sentence_id[r] = choices[choice[r]]
        batch = {
            "image": np.stack([_decode_image(ex, self.size) for ex in examples]),
            "mask": np.stack([_resize_mask(ex["mask"], self.size) for ex in examples]),
            "tokens": self.ids[sentence_id],
            "token_mask": self.mask[sentence_id],
            "sentence_id": sentence_id,
            "ref_id": np.array([ex["ref_id"] for ex in examples], np.int32),
            "category_id": np.array([ex["category_id"] for ex in examples], np.int32),
        }
        if self.offsets is not None:
            batch["pair_id"] = (self.offsets[rows] + choice).astype(np.int32)
        return batch


class _EvalBatches:
    """Batch number -> this process's rows of that global evaluation batch, padded at the end."""

    def __init__(self, source, ids, mask, num_examples, batch_size, index, count, size):
        self.source, self.ids, self.mask = source, ids, mask
        self.num_examples, self.batch_size = num_examples, batch_size
        self.index, self.count, self.size = index, count, size

    def __call__(self, k: int) -> dict:
        b, size = self.batch_size, self.size
        start = int(k) * b * self.count + self.index * b
        rows = [i for i in range(start, start + b) if i < self.num_examples]
        examples = self.source.read(rows)
        image = np.zeros((b, size, size, 3), np.float32)
        mask = np.zeros((b, size, size), np.int32)
        # Padding rows get sentence 0, a real expression, so no model sees an empty text.
        sentence_id = np.zeros(b, np.int32)
        ref_id = np.full(b, -1, np.int32)
        sent_index = np.full(b, -1, np.int32)
        orig_mask: list[np.ndarray | None] = [None] * b
        for r, ex in enumerate(examples):
            image[r] = _decode_image(ex, size)
            mask[r] = _resize_mask(ex["mask"], size)
            sentence_id[r] = ex["sentence_id"]
            ref_id[r] = ex["ref_id"]
            sent_index[r] = ex["sent_index"]
            orig_mask[r] = (np.asarray(ex["mask"]) > 0).astype(np.uint8)
        return {
            "image": image,
            "mask": mask,
            "tokens": self.ids[sentence_id],
            "token_mask": self.mask[sentence_id],
            "sentence_id": sentence_id,
            "valid": np.arange(b) < len(examples),
            "orig_mask": orig_mask,
            "ref_id": ref_id,
            "sent_index": sent_index,
        }


def _check_process(batch_size: int, process_index: int, process_count: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive per-process batch")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")


def _to_iterator(dataset: grain.MapDataset, num_workers: int):
    # One element is a whole batch: a few in flight are plenty (grain's defaults prefetch 500).
    it = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            # grain's worker processes read absl flags; outside an absl app use their defaults.
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2)
        )
    return iter(it)


def _own(value):
    if isinstance(value, np.ndarray):
        return np.array(value)
    if isinstance(value, list):
        return [None if v is None else np.array(v) for v in value]
    return value


class BatchIterator:
    """Batches `loader(k)` for k = next_batch, next_batch + 1, ... < `stop`, loaded by grain.

    The state is the number of the next batch (plus what must match to resume exactly), so a
    run restored with `set_state` continues with the exact next batch, whatever `num_workers`
    the saving and the restoring run used.
    """

    def __init__(self, loader, stop: int, num_workers: int, identity: dict):
        self._loader, self._stop, self._num_workers = loader, int(stop), int(num_workers)
        self._identity = dict(identity)
        self._next = 0
        self._it = None

    @property
    def num_batches(self) -> int:
        """Batches in a full pass (training with num_epochs=None: practically unbounded)."""
        return self._stop

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            dataset = grain.MapDataset.range(self._next, self._stop).map(self._loader)
            self._it = _to_iterator(dataset, self._num_workers)
        batch = next(self._it)
        self._next += 1
        if self._num_workers > 0:
            # Worker batches arrive in grain's shared memory, which closing the iterator frees.
            batch = {k: _own(v) for k, v in batch.items()}
        return batch

    def get_state(self) -> dict:
        """JSON-able state: {'next_batch': k, ...what the restoring iterator must match}."""
        return {"next_batch": self._next, **self._identity}

    def set_state(self, state: dict) -> None:
        """Continue from a `get_state()` result; ValueError if it was another stream's."""
        for key, value in self._identity.items():
            if state.get(key) != value:
                raise ValueError(
                    f"iterator state has {key}={state.get(key)!r} but this iterator has "
                    f"{key}={value!r}; a resumed run must use the same data settings"
                )
        k = int(state["next_batch"])
        if not 0 <= k <= self._stop:
            raise ValueError(f"iterator state next_batch={k} outside [0, {self._stop}]")
        self.close()
        self._next = k

    def close(self) -> None:
        """Stop prefetching (and worker processes); iteration may start again afterwards."""
        if self._it is not None:
            close = getattr(self._it, "close", None)
            if close is not None:
                close()
            self._it = None


def make_train_iterator(
    data_config,
    tokenizer: Tokenizer,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    pair_offsets: np.ndarray | None = None,
):
    """Training batches of this process (a BatchIterator: get_state/set_state, close).

    Each batch: image float32 [B, S, S, 3] in [0, 1], mask int32 [B, S, S] in {0, 1}, tokens and
    token_mask int32 [B, T], sentence_id int32 [B] (row of `sentence_table(train_split)`) and
    ref_id int32 [B] (which object), with B = `batch_size` per process, S = image_size,
    T = max_tokens, category_id int32 [B] (the object's category). `num_epochs=None`: forever. With `pair_offsets` (from `train_pairs`) also
    pair_id int32 [B]: which (object, sentence) pair of the split the row is.
    """
    _check_process(batch_size, process_index, process_count)
    split = _check_split(data_config, data_config.train_split, flat=False)
    ids, mask = sentence_table(data_config, tokenizer, data_config.train_split)
    source = _source(data_config, split)
    steps = steps_per_epoch(data_config, batch_size * process_count)
    loader = _TrainBatches(
        source,
        ids,
        mask,
        len(source),
        batch_size,
        seed,
        process_index,
        process_count,
        int(data_config.image_size),
        offsets=None if pair_offsets is None else np.asarray(pair_offsets, np.int64),
    )
    total = _INFINITE if num_epochs is None else steps * int(num_epochs)
    identity = {
        "kind": "train",
        "split": data_config.train_split,
        "seed": int(seed),
        "batch_size": int(batch_size),
        "process_index": int(process_index),
        "process_count": int(process_count),
        "num_objects": len(source),
    }
    return BatchIterator(loader, total, int(data_config.num_workers), identity)


def train_pairs(data_config) -> tuple[np.ndarray, np.ndarray]:
    """Every (object, sentence) pair of the train split, in a fixed order.

    Returns (offsets int64 [N + 1], sentence_id int32 [P]): the pairs of object i (its row in
    the train split) are offsets[i] .. offsets[i + 1] - 1, in the order of its sentences, and
    sentence_id[p] is pair p's row of `sentence_table(train_split)`. Training batches carry
    pair_id = offsets[object] + the sentence drawn (`make_train_iterator(pair_offsets=...)`).
    """
    source = _source(data_config, _check_split(data_config, data_config.train_split, flat=False))
    counts, sentence_ids = [], []
    n = len(source)
    for start in range(0, n, 512):
        for ex in source.read(list(range(start, min(n, start + 512)))):
            ids = np.asarray(ex["sentence_ids"], np.int32).reshape(-1)
            counts.append(len(ids))
            sentence_ids.append(ids)
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    return offsets, np.concatenate(sentence_ids) if sentence_ids else np.zeros(0, np.int32)


class _PairBatches:
    """Batch number -> the (object, sentence) pairs k*B .. k*B + B - 1 of the train split."""

    def __init__(self, source, ids, mask, offsets, sentence_ids, batch_size, size):
        self.source, self.ids, self.mask = source, ids, mask
        self.offsets, self.sentence_ids = offsets, sentence_ids
        self.batch_size, self.size = batch_size, size

    def __call__(self, k: int) -> dict:
        b, size, n = self.batch_size, self.size, len(self.sentence_ids)
        pairs = np.arange(int(k) * b, min(n, (int(k) + 1) * b))
        objects = np.searchsorted(self.offsets, pairs, side="right") - 1
        unique, inverse = np.unique(objects, return_inverse=True)
        examples = self.source.read(list(unique))
        images = [_decode_image(ex, size) for ex in examples]
        image = np.zeros((b, size, size, 3), np.float32)
        sentence_id = np.zeros(b, np.int32)  # padding rows: sentence 0, a real expression
        image[: len(pairs)] = np.stack([images[i] for i in inverse]) if len(pairs) else 0
        sentence_id[: len(pairs)] = self.sentence_ids[pairs]
        pair_id = np.full(b, -1, np.int32)
        pair_id[: len(pairs)] = pairs
        return {
            "image": image,
            "tokens": self.ids[sentence_id],
            "token_mask": self.mask[sentence_id],
            "sentence_id": sentence_id,
            "pair_id": pair_id,
            "valid": np.arange(b) < len(pairs),
        }


def make_pair_iterator(
    data_config, tokenizer: Tokenizer, batch_size: int, offsets, sentence_ids
) -> BatchIterator:
    """Every (object, sentence) pair of the train split once (`train_pairs` order), in batches
    of `batch_size` padded at the end (valid bool [B]); what a frozen teacher's targets are
    computed over. Each process reads all pairs."""
    split = _check_split(data_config, data_config.train_split, flat=False)
    ids, mask = sentence_table(data_config, tokenizer, data_config.train_split)
    loader = _PairBatches(
        _source(data_config, split),
        ids,
        mask,
        np.asarray(offsets, np.int64),
        np.asarray(sentence_ids, np.int32),
        int(batch_size),
        int(data_config.image_size),
    )
    n = len(sentence_ids)
    identity = {"kind": "pairs", "batch_size": int(batch_size), "num_pairs": n}
    return BatchIterator(loader, -(-n // int(batch_size)), int(data_config.num_workers), identity)


def make_eval_iterator(
    data_config,
    tokenizer: Tokenizer,
    split: str,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
):
    """Every sentence of `split` once, in file order, in batches of `batch_size` per process.

    As training batches plus: valid bool [B] (False on the padding of the last batch),
    orig_mask (list of B uint8 [H_i, W_i] masks at the image's own size, None for padding),
    ref_id and sent_index int32 [B] (-1 for padding). Every process gets the same number of
    batches: ceil(num_eval_examples / (batch_size * process_count)).
    """
    _check_process(batch_size, process_index, process_count)
    name = _check_split(data_config, split, flat=True)
    ids, mask = sentence_table(data_config, tokenizer, split)
    source = _source(data_config, name)
    n = len(source)
    g = batch_size * process_count
    loader = _EvalBatches(
        source,
        ids,
        mask,
        n,
        batch_size,
        process_index,
        process_count,
        int(data_config.image_size),
    )
    identity = {
        "kind": "eval",
        "split": split,
        "batch_size": int(batch_size),
        "process_index": int(process_index),
        "process_count": int(process_count),
        "num_examples": n,
    }
    return BatchIterator(loader, -(-n // g), int(data_config.num_workers), identity)
