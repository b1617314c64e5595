"""When jax.distributed starts: explicit flags, a multi-task Slurm step, an Open MPI job."""

import pytest

from rkd_jax import parallel
from rkd_jax.parallel import ClusterJob, cluster_job

# srun -N2 --ntasks-per-node=1: what Slurm sets in each task (process 1 shown).
SRUN = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_NODELIST": "gpu[01-02]",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
}
# mpirun -np 4 under Open MPI 4 (process 3).
MPIRUN = {
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_RANK": "3",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911",
}


def without(env: dict, *names: str) -> dict:
    return {k: v for k, v in env.items() if k not in names}


def test_cluster_job_from_the_environment():
    assert cluster_job({}) is None
    assert cluster_job({"HOME": "/root", "PATH": "/bin"}) is None
    assert cluster_job(SRUN) == ClusterJob("slurm", 2, 1, True)
    # One task: an ordinary single-process run inside an allocation.
    assert cluster_job(dict(SRUN, SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1")) is None
    # A batch script's own process (allocation of 2 tasks, the batch step runs 1).
    assert cluster_job(dict(SRUN, SLURM_STEP_NUM_TASKS="1")) is None
    # Not launched by srun: JAX could not find the step's nodes, so no initialisation.
    assert cluster_job(without(SRUN, "SLURM_STEP_NODELIST")) is None
    assert cluster_job(without(SRUN, "SLURM_PROCID")) is None
    assert cluster_job(without(SRUN, "SLURM_STEP_NUM_TASKS")) == ClusterJob("slurm", 2, 1, True)
    assert cluster_job(dict(SRUN, SLURM_NTASKS="two")) is None

    assert cluster_job(MPIRUN) == ClusterJob("openmpi", 4, 3, True)
    assert cluster_job(dict(MPIRUN, OMPI_COMM_WORLD_SIZE="1", OMPI_COMM_WORLD_RANK="0")) is None
    # Open MPI 5 sets no orte URI: recognised, but JAX cannot find the coordinator itself.
    assert cluster_job(without(MPIRUN, "OMPI_MCA_orte_hnp_uri")) == ClusterJob(
        "openmpi", 4, 3, False
    )


@pytest.fixture
def calls(monkeypatch):
    """jax.distributed.initialize replaced by a recorder (nothing is started)."""
    seen = []
    monkeypatch.setattr(parallel.jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(parallel.jax.distributed, "initialize", lambda **kw: seen.append(kw))
    monkeypatch.setattr(parallel, "_collectives_for", lambda env: None)
    return seen


def test_initialize_distributed_decides_from_flags_then_the_cluster(calls, caplog):
    caplog.set_level("INFO", logger="rkd_jax")
    assert parallel.initialize_distributed(env={}) == ""
    assert parallel.initialize_distributed(env=dict(SRUN, SLURM_NTASKS="1")) == ""
    assert calls == []

    assert parallel.initialize_distributed(env=SRUN) == "slurm"
    assert calls == [{}]  # no arguments: JAX reads the Slurm step itself
    assert "slurm job, process 1 of 2" in caplog.text
    assert parallel.initialize_distributed(env=MPIRUN) == "openmpi"
    assert calls == [{}, {}]

    # Explicit flags win over the cluster's environment.
    how = parallel.initialize_distributed("node0:1234", 2, 0, env=SRUN)
    assert how == "flags"
    assert calls[-1] == {"coordinator_address": "node0:1234", "num_processes": 2, "process_id": 0}
    env = dict(MPIRUN, RKD_JAX_COORDINATOR="node0:99", RKD_JAX_NUM_PROCESSES="3")
    assert parallel.initialize_distributed(env=env) == "flags"
    assert calls[-1] == {"coordinator_address": "node0:99", "num_processes": 3, "process_id": 0}

    with pytest.raises(ValueError, match="--coordinator_address=HOST:PORT"):
        parallel.initialize_distributed(env=without(MPIRUN, "OMPI_MCA_orte_hnp_uri"))
    assert len(calls) == 4


def test_an_initialised_process_is_left_alone(monkeypatch):
    monkeypatch.setattr(parallel.jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(parallel.jax.distributed, "initialize", lambda **kw: 1 / 0)
    assert parallel.initialize_distributed("node0:1234", 2, 0, env=SRUN) == ""
