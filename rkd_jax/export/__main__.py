"""`python -m rkd_jax.export ...` (see rkd_jax.export)."""

import sys

from rkd_jax import platform
from rkd_jax.export.command import main

if __name__ == "__main__":
    platform.configure_cpu_flags()
    sys.exit(main())
