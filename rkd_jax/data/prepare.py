"""Build the TFDS dataset of a REFER root once; generate the embedded dataset first if asked.

`ensure_prepared(data_config)` is what training and evaluation call: with `root == ''` the
embedded synthetic dataset is generated into `cache_dir()/synthetic/<seed>-<num_images>` (once;
written to a temporary directory and renamed, with a marker file, so a killed generation is
redone), then the TFDS dataset is built into `<data_dir>/<source>/refer_masks/<config>/...`.
Builds are serialised with a file lock, so several processes on one machine build it once.

    python -m rkd_jax.data.prepare --refer-root DIR --dataset refcoco --split-by unc --data-dir OUT
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rkd_jax import cli, platform
from rkd_jax.data import refer as refer_lib

log = logging.getLogger(__name__)

DONE_MARKER = ".complete"


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def synthetic_root(seed: int, num_images: int) -> Path:
    """Where the embedded dataset of (seed, num_images) lives in the cache."""
    return platform.cache_dir() / "synthetic" / f"{seed}-{num_images}"


def _finished(root: Path, version: int) -> bool:
    try:
        return (root / DONE_MARKER).read_text().split()[0] == f"v{version}"
    except (OSError, IndexError):
        return False


def ensure_synthetic(seed: int, num_images: int) -> Path:
    """Generate the embedded dataset into the cache unless a finished copy is there -> root.

    The marker file names the generator version: output of an older generator is redone.
    """
    from rkd_jax.data import synthetic

    root = synthetic_root(seed, num_images)
    version = synthetic.GENERATOR_VERSION
    if _finished(root, version):
        return root
    with _file_lock(root.parent / f".{root.name}.lock"):
        if _finished(root, version):
            return root
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        start = time.perf_counter()
        summary = synthetic.generate(tmp, seed=seed, num_images=num_images)
        (tmp / DONE_MARKER).write_text(f"v{version}\n{json.dumps(summary)}\n")
        shutil.rmtree(root, ignore_errors=True)  # an unfinished or outdated copy
        os.replace(tmp, root)
        log.info(
            "generated %s (%d images) in %.1f s", root, num_images, time.perf_counter() - start
        )
    return root


def source_key(root: str | Path, data_config=None) -> str:
    """Directory name of one REFER root inside data_dir (datasets of two roots never mix)."""
    if data_config is not None and not data_config.root:
        from rkd_jax.data import synthetic

        seed, n = data_config.synthetic_seed, data_config.synthetic_num_images
        return f"synthetic-v{synthetic.GENERATOR_VERSION}-{seed}-{n}"
    resolved = Path(root).resolve()
    key = str(resolved)
    image_dir = data_config.get("image_dir", "") if data_config is not None else ""
    if image_dir:  # the same annotations over another image directory are another dataset
        key += "\n" + str(Path(image_dir).resolve())
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return f"{resolved.name or 'root'}-{digest}"


def build(
    refer_root: str | Path,
    dataset: str,
    split_by: str,
    data_dir: str | Path,
    skip_corrupt_images: bool = False,
    skip_invalid_annotations: bool = False,
    image_dir: str | Path = "",
):
    """Build (once) the TFDS dataset of `refer_root` into `data_dir` -> the prepared builder.
    The images are read from `image_dir` ('' = `<refer_root>/images/mscoco/images/train2014`).

    An invalid ref (refer.Refer's checks) fails the build naming it, or with
    `skip_invalid_annotations` is left out and counted in the log and the dataset's metadata
    (`skipped_refs`)."""
    import tensorflow_datasets as tfds

    from rkd_jax.data import tfds_builder

    refer_lib.check_dataset(dataset, split_by)
    data_dir = Path(data_dir)
    skips = (skip_corrupt_images, skip_invalid_annotations, image_dir or None)
    b = tfds_builder.builder(data_dir, dataset, split_by, refer_root, *skips)
    if b.is_prepared():
        return b
    # Bad REFER files are refused before TFDS writes anything into data_dir (the builder reads
    # them again: a one-time cost of the build).
    refer_lib.Refer(refer_root, dataset, split_by, skip_invalid_annotations)
    with _file_lock(data_dir / f".{tfds_builder.config_name(dataset, split_by)}.lock"):
        b = tfds_builder.builder(data_dir, dataset, split_by, refer_root, *skips)
        if not b.is_prepared():
            start = time.perf_counter()
            tfds.disable_progress_bar()
            b.download_and_prepare()
            log.info("built %s in %.1f s", b.data_dir, time.perf_counter() - start)
    return tfds_builder.builder(data_dir, dataset, split_by)


def ensure_prepared(data_config) -> tuple[str, str]:
    """Make sure the TFDS dataset of `data_config` exists -> (tfds data_dir, 'refer_masks/<cfg>').

    Uses data_config.root ('' = the embedded synthetic dataset of synthetic_seed and
    synthetic_num_images), image_dir ('' = the root's images/mscoco/images/train2014), dataset,
    split_by, data_dir ('' = cache_dir()/tfds), skip_corrupt_images and skip_invalid_annotations
    (absent = False).
    """
    from rkd_jax.data import tfds_builder

    refer_lib.check_dataset(data_config.dataset, data_config.split_by)
    if data_config.root:
        root = Path(data_config.root)
    else:
        root = ensure_synthetic(
            int(data_config.synthetic_seed), int(data_config.synthetic_num_images)
        )
    base = Path(data_config.data_dir) if data_config.data_dir else platform.cache_dir() / "tfds"
    data_dir = base / source_key(root, data_config)
    build(
        root,
        data_config.dataset,
        data_config.split_by,
        data_dir,
        bool(data_config.skip_corrupt_images),
        bool(data_config.get("skip_invalid_annotations", False)),
        data_config.get("image_dir", "") if data_config.root else "",
    )
    config = tfds_builder.config_name(data_config.dataset, data_config.split_by)
    name = f"{tfds_builder.BUILDER_NAME}/{config}"
    return str(data_dir), name


def _main(argv: Sequence[str] | None) -> int:
    p = cli.ArgumentParser(
        prog="python -m rkd_jax.data.prepare",
        description="Build the TFDS dataset (with masks) of a REFER root",
    )
    p.add_argument("--refer-root", default="", help="REFER root; empty: the embedded dataset")
    p.add_argument("--dataset", default="refcoco", choices=sorted({d for d, _ in refer_lib.VALID}))
    p.add_argument("--split-by", default="unc", choices=sorted({s for _, s in refer_lib.VALID}))
    p.add_argument(
        "--image-dir", default="", help="COCO train2014 images (default: under the REFER root)"
    )
    p.add_argument("--data-dir", default="", help="TFDS data_dir (default: the rkd_jax cache)")
    p.add_argument("--skip-corrupt-images", action="store_true")
    p.add_argument(
        "--skip-invalid-annotations",
        action="store_true",
        help="leave out (and count) refs with a broken annotation instead of failing",
    )
    p.add_argument("--synthetic-seed", type=int, default=0)
    p.add_argument("--synthetic-num-images", type=int, default=5000)
    args = p.parse_args(argv)
    if args.refer_root and not Path(args.refer_root).is_dir():
        raise cli.UserError(f"--refer-root {args.refer_root}: no such directory")
    if not args.refer_root and args.synthetic_num_images < 1:
        raise cli.UserError(
            f"--synthetic-num-images {args.synthetic_num_images}: expected at least 1"
        )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import ml_collections

    cfg = ml_collections.ConfigDict(
        {
            "root": args.refer_root,
            "image_dir": args.image_dir,
            "dataset": args.dataset,
            "split_by": args.split_by,
            "data_dir": args.data_dir,
            "skip_corrupt_images": args.skip_corrupt_images,
            "skip_invalid_annotations": args.skip_invalid_annotations,
            "synthetic_seed": args.synthetic_seed,
            "synthetic_num_images": args.synthetic_num_images,
        }
    )
    start = time.perf_counter()
    data_dir, name = ensure_prepared(cfg)
    from rkd_jax.data import tfds_builder

    b = tfds_builder.builder(data_dir, args.dataset, args.split_by)
    print(f"{name} in {data_dir} ({time.perf_counter() - start:.1f} s)")
    for split, info in sorted(b.info.splits.items()):
        print(f"  {split:<12} {info.num_examples:>8} examples")
    skipped = b.info.metadata.get("skipped_refs") or {}
    if skipped:
        print(
            f"  left out invalid refs: {', '.join(f'{n} {r}' for r, n in sorted(skipped.items()))}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Build the dataset; bad input: one `error:` line on stderr, exit code 2."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
