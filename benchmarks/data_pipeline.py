"""Input pipeline throughput: training examples/s per grain worker count and image size.

Reads the TFDS dataset from the cache (building it first if needed: the embedded dataset, the
embedded dataset re-encoded as COCO-sized JPEGs with --jpeg-size, or the REFER root given with
--refer-root) and times the training iterator of rkd_jax.data.pipeline: read, decode, squash
resize, mask resize, token lookup, batching. The first batch of each setting (worker start-up)
is not timed. Each setting also records the CPU time per example of this process and of the
grain workers (psutil), so the per-worker rate can be read on a machine with few cores.

With a row at the paper's image size (384), the result ends with the arithmetic of the paper's
run (`plan`): the per-worker rate r, the grain workers that deliver 1.5x the H100 distill
step's images/s (benchmarks/results/gpu-h100-2026-11-27.json) on a 16-core host, whether they
fit there, and the student phase's wall time at that rate (docs/speed.md).

    python benchmarks/data_pipeline.py                      # sizes 384 and 96, workers 0 1 2
    python benchmarks/data_pipeline.py --jpeg-size 640x480 --sizes 384 --workers 0 1 2 \\
        --batches 60 --json benchmarks/results/data-pipeline-cpu-DATE.json

--jpeg-size WxH: the embedded dataset's refcoco files with every image squashed to WxH
(bicubic, plus Gaussian pixel noise so a 640x480 file weighs about what a COCO train2014 JPEG
does, ~160 KB) and its annotations scaled with it, written once beside the generated data in the
cache; the generated data itself is unchanged.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import multiprocessing
import os
import platform as host_platform
import shutil
import sys
import time
from pathlib import Path

import ml_collections

ROOT = Path(__file__).resolve().parents[1]
# Run from a checkout without installing: the repository root holds the rkd_jax package.
sys.path.insert(0, str(ROOT))

GPU_RESULTS = ROOT / "benchmarks" / "results" / "gpu-h100-2026-11-27.json"
# RefCOCO (UNC) in REFER: 42,404 referred objects (120,624 expressions) in train; an epoch is
# one pass over the objects (configs/distill.py: train.epochs). Validation every epoch scores
# val's 10,834 expressions; the end of a phase scores val, testA (5,657) and testB (5,095).
REFCOCO_TRAIN_OBJECTS = 42_404
REFCOCO_EVAL_SENTENCES = {"val": 10_834, "testA": 5_657, "testB": 5_095}
COCO_MEAN_JPEG_KB = 160  # COCO train2014: 13.5 GB over 82,783 images
# docs/miniature.md, the FLOP convention: one distillation step at 384 px and 20 tokens is 184
# GFLOP of useful work per image (teacher forward 75.5, student forward 34.7, student backward
# about twice that). The teacher's training step (forward and backward) is about 3 x 75.5.
DISTILL_GFLOP_PER_IMAGE = 184.0
TEACHER_FORWARD_GFLOP = 75.5
STUDENT_FORWARD_GFLOP = 34.7


def jpeg_size(text: str) -> tuple[int, int]:
    """'640x480' -> (640, 480); argparse reports anything else as one usage error."""
    w, sep, h = text.lower().partition("x")
    if not (sep and w.isdigit() and h.isdigit() and int(w) >= 8 and int(h) >= 8):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected WIDTHxHEIGHT in pixels, each at least 8 (e.g. 640x480)"
        )
    return int(w), int(h)


def data_config(args, image_size: int, num_workers: int, root: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "root": root,
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


def _reencode(job) -> int:
    """One image squashed to (width, height), noise added, saved as JPEG -> its size in bytes."""
    import numpy as np
    from PIL import Image

    src, dst, width, height, noise, quality, seed = job
    with Image.open(src) as im:
        rgb = np.asarray(im.convert("RGB").resize((width, height), Image.BICUBIC), np.float32)
    if noise > 0:
        rgb = rgb + np.random.default_rng(seed).normal(0.0, noise, rgb.shape).astype(np.float32)
    Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8)).save(
        dst, format="JPEG", quality=quality
    )
    return dst.stat().st_size


def _scale_polygon(poly: list, sx: float, sy: float, width: int, height: int) -> list[float]:
    return [min(v * sx, width) if j % 2 == 0 else min(v * sy, height) for j, v in enumerate(poly)]


def coco_sized_root(
    source: Path, dataset: str, width: int, height: int, noise: float, quality: int
) -> tuple[Path, dict]:
    """`source`'s `dataset` files with every JPEG squashed to width x height, the polygons,
    boxes and areas scaled with it -> (root, summary). Built once beside `source` (written to
    a temporary directory and renamed, as the generated data is)."""
    from rkd_jax.data.refer import IMAGE_SUBDIR

    out = source.parent / f"{source.name}-{dataset}-jpeg{width}x{height}-q{quality}-n{noise:g}"
    if (out / ".complete").is_file():
        return out, json.loads((out / ".complete").read_text())
    start = time.perf_counter()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / dataset).mkdir(parents=True)
    (tmp / IMAGE_SUBDIR).mkdir(parents=True)
    instances = json.loads((source / dataset / "instances.json").read_text())
    scale = {}
    for im in instances["images"]:
        scale[im["id"]] = (width / im["width"], height / im["height"])
        im["width"], im["height"] = width, height
    for ann in instances["annotations"]:
        sx, sy = scale[ann["image_id"]]
        ann["segmentation"] = [
            _scale_polygon(p, sx, sy, width, height) for p in ann["segmentation"]
        ]
        x, y, w, h = ann["bbox"]
        ann["bbox"] = [x * sx, y * sy, w * sx, h * sy]
        ann["area"] = ann["area"] * sx * sy
        ann.pop("synthetic", None)  # the generator's scene graph, in the small image's pixels
    (tmp / dataset / "instances.json").write_text(json.dumps(instances))
    for refs in (source / dataset).glob("refs(*).p"):
        shutil.copy(refs, tmp / dataset / refs.name)
    jobs = [
        (
            source / IMAGE_SUBDIR / im["file_name"],
            tmp / IMAGE_SUBDIR / im["file_name"],
            width,
            height,
            noise,
            quality,
            im["id"],
        )
        for im in instances["images"]
    ]
    workers = min(os.cpu_count() or 1, 4)
    if workers > 1 and len(jobs) >= 200:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            sizes = pool.map(_reencode, jobs, chunksize=16)
    else:
        sizes = [_reencode(job) for job in jobs]
    summary = {
        "images": len(sizes),
        "jpeg_size": f"{width}x{height}",
        "jpeg_quality": quality,
        "jpeg_noise": noise,
        "mean_jpeg_kb": round(sum(sizes) / len(sizes) / 1024, 1),
    }
    (tmp / ".complete").write_text(json.dumps(summary) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(
        f"re-encoded {len(sizes)} images at {width}x{height} (mean {summary['mean_jpeg_kb']} KB) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return out, summary


def _cpu_seconds(proc) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def _children_cpu(proc) -> dict[int, float]:
    import psutil

    out = {}
    for child in proc.children(recursive=True):
        try:
            out[child.pid] = _cpu_seconds(child)
        except psutil.Error:  # exited in between
            pass
    return out


def measure(cfg, tokenizer, batch_size: int, batches: int, warmup: int) -> dict:
    """Time `batches` batches after the first and `warmup` more: the prefetch buffers fill
    while the workers start, and this loop drains them faster than they refill, so the timed
    batches are made while timed (with too few warm-up batches, buffered ones come free)."""
    import psutil

    from rkd_jax.data import pipeline

    me = psutil.Process()
    it = pipeline.make_train_iterator(cfg, tokenizer, batch_size, seed=0)
    try:
        start = time.perf_counter()
        next(it)
        first = time.perf_counter() - start
        for _ in range(warmup):
            next(it)
        workers_before, main_before = _children_cpu(me), _cpu_seconds(me)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        seconds = time.perf_counter() - start
        main_cpu = _cpu_seconds(me) - main_before
        workers_after = _children_cpu(me)
        workers_cpu = sum(
            workers_after[pid] - cpu for pid, cpu in workers_before.items() if pid in workers_after
        )
    finally:
        it.close()
    examples = batches * batch_size
    rate = examples / seconds
    workers = int(cfg.num_workers)
    return {
        "image_size": int(cfg.image_size),
        "num_workers": workers,
        "examples_per_s": round(rate, 1),
        "examples_per_s_per_worker": round(rate / max(workers, 1), 1),
        # CPU time per example: this process (with 0 workers: all the work, on grain's read
        # threads) and the workers together (0 with no workers).
        "main_cpu_ms_per_example": round(1e3 * main_cpu / examples, 3),
        "workers_cpu_ms_per_example": round(1e3 * workers_cpu / examples, 3),
        "first_batch_s": round(first, 2),
        "seconds": round(seconds, 2),
        "batch_size": batch_size,
        "batches": batches,
        "warmup_batches": warmup,
    }


def per_worker_rate(rows: list[dict], image_size: int) -> dict | None:
    """The examples/s one grain worker delivers at `image_size`, from the 1-worker row (else the
    fewest workers above 0): the smaller of its wall-clock rate and 1 / the workers' CPU time per
    example (a worker given one core; grain's two read threads per worker can use more on an
    idle machine, a loaded one gives it less). Also this process's CPU time per example while
    workers feed it (unpacking and copying out of shared memory)."""
    rows = sorted(
        (r for r in rows if r["image_size"] == image_size and r["num_workers"] > 0),
        key=lambda r: r["num_workers"],
    )
    if not rows:
        return None
    r = rows[0]
    wall = r["examples_per_s_per_worker"]
    cpu = 1e3 / r["workers_cpu_ms_per_example"] if r["workers_cpu_ms_per_example"] > 0 else None
    return {
        "from_num_workers": r["num_workers"],
        "wall_examples_per_s": wall,
        "cpu_examples_per_s": None if cpu is None else round(cpu, 1),
        "examples_per_s": round(min(wall, cpu) if cpu else wall, 1),
        "main_cpu_ms_per_example": r["main_cpu_ms_per_example"],
    }


def workers_for(
    rate: float,
    main_cpu_ms: float,
    gpu_images_per_s: float,
    factor: float = 1.5,
    host_cores: int = 16,
    reserved_cores: int = 1,
) -> dict:
    """The arithmetic of --config.data.num_workers for a GPU step of `gpu_images_per_s`.

    target = factor x G images/s; workers N = ceil(target / r) at r examples/s per worker;
    the training process spends target x main_cpu_ms / 1000 cores unpacking their batches, and
    `reserved_cores` more drive the GPU, so N fits when N + that + reserved <= host_cores. The
    most workers a host fits: N_max = floor((host_cores - reserved) / (1 + r x main_cpu_ms /
    1000)), delivering N_max x r.
    """
    target = factor * gpu_images_per_s
    n = math.ceil(target / rate)
    main_cores = target * main_cpu_ms / 1e3
    n_max = math.floor((host_cores - reserved_cores) / (1 + rate * main_cpu_ms / 1e3))
    return {
        "gpu_images_per_s": round(gpu_images_per_s, 1),
        "target_images_per_s": round(target, 1),
        "num_workers": n,
        "main_process_cores": round(main_cores, 2),
        "cores_needed": round(n + main_cores + reserved_cores, 2),
        "fits_host": n + main_cores + reserved_cores <= host_cores,
        "host_max_workers": n_max,
        "host_max_images_per_s": round(n_max * rate, 1),
    }


def phase_seconds(
    loader: float,
    step: float,
    infer: float,
    epochs: int,
    batch_size: int,
    eval_every_epochs: int = 1,
    train_objects: int = REFCOCO_TRAIN_OBJECTS,
    eval_sentences: dict | None = None,
) -> dict:
    """One training phase: epochs x (objects // batch) x batch images at min(loader, step)
    images/s, plus validation of val's expressions every `eval_every_epochs` and the final
    scoring of every evaluation split, at min(loader, infer) sentences/s. Compile time,
    checkpoints and start-up are not counted."""
    sentences = eval_sentences or REFCOCO_EVAL_SENTENCES
    images = epochs * (train_objects // batch_size) * batch_size
    train_s = images / min(loader, step)
    evals = epochs // eval_every_epochs
    eval_s = (evals * sentences["val"] + sum(sentences.values())) / min(loader, infer)
    return {
        "images": images,
        "train_s": round(train_s),
        "eval_s": round(eval_s),
        "total_h": round((train_s + eval_s) / 3600, 2),
    }


def _gpu_rates(path: Path) -> dict:
    """{'device', 'distill': {batch: images/s}, 'infer': {batch: images/s}} of a step.py run."""
    res = json.loads(path.read_text())
    rates = {"device": res.get("device"), "distill": {}, "infer": {}}
    for r in res.get("jax", []):
        if r.get("kind") in ("distill", "infer"):
            rates[r["kind"]][int(r["batch"])] = float(r["images_per_s"])
    if not rates["distill"]:
        raise ValueError(f"{path}: no distill rows (expected benchmarks/step.py's --out JSON)")
    return rates


def plan(rows: list[dict], gpu_results: Path, factor: float, host_cores: int) -> dict | None:
    """The paper run's grain workers and student-phase wall time from the measured rows."""
    from rkd_jax import config_loader

    paper = config_loader.load_config_file("distill:paper")
    size, batch = int(paper.data.image_size), int(paper.train.batch_size)
    r = per_worker_rate(rows, size)
    if r is None:
        return None
    gpu = _gpu_rates(gpu_results)
    step_paper = gpu["distill"].get(batch)
    step_max = max(gpu["distill"].values())
    infer = gpu["infer"].get(batch, min(gpu["infer"].values(), default=float("inf")))
    rate, main_ms = r["examples_per_s"], r["main_cpu_ms_per_example"]
    choices = {
        "at_fastest_step": workers_for(rate, main_ms, step_max, factor, host_cores),
    }
    if step_paper is not None:
        choices[f"at_batch_{batch}_step"] = workers_for(
            rate, main_ms, step_paper, factor, host_cores
        )
    # The fastest step's target if the host fits it, else the paper batch's, else the most
    # workers the host fits.
    fitting = [c for c in choices.values() if c["fits_host"]]
    chosen = (
        fitting[0]["num_workers"] if fitting else choices["at_fastest_step"]["host_max_workers"]
    )
    loader = chosen * rate
    out = {
        "image_size": size,
        "per_worker": r,
        "gpu_results": str(
            gpu_results.relative_to(ROOT) if gpu_results.is_relative_to(ROOT) else gpu_results
        ),
        "gpu_device": gpu["device"],
        "factor": factor,
        "host_cores": host_cores,
        "workers": choices,
        "chosen_num_workers": chosen,
        "loader_images_per_s": round(loader, 1),
    }
    if step_paper is not None:
        out["student_phase"] = {
            "step_images_per_s": round(step_paper, 1),
            "batch_size": batch,
            "epochs": int(paper.train.epochs),
            **phase_seconds(
                loader,
                step_paper,
                infer,
                int(paper.train.epochs),
                batch,
                int(paper.run.eval_every_epochs),
            ),
        }
        out["teacher_phase"] = teacher_phase(
            loader, step_paper, infer, int(paper.teacher_train.epochs), batch, paper
        )
    return out


def teacher_phase(
    loader: float, distill_step: float, student_infer: float, epochs: int, batch: int, paper
) -> dict:
    """The teacher's training phase, estimated: benchmarks/step.py times the distillation step
    and the student's inference, not the teacher's training step. At the distillation step's
    useful FLOP rate (DISTILL_GFLOP_PER_IMAGE x its images/s), a teacher training step of
    3 x TEACHER_FORWARD_GFLOP per image runs at distill x 184 / 226.5 images/s, and the
    teacher's inference at the student's x 34.7 / 75.5."""
    step = distill_step * DISTILL_GFLOP_PER_IMAGE / (3 * TEACHER_FORWARD_GFLOP)
    infer = student_infer * STUDENT_FORWARD_GFLOP / TEACHER_FORWARD_GFLOP
    return {
        "estimated": True,
        "step_images_per_s": round(step, 1),
        "infer_images_per_s": round(infer, 1),
        "batch_size": batch,
        "epochs": epochs,
        **phase_seconds(loader, step, infer, epochs, batch, int(paper.run.eval_every_epochs)),
    }


def machine() -> dict:
    import grain
    import numpy as np
    import PIL
    import psutil
    from PIL import features

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu or host_platform.processor(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": host_platform.platform(),
        "python": host_platform.python_version(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "grain": getattr(grain, "__version__", "?"),
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--refer-root", default="", help="REFER root; empty: the embedded dataset")
    p.add_argument("--dataset", default="refcoco")
    p.add_argument("--split-by", default="unc")
    p.add_argument("--data-dir", default="", help="TFDS data_dir (default: the rkd_jax cache)")
    p.add_argument("--synthetic-num-images", type=int, default=5000)
    p.add_argument(
        "--jpeg-size",
        type=jpeg_size,
        default=None,
        help="re-encode the embedded dataset's images at WxH (COCO: 640x480) before timing",
    )
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument(
        "--jpeg-noise",
        type=float,
        default=22.0,
        help="std of the Gaussian pixel noise added (22: ~160 KB at 640x480 q90, COCO's mean)",
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[384, 96])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=30, help="timed batches per setting")
    p.add_argument(
        "--warmup",
        type=int,
        default=8,
        help="untimed batches after the first, to drain the prefetch buffers (grain keeps 2 per "
        "worker and 2 read-ahead)",
    )
    p.add_argument("--gpu-results", type=Path, default=GPU_RESULTS)
    p.add_argument("--factor", type=float, default=1.5, help="loader / GPU step speed wanted")
    p.add_argument("--host-cores", type=int, default=16, help="cores of the GPU host")
    p.add_argument("--json", default="", help="also write the results to this file")
    args = p.parse_args(argv)
    if args.jpeg_size and args.refer_root:
        p.error("--jpeg-size re-encodes the embedded dataset; it does not apply to --refer-root")
    if not 1 <= args.jpeg_quality <= 95:
        p.error(f"--jpeg-quality {args.jpeg_quality}: expected 1..95")
    if min(args.workers) < 0 or args.warmup < 0:
        p.error("--workers and --warmup: expected numbers >= 0")
    if min(args.sizes) < 1 or args.batches < 1 or args.batch_size < 1:
        p.error("--sizes, --batches and --batch-size: expected numbers >= 1")
    if not args.gpu_results.is_file():
        p.error(f"--gpu-results {args.gpu_results}: no such file")

    from rkd_jax.data import prepare, tokenizer
    from rkd_jax.pretrained import default_text_encoder_dir

    load_start = os.getloadavg()
    start = time.perf_counter()
    root, source = args.refer_root, {"kind": "refer", "root": Path(args.refer_root).name}
    if not root:
        generated = prepare.ensure_synthetic(0, args.synthetic_num_images)
        source = {"kind": "embedded", "seed": 0, "num_images": args.synthetic_num_images}
        if args.jpeg_size:
            coco, summary = coco_sized_root(
                generated, args.dataset, *args.jpeg_size, args.jpeg_noise, args.jpeg_quality
            )
            root, source = str(coco), {**source, "reencoded": summary}
    data_dir, name = prepare.ensure_prepared(data_config(args, 96, 0, root))
    print(f"dataset {name} in {data_dir} (ready in {time.perf_counter() - start:.1f} s)")
    tokenize = functools.partial(
        tokenizer.tokenize, tokenizer.load_tokenizer(default_text_encoder_dir())
    )
    rows = []
    print(
        f"{'size':>5} {'workers':>7} {'examples/s':>11} {'per worker':>11} "
        f"{'main CPU ms/ex':>15} {'workers CPU ms/ex':>18} {'first batch':>12}"
    )
    for size in args.sizes:
        for workers in args.workers:
            cfg = data_config(args, size, workers, root)
            row = measure(cfg, tokenize, args.batch_size, args.batches, args.warmup)
            rows.append(row)
            print(
                f"{size:>5} {workers:>7} {row['examples_per_s']:>11.1f} "
                f"{row['examples_per_s_per_worker']:>11.1f} "
                f"{row['main_cpu_ms_per_example']:>15.2f} "
                f"{row['workers_cpu_ms_per_example']:>18.2f} {row['first_batch_s']:>10.2f} s"
            )
    the_plan = plan(rows, args.gpu_results, args.factor, args.host_cores)
    if the_plan:
        print_plan(the_plan)
    if args.json:
        shown = [
            os.path.relpath(a, ROOT) if a.startswith(str(ROOT)) else a for a in argv
        ]  # the command line without this machine's checkout path
        result = {
            "benchmark": "data_pipeline",
            "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(["data_pipeline.py", *shown]),
            "dataset": name,
            "source": source,
            "host": {**machine(), "load_start": load_start, "load_end": os.getloadavg()},
            "results": rows,
            "plan": the_plan,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return 0


def print_plan(pl: dict) -> None:
    r = pl["per_worker"]
    print(
        f"per-worker rate at {pl['image_size']} px: r = {r['examples_per_s']} examples/s "
        f"(wall {r['wall_examples_per_s']}, 1/CPU {r['cpu_examples_per_s']}, from "
        f"{r['from_num_workers']} worker(s)); this process {r['main_cpu_ms_per_example']} ms "
        "CPU per example"
    )
    for what, c in pl["workers"].items():
        print(
            f"  {what}: {pl['factor']} x {c['gpu_images_per_s']} = {c['target_images_per_s']} "
            f"images/s -> ceil({c['target_images_per_s']} / {r['examples_per_s']}) = "
            f"{c['num_workers']} workers, {c['cores_needed']} of {pl['host_cores']} cores "
            f"({'fits' if c['fits_host'] else 'does not fit'}; the host fits at most "
            f"{c['host_max_workers']} workers = {c['host_max_images_per_s']} images/s)"
        )
    print(
        f"  chosen num_workers = {pl['chosen_num_workers']} ({pl['loader_images_per_s']} images/s)"
    )
    s = pl.get("student_phase")
    if s:
        print(
            f"  student phase: {s['images']} images at min({pl['loader_images_per_s']}, "
            f"{s['step_images_per_s']}) images/s = {s['train_s']} s + validation {s['eval_s']} s"
            f" = {s['total_h']} h"
        )
    t = pl.get("teacher_phase")
    if t:
        print(
            f"  teacher phase (estimated from the FLOP convention: a training step at "
            f"{t['step_images_per_s']} images/s, inference at {t['infer_images_per_s']}): "
            f"{t['images']} images = {t['train_s']} s + validation {t['eval_s']} s = "
            f"{t['total_h']} h"
        )
        print(f"  one teacher and one student phase: {round(t['total_h'] + s['total_h'], 2)} h")


if __name__ == "__main__":
    sys.exit(main())
