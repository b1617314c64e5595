"""Regenerate the example pictures of docs/ from a trained distillation run.

    python docs/make_examples.py --run runs/default [--student-before runs/student] [--out docs]

writes, each under ~200 KB (palette PNG when the full-colour one is larger):
  demo_synthetic.png       `rkd_jax.demo` on a val image of the run's own dataset, one panel per
                           referred object of that image
  demo_photo.png           `rkd_jax.demo` on scikit-image's coffee photo (outside the training
                           data: the embedded dataset has shapes, not cups)
  attention.png            `rkd_jax.visualize`: A per word at V3..V5, teacher | student
  channel_correlation.png  `rkd_jax.visualize`: D^T D / HW of teacher and student, difference
The run directory is what `python -m rkd_jax.main --config=configs/distill.py` leaves: the
student's checkpoints, and the teacher's under teacher/.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_BYTES = 200_000
PHOTO_TEXTS = ("the white circle", "the big brown circle on the right")


def shrink(path: Path) -> int:
    """Re-save as a 256-colour palette PNG when the file is over MAX_BYTES; its final size."""
    from PIL import Image

    if path.stat().st_size > MAX_BYTES:
        with Image.open(path) as im:
            small = im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
        small.save(path, optimize=True)
    return path.stat().st_size


def val_example(run: Path, max_objects: int = 3) -> tuple[str, list[str]]:
    """A val image of the run's dataset with one sentence of each of its referred objects."""
    import ml_collections

    from rkd_jax.checkpoint import Checkpointer, find_checkpoint
    from rkd_jax.data import prepare, refer

    directory, step = find_checkpoint(run)
    ckpt = Checkpointer(directory, read_only=True)
    data = ml_collections.ConfigDict(ckpt.read_meta(step)["config"]).data
    ckpt.close()
    root = (
        Path(data.root)
        if data.root
        else prepare.ensure_synthetic(int(data.synthetic_seed), int(data.synthetic_num_images))
    )
    r = refer.load_refer(root, data.dataset, data.split_by)
    by_image: dict[int, list[dict]] = {}
    for ref in r.refs(data.val_split):
        by_image.setdefault(ref["image_id"], []).append(ref)
    image_id, refs = max(by_image.items(), key=lambda kv: (min(len(kv[1]), max_objects), -kv[0]))
    texts = [ref["sentences"][0] for ref in refs[:max_objects]]
    return str(r.image_path(image_id)), texts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="distillation run directory")
    p.add_argument("--student-before", default="", help="the student trained without teacher")
    p.add_argument("--out", default=str(ROOT / "docs"), help="output directory")
    args = p.parse_args(argv)
    from PIL import Image
    from skimage import data as skdata

    from rkd_jax import demo, platform, visualize

    platform.configure_cpu_flags_for_cpu_backend()
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image, texts = val_example(run)
    common = ["--checkpoint", str(run), "--size", "320"]
    calls = [
        (
            demo,
            common
            + ["--image", image, "--out", str(out / "demo_synthetic.png")]
            + [a for t in texts for a in ("--text", t)],
        )
    ]
    with tempfile.TemporaryDirectory() as tmp:
        photo = Path(tmp) / "coffee.jpg"
        Image.fromarray(skdata.coffee()).save(photo, quality=92)
        calls.append(
            (
                demo,
                common
                + ["--image", str(photo), "--out", str(out / "demo_photo.png")]
                + [a for t in PHOTO_TEXTS for a in ("--text", t)],
            )
        )
        vis = [
            "--teacher",
            str(run / "teacher"),
            "--student",
            str(run),
            "--image",
            image,
            "--text",
            texts[0],
            "--out-dir",
            str(out),
            "--cell",
            "80",
        ]
        if args.student_before:
            vis += ["--student-before", args.student_before]
        calls.append((visualize, vis))
        for module, argv_ in calls:
            if module.main(argv_) != 0:
                return 2
    for name in ("demo_synthetic", "demo_photo", "attention", "channel_correlation"):
        size = shrink(out / f"{name}.png")
        print(f"{out / name}.png: {size / 1000:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
