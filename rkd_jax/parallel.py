"""Mesh, shardings and host->device batch placement (the only module that builds a mesh).

One mesh over all devices with a single `data` axis: batches are split over it, parameters
and optimizer state are replicated, so BatchNorm statistics computed under jit are those of
the global batch. Multi-process runs (jax.distributed) feed each process's own rows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(
    coordinator_address: str = "", num_processes: int = 0, process_id: int = -1
) -> None:
    """Start jax.distributed when a coordinator is given (flags or RKD_JAX_COORDINATOR,
    RKD_JAX_NUM_PROCESSES, RKD_JAX_PROCESS_ID). On CPU the collectives go through gloo."""
    coordinator_address = coordinator_address or os.environ.get("RKD_JAX_COORDINATOR", "")
    if not coordinator_address:
        return
    num_processes = num_processes or int(os.environ.get("RKD_JAX_NUM_PROCESSES", "1"))
    if process_id < 0:
        process_id = int(os.environ.get("RKD_JAX_PROCESS_ID", "0"))
    if os.environ.get("JAX_PLATFORMS", "") == "cpu" or not _has_accelerator_plugin():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )


def _has_accelerator_plugin() -> bool:
    import importlib.util

    return any(
        importlib.util.find_spec(name) is not None
        for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12")
    )


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh over every device of every process, axis `data` (Auto axis type)."""
    n = jax.device_count()
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is not None:
        return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(axis_type.Auto,))
    return jax.make_mesh((n,), (DATA_AXIS,))


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, what: str = "batch_size") -> None:
    """The global batch must split evenly over processes and devices."""
    n = jax.device_count()
    if global_batch % n:
        raise ValueError(
            f"{what}={global_batch} does not split over {n} devices; use a multiple of {n}"
        )


def put_batch(batch: Mapping[str, Any], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Host numpy batch (this process's rows) -> global arrays sharded on `data`.

    Non-array entries (lists such as original-size masks) stay on the host and are dropped.
    """
    sharding = data_sharding(mesh)
    out = {}
    for k, v in batch.items():
        if isinstance(v, np.ndarray):
            out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Place a pytree on every device of the mesh (parameters, optimizer state, tables)."""
    return jax.device_put(tree, replicated(mesh))
