"""Mesh, shardings and host->device batch placement (the only module that builds a mesh).

One mesh over all devices with a single `data` axis: batches are split over it, parameters
and optimizer state are replicated, so BatchNorm statistics computed under jit are those of
the global batch. Multi-process runs (jax.distributed, started from explicit flags or found in
a multi-task Slurm or Open MPI job; docs/distributed.md) feed each process's own rows.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
log = logging.getLogger("rkd_jax")


# What `jax.distributed.initialize()` reads to configure itself under each launcher (jax's
# clusters.SlurmCluster and OmpiCluster).
_SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)
_OMPI_URI = "OMPI_MCA_orte_hnp_uri"


@dataclasses.dataclass(frozen=True)
class ClusterJob:
    """One process of a multi-process job started by a cluster launcher.

    `auto`: `jax.distributed.initialize()` without arguments finds the coordinator, the process
    count and this process's index by itself (False: the launcher is recognised, but JAX cannot
    find the coordinator from its environment).
    """

    launcher: str  # 'slurm' | 'openmpi'
    num_processes: int
    process_id: int
    auto: bool


def _count(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env.get(name, ""))
    except ValueError:
        return 0


def cluster_job(env: Mapping[str, str]) -> ClusterJob | None:
    """The multi-process job `env` (an environment mapping) belongs to, or None.

    Slurm: a step of more than one task launched by srun (every variable of _SLURM_VARS set,
    SLURM_NTASKS > 1). A batch script's own process is not one: it is a single task, and
    SLURM_STEP_NUM_TASKS, where set, says so. Open MPI: mpirun/mpiexec with
    OMPI_COMM_WORLD_SIZE > 1; JAX finds the coordinator from OMPI_MCA_orte_hnp_uri, which
    Open MPI 5 no longer sets (auto False then).
    """
    if all(k in env for k in _SLURM_VARS) and _count(env, "SLURM_NTASKS") > 1:
        step_tasks = env.get("SLURM_STEP_NUM_TASKS")
        if step_tasks is None or _count(env, "SLURM_STEP_NUM_TASKS") > 1:
            return ClusterJob(
                "slurm", _count(env, "SLURM_NTASKS"), _count(env, "SLURM_PROCID"), True
            )
    if _count(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return ClusterJob(
            "openmpi",
            _count(env, "OMPI_COMM_WORLD_SIZE"),
            _count(env, "OMPI_COMM_WORLD_RANK"),
            _OMPI_URI in env,
        )
    return None


def initialize_distributed(
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    env: Mapping[str, str] | None = None,
) -> str:
    """Start jax.distributed when this process is one of several; returns how it was started:
    'flags', 'slurm', 'openmpi', or '' (a single process, or already initialised).

    An explicit coordinator (the arguments, or RKD_JAX_COORDINATOR, RKD_JAX_NUM_PROCESSES,
    RKD_JAX_PROCESS_ID) wins; otherwise a multi-task Slurm or Open MPI job (`cluster_job`)
    calls `jax.distributed.initialize()` without arguments and JAX reads the cluster itself.
    On CPU the collectives go through gloo.
    """
    env = os.environ if env is None else env
    if jax.distributed.is_initialized():
        return ""
    coordinator_address = coordinator_address or env.get("RKD_JAX_COORDINATOR", "")
    if coordinator_address:
        num_processes = num_processes or int(env.get("RKD_JAX_NUM_PROCESSES", "1"))
        if process_id < 0:
            process_id = int(env.get("RKD_JAX_PROCESS_ID", "0"))
        _collectives_for(env)
        log.info(
            "jax.distributed: process %d of %d, coordinator %s (explicit)",
            process_id,
            num_processes,
            coordinator_address,
        )
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
        return "flags"
    job = cluster_job(env)
    if job is None:
        return ""
    if not job.auto:
        raise ValueError(
            f"{job.launcher} job of {job.num_processes} processes, but JAX cannot find its "
            f"coordinator from the environment ({_OMPI_URI} is unset, as under Open MPI 5): "
            "pass --coordinator_address=HOST:PORT (a port free on the host of process 0), "
            f"--num_processes={job.num_processes} and --process_id=$OMPI_COMM_WORLD_RANK"
        )
    _collectives_for(env)
    log.info(
        "jax.distributed: %s job, process %d of %d; jax.distributed.initialize() finds the "
        "coordinator",
        job.launcher,
        job.process_id,
        job.num_processes,
    )
    jax.distributed.initialize()
    return job.launcher


def _collectives_for(env: Mapping[str, str]) -> None:
    if env.get("JAX_PLATFORMS", "") == "cpu" or not _has_accelerator_plugin():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


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


def set_mesh(mesh: jax.sharding.Mesh):
    """Context manager making `mesh` the current one (`jax.set_mesh`; `use_mesh` on older jax)."""
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    return jax.sharding.use_mesh(mesh)


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
    """Place a pytree on every device of the mesh (parameters, optimizer state, tables).

    With several processes every one must pass the same values. Arrays already on one of this
    process's devices (restored variables) go through the host first: moving a device array to
    another process's devices is a cross-host transfer the CPU and GPU backends refuse, while
    host values are placed by each process on its own devices.
    """
    if jax.process_count() > 1:
        tree = jax.tree.map(
            lambda x: np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_addressable else x,
            tree,
        )
    return jax.device_put(tree, replicated(mesh))
