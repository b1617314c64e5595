"""Input pipeline throughput: training examples/s per grain worker count and image size.

Reads the TFDS dataset from the cache (building the embedded default first if needed, or the
REFER root given with --refer-root) and times the training iterator of rkd_jax.data.pipeline:
read, decode, squash resize, mask resize, token lookup, batching. The first batch of each
setting (worker start-up) is not timed.

    python benchmarks/data_pipeline.py                      # sizes 384 and 96, workers 0 1 2
    python benchmarks/data_pipeline.py --sizes 384 --workers 0 2 4 --batches 40 --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform as host_platform
import sys
import time

import ml_collections

# Run from a checkout without installing: the repository root holds the rkd_jax package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def data_config(args, image_size: int, num_workers: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "root": args.refer_root,
            "dataset": args.dataset,
            "split_by": args.split_by,
            "train_split": "train",
            "data_dir": args.data_dir,
            "image_size": image_size,
            "max_tokens": 20,
            "num_workers": num_workers,
            "skip_corrupt_images": False,
            "synthetic_num_images": args.synthetic_num_images,
            "synthetic_seed": 0,
        }
    )


def measure(cfg, tokenizer, batch_size: int, batches: int) -> dict:
    from rkd_jax.data import pipeline

    it = pipeline.make_train_iterator(cfg, tokenizer, batch_size, seed=0)
    try:
        start = time.perf_counter()
        next(it)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        seconds = time.perf_counter() - start
    finally:
        it.close()
    rate = batches * batch_size / seconds
    workers = int(cfg.num_workers)
    return {
        "image_size": int(cfg.image_size),
        "num_workers": workers,
        "examples_per_s": round(rate, 1),
        "examples_per_s_per_worker": round(rate / max(workers, 1), 1),
        "first_batch_s": round(first, 2),
        "batch_size": batch_size,
        "batches": batches,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--refer-root", default="", help="REFER root; empty: the embedded dataset")
    p.add_argument("--dataset", default="refcoco")
    p.add_argument("--split-by", default="unc")
    p.add_argument("--data-dir", default="", help="TFDS data_dir (default: the rkd_jax cache)")
    p.add_argument("--synthetic-num-images", type=int, default=5000)
    p.add_argument("--sizes", type=int, nargs="+", default=[384, 96])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=30, help="timed batches per setting")
    p.add_argument("--json", default="", help="also write the results to this file")
    args = p.parse_args(argv)

    from rkd_jax.convert import bert
    from rkd_jax.data import prepare

    start = time.perf_counter()
    data_dir, name = prepare.ensure_prepared(data_config(args, 96, 0))
    print(f"dataset {name} in {data_dir} (ready in {time.perf_counter() - start:.1f} s)")
    tokenizer = functools.partial(
        bert.tokenize, bert.load_tokenizer(bert.default_text_encoder_dir())
    )
    rows = []
    print(f"{'size':>5} {'workers':>7} {'examples/s':>11} {'per worker':>11} {'first batch':>12}")
    for size in args.sizes:
        for workers in args.workers:
            row = measure(data_config(args, size, workers), tokenizer, args.batch_size,
                          args.batches)  # fmt: skip
            rows.append(row)
            print(
                f"{size:>5} {workers:>7} {row['examples_per_s']:>11.1f} "
                f"{row['examples_per_s_per_worker']:>11.1f} {row['first_batch_s']:>10.2f} s"
            )
    if args.json:
        result = {
            "benchmark": "data_pipeline",
            "dataset": name,
            "data_dir": data_dir,
            "host": host_platform.node(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "results": rows,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
