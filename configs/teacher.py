"""Train the teacher alone (fully supervised): configs/distill.py with mode=teacher.

Same variants as configs/distill.py (tiny, lite0, paper, paper_b0); the teacher is
config.teacher, its schedule config.teacher_train.
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "rkd_distill_config", Path(__file__).with_name("distill.py")
)
_distill = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_distill)


def get_config(arg: str = ""):
    config = _distill.get_config(arg)
    config.mode = "teacher"  # train the teacher only
    return config
