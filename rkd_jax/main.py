"""Command line: `python -m rkd_jax.main --config=configs/distill.py --workdir=DIR`.

--mode=train (default) trains what config.mode says (teacher first when distilling without
a teacher_checkpoint) and then scores every config.data.eval_splits; --mode=eval only scores
the run in --workdir. Bad input ends with one line naming the problem and exit code 2.
"""

from __future__ import annotations

import logging
import os
import sys

from rkd_jax import platform

if __name__ == "__main__":
    platform.reexec_with_hugepage_malloc()

_cpu_flags = (
    platform.configure_cpu_flags() if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu") else []
)

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    "configs/distill.py",
    "Config file (configs/distill.py[:variant]).",
    lock_config=True,
)
flags.DEFINE_string("workdir", "runs/distill", "Run directory (checkpoints, logs, results).")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (then evaluate) or eval only.")
flags.DEFINE_string("coordinator_address", "", "jax.distributed coordinator host:port.")
flags.DEFINE_integer("num_processes", 0, "Number of processes (jax.distributed).")
flags.DEFINE_integer("process_id", -1, "This process's index (jax.distributed).")


def _main(argv) -> int:
    del argv
    import jax

    from rkd_jax import parallel, train

    parallel.initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    log = logging.getLogger("rkd_jax")
    log.info("versions: %s", train.versions())
    log.info(
        "devices: %s (process %d of %d), backend %s",
        jax.devices(),
        jax.process_index(),
        jax.process_count(),
        jax.default_backend(),
    )
    log.info("XLA CPU flags added: %s", _cpu_flags or "none")
    log.info("GLIBC_TUNABLES: %s", os.environ.get("GLIBC_TUNABLES") or "unset")
    config = FLAGS.config
    if FLAGS.mode == "train":
        train.train_and_evaluate(config, FLAGS.workdir)
    else:
        from pathlib import Path

        from rkd_jax.data import prepare

        prepare.ensure_prepared(config.data)
        role = "teacher" if config.mode == "teacher" else "student"
        mesh = parallel.make_mesh()
        with train._set_mesh(mesh):
            train.evaluate_run(
                config, Path(FLAGS.workdir).absolute(), role, config.data.eval_splits, mesh
            )
    return 0


def main(argv) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        return _main(argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _user_errors():
    from rkd_jax.checkpoint import CheckpointError
    from rkd_jax.convert.common import ConversionError

    return (
        ValueError,
        FileNotFoundError,
        CheckpointError,
        ConversionError,
        KeyError,
        FloatingPointError,
    )


USER_ERRORS = _user_errors()

if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
