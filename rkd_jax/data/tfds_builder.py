"""TFDS builder for the RefCOCO family with object masks, readable without TensorFlow.

TFDS' own `ref_coco` has no masks, and its Image feature needs TensorFlow. This builder reads
any REFER-layout root (the real files or the generated ones) and writes array_record files that
`builder.as_data_source(split)` (or `tfds.data_source`) reads with numpy only:

- split `<split>` (e.g. `train`, `val`): one example per referred object, with every sentence;
- split `<split>_flat` for the evaluation splits (all but `train`): one example per sentence.

Each example holds the encoded image file (bytes), the object mask (uint8 [H, W], zlib), the
image size, box, category, ids, all sentences of the object, and for each sentence its index
into the split's table of unique sentences (`info.metadata["sentences"][split]`, sorted), so
training can encode every distinct sentence once.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from rkd_jax.data import refer as refer_lib

log = logging.getLogger(__name__)

BUILDER_NAME = "refer_masks"
VERSION = "1.0.0"
FLAT_SUFFIX = "_flat"


def config_name(dataset: str, split_by: str) -> str:
    """TFDS config name of a dataset/split_by pair, e.g. 'refcoco+_unc'."""
    refer_lib.check_dataset(dataset, split_by)
    return f"{dataset}_{split_by}"


def flat_split(split: str) -> str:
    """Name of the per-sentence split of `split`."""
    return split + FLAT_SUFFIX


def eval_splits(dataset: str, split_by: str) -> tuple[str, ...]:
    """REFER splits that get a per-sentence (flat) split: all but train."""
    return tuple(s for s in refer_lib.VALID[(dataset, split_by)] if s != "train")


class ReferConfig(tfds.core.BuilderConfig):
    """One (dataset, split_by) pair of the REFER files."""

    def __init__(self, *, dataset: str, split_by: str, **kwargs):
        super().__init__(name=config_name(dataset, split_by), **kwargs)
        self.dataset = dataset
        self.split_by = split_by


class ReferMasks(tfds.core.GeneratorBasedBuilder):
    """RefCOCO / RefCOCO+ / RefCOCOg (REFER layout) with masks; build with `refer_root=`."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {"1.0.0": "Per-object and per-sentence splits with zlib masks."}
    BUILDER_CONFIGS = [ReferConfig(dataset=d, split_by=s) for d, s in refer_lib.VALID]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS' own lookup of a packaged builder's file needs the importlib_resources backport,
        # which is not a dependency here; the answer is simply this file.
        return epath.Path(__file__)

    def __init__(
        self,
        *,
        refer_root: str | Path | None = None,
        skip_corrupt_images: bool = False,
        skip_invalid_annotations: bool = False,
        image_dir: str | Path | None = None,
        **kwargs,
    ):
        """`refer_root` (and `image_dir`, when the COCO images are kept apart from it) is only
        needed to build; reading a built dataset needs only data_dir."""
        self._refer_root = None if refer_root is None else Path(refer_root)
        self._image_dir = Path(image_dir) if image_dir else None
        self._skip_corrupt_images = skip_corrupt_images
        self._skip_invalid_annotations = skip_invalid_annotations
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    # Encoded file bytes: tfds.features.Image would need TensorFlow to decode.
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "file_name": text,
                    "height": tfds.features.Scalar(dtype=np.int32),
                    "width": tfds.features.Scalar(dtype=np.int32),
                    "mask": tfds.features.Tensor(
                        shape=(None, None), dtype=np.uint8, encoding="zlib"
                    ),
                    "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "category_id": tfds.features.Scalar(dtype=np.int32),
                    "category": text,
                    "ref_id": tfds.features.Scalar(dtype=np.int64),
                    "ann_id": tfds.features.Scalar(dtype=np.int64),
                    "image_id": tfds.features.Scalar(dtype=np.int64),
                    "sentences": tfds.features.Sequence(text),
                    "sentence_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    # Flat (per-sentence) examples only; -1 / "" in per-object examples.
                    "sentence": text,
                    "sentence_id": tfds.features.Scalar(dtype=np.int32),
                    "sent_index": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
            homepage="https://github.com/lichengunc/refer",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded: the REFER root is local
        if self._refer_root is None:
            raise ValueError(
                f"{BUILDER_NAME}/{self.builder_config.name} is not built in {self.data_dir} and "
                "no refer_root was given to build it from"
            )
        cfg = self.builder_config
        refer = refer_lib.Refer(
            self._refer_root,
            cfg.dataset,
            cfg.split_by,
            self._skip_invalid_annotations,
            self._image_dir,
        )
        tables = {}
        for split in refer.splits:
            tables[split] = sorted({s for r in refer.refs(split) for s in r["sentences"]})
        all_refs = [r for split in refer.splits for r in refer.refs(split)]
        images_ok, skipped = self._check_images(refer, all_refs)
        self.info.metadata["refer_root"] = str(self._refer_root.resolve())
        self.info.metadata["image_dir"] = str(refer.image_dir.resolve())
        self.info.metadata["dataset"] = cfg.dataset
        self.info.metadata["split_by"] = cfg.split_by
        self.info.metadata["sentences"] = tables
        self.info.metadata["skipped_images"] = skipped
        self.info.metadata["skipped_refs"] = dict(refer.skipped)
        gens = {}
        for split in refer.splits:
            if not any(r["image_id"] in images_ok for r in refer.refs(split)):
                # TFDS cannot write an empty split; a split whose images were all skipped is
                # left out, and asking for it later names the splits there are.
                log.warning(
                    "%s/%s: split %s has no readable images; not built",
                    cfg.dataset,
                    cfg.split_by,
                    split,
                )
                continue
            gens[split] = self._generate_examples(refer, split, tables[split], images_ok, False)
            if split in eval_splits(cfg.dataset, cfg.split_by):
                gens[flat_split(split)] = self._generate_examples(
                    refer, split, tables[split], images_ok, True
                )
        return gens

    def _check_images(self, refer: refer_lib.Refer, refs: list[dict]) -> tuple[set, list]:
        """Decode every image once: (readable image ids, skipped file names).

        A missing file always fails; a corrupt one fails naming the file unless
        `skip_corrupt_images`, in which case its objects are left out and counted in the log.
        """
        from PIL import Image

        ok, skipped = set(), []
        for image_id in sorted({r["image_id"] for r in refs}):
            data = refer.read_image_bytes(image_id)
            path = refer.image_path(image_id)
            try:
                with Image.open(io.BytesIO(data)) as im:
                    size = (im.height, im.width)
                    im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                    im.load()
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
                if not self._skip_corrupt_images:
                    raise ValueError(
                        f"{path}: corrupt or unreadable image ({type(e).__name__}: {e}); "
                        "set skip_corrupt_images to leave such images out"
                    ) from None
                skipped.append(path.name)
                continue
            if size != refer.image_size(image_id):
                raise ValueError(
                    f"{path}: image is {size[0]}x{size[1]} (h x w) but {refer.instances_file} "
                    f"says {refer.image_size(image_id)}"
                )
            ok.add(image_id)
        if skipped:
            log.warning(
                "%s/%s: skipped %d corrupt images (%d objects): %s",
                refer.dataset,
                refer.split_by,
                len(skipped),
                sum(r["image_id"] not in ok for r in refs),
                ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""),
            )
        return ok, skipped

    def _generate_examples(self, refer, split, table, images_ok, flat):
        index = {s: i for i, s in enumerate(table)}
        cache_id, cache_bytes = None, b""
        for r in refer.refs(split):
            if r["image_id"] not in images_ok:
                continue
            if r["image_id"] != cache_id:
                cache_id, cache_bytes = r["image_id"], refer.read_image_bytes(r["image_id"])
            height, width = refer.image_size(r["image_id"])
            example = {
                "image": cache_bytes,
                "file_name": refer.image_path(r["image_id"]).name,
                "height": height,
                "width": width,
                "mask": refer.mask(r["ann_id"]),
                "bbox": refer.box(r["ann_id"]),
                "category_id": r["category_id"],
                "category": refer.category_name(r["category_id"]),
                "ref_id": r["ref_id"],
                "ann_id": r["ann_id"],
                "image_id": r["image_id"],
                "sentences": r["sentences"],
                "sentence_ids": np.array([index[s] for s in r["sentences"]], np.int32),
                "sentence": "",
                "sentence_id": -1,
                "sent_index": -1,
            }
            if not flat:
                yield r["ref_id"], example
                continue
            for j, s in enumerate(r["sentences"]):
                yield (
                    f"{r['ref_id']}_{j}",
                    dict(example, sentence=s, sentence_id=index[s], sent_index=j),
                )


def builder(
    data_dir: str | Path,
    dataset: str,
    split_by: str,
    refer_root: str | Path | None = None,
    skip_corrupt_images: bool = False,
    skip_invalid_annotations: bool = False,
    image_dir: str | Path | None = None,
) -> ReferMasks:
    """The builder of one dataset in `data_dir` (call download_and_prepare() to build it);
    `image_dir` = the COCO images when not under `refer_root`."""
    return ReferMasks(
        config=config_name(dataset, split_by),
        data_dir=str(data_dir),
        refer_root=refer_root,
        skip_corrupt_images=skip_corrupt_images,
        skip_invalid_annotations=skip_invalid_annotations,
        image_dir=image_dir,
    )
