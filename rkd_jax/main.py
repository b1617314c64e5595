"""Command line: `python -m rkd_jax.main --config=distill --workdir=DIR`.

--config names a config shipped with rkd_jax (distill, teacher, student) or a config file
(configs/distill.py), either with :VARIANT (distill:paper); see rkd_jax.config_loader.

--mode=train (default) trains what config.mode says (teacher first when distilling without
a teacher_checkpoint) and then scores every config.data.eval_splits; --mode=eval only scores
the run in --workdir, through `rkd_jax.evaluate`: the model, image size, token limit and
threshold from its checkpoint, data settings from --config.data.* overrides. Bad input ends
with one line naming the problem and exit code 2.
"""

from __future__ import annotations

import logging
import os
import sys

from rkd_jax import platform

if __name__ == "__main__":
    platform.reexec_with_hugepage_malloc()

_cpu_flags = platform.configure_cpu_flags_for_cpu_backend()

from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from rkd_jax import cli, config_loader

if __name__ == "__main__":
    # Before the config flag is defined (which applies sys.argv's overrides to the default).
    sys.argv[1:] = config_loader.last_override_wins(sys.argv[1:])


def _without_traceback(message: str) -> str:
    """absl quotes a failing config file's whole traceback: keep the words and the last line."""
    head, sep, tail = message.partition("Traceback (most recent call last)")
    return f"{head.strip()} {tail.strip().splitlines()[-1]}" if sep else message


def _unknown_field(argv: list[str], error: BaseException) -> str:
    name = str(error.args[0] if error.args else error).strip("\"'")
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    named = [o for o in overrides if o.split(".")[-1] == name] or overrides
    which = named[0] if named else f"--config.{name}"
    return (
        f"{which}: the configuration has no field {name!r} (configs/distill.py documents every "
        "field)"
    )


class _NamedConfigParser(flags.ArgumentParser):
    """ml_collections' config-file parser, reached through a name: --config=distill:paper reads
    the shipped configs/distill.py (rkd_jax.configs), a file path is read as it is given."""

    def __init__(self, file_parser: flags.ArgumentParser):
        self._file_parser = file_parser

    def parse(self, argument):
        return self._file_parser.parse(config_loader.resolve_config_spec(argument))

    def flag_type(self) -> str:
        return self._file_parser.flag_type()


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    None,
    "Config: a name shipped with rkd_jax (distill, teacher, student) or a config file "
    "(configs/distill.py), either followed by :VARIANT (distill:paper).",
    lock_config=True,
)
FLAGS["config"].parser = _NamedConfigParser(FLAGS["config"].parser)
try:
    # The default goes through the named parser (it is a name, valid from any directory).
    FLAGS.set_default("config", config_loader.DEFAULT)
except (AttributeError, KeyError) as e:
    # ml_collections applies the command line's --config.<field> overrides to the default
    # config here, at definition: an unknown field fails before flag parsing.
    if __name__ != "__main__":
        raise
    sys.exit(cli.report(_unknown_field(sys.argv, e)))
except OSError as e:
    # The shipped configs are missing (a broken install): one line, not an import traceback.
    if __name__ != "__main__":
        raise
    sys.exit(cli.report(e))
flags.DEFINE_string("workdir", "runs/distill", "Run directory (checkpoints, logs, results).")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (then evaluate) or eval only.")
flags.DEFINE_string("coordinator_address", "", "jax.distributed coordinator host:port.")
flags.DEFINE_integer("num_processes", 0, "Number of processes (jax.distributed).")
flags.DEFINE_integer("process_id", -1, "This process's index (jax.distributed).")


def _main(argv) -> int:
    del argv
    import jax

    from rkd_jax import checkpoint, config_check, parallel, train

    parallel.initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    config = FLAGS.config
    config_check.validate_config(config)
    workdir = Path(FLAGS.workdir).absolute()
    for what, batch in (
        ("config.train.batch_size", config.train.batch_size),
        ("config.teacher_train.batch_size", config.teacher_train.batch_size),
        ("config.run.eval_batch_size", config.run.eval_batch_size),
    ):
        parallel.check_batch_size(int(batch), what)
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
    if FLAGS.mode == "train":
        # One training process per run directory (process 0 of a multi-process job holds it).
        lock = checkpoint.RunLock(workdir) if jax.process_index() == 0 else None
        if lock:
            lock.acquire()
        try:
            train.train_and_evaluate(config, workdir)
        finally:
            if lock:
                lock.release()
    else:
        # The checkpoint decides the model; the command line only the data (see rkd_jax.evaluate).
        from rkd_jax import evaluate

        settings = evaluate.command_line_settings(
            config, config_flags.get_override_values(FLAGS["config"]), FLAGS["config"].present
        )
        evaluate.evaluate_checkpoint(workdir, settings=settings)
    return 0


def main(argv) -> int:
    """absl's main: logging set up, then the command; a user error is one line, exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    return cli.run(_main, argv)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with the error contract: a bad flag, an unknown --config.field or a
    config file that does not load is one `error:` line and exit code 2 (absl prints usage)."""
    try:
        rest = FLAGS(argv)  # sys.argv, its overrides already made unique at import
        FLAGS.config  # noqa: B018 (loads the config file now, before any import or work)
        return rest
    except flags.Error as e:
        sys.exit(cli.report(_without_traceback(str(e))))
    except (AttributeError, KeyError) as e:
        # ml_collections' answer to an override of a field the config does not have.
        sys.exit(cli.report(_unknown_field(argv, e)))
    except cli.user_errors() as e:
        sys.exit(cli.report(_without_traceback(str(e))))


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
