"""Many processes, one job (docs/design.md "Many machines"): start-up of JAX's multi-controller
runtime, the global ("runs", "data") device mesh, placement of host arrays on it and the host
gathers that let every process take the same decisions from the same numbers.

Every process runs the same program (SPMD): the same fit loop, the same device calls, the same
host-side bookkeeping on numbers gathered from all processes. Only the primary process (0)
writes reports and shows progress; Orbax checkpoints are written by all processes together.
Without `initialize` (one process) every function here reduces to the single-process case.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

RUNS, AXIS = "runs", "data"


class DistributedError(RuntimeError):
    """Processes that cannot work together: no coordinator, or data that differ between them."""


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 120,
               heartbeat_timeout_s: int = 30) -> None:
    """Join the job: `jax.distributed.initialize` with explicit coordinator address, process
    count and id, or, when all three are None, what it detects by itself (SLURM, Open MPI and
    other cluster environments). Must run before any other JAX call.

    `timeout_s` bounds the wait for the coordinator and the other processes at start-up;
    `heartbeat_timeout_s` how long a process may go silent before the job declares it lost and
    the surviving processes stop with an error (no process waits forever for a dead peer).
    Raises DistributedError naming the coordinator when start-up fails."""
    given = (coordinator, num_processes, process_id)
    if any(v is not None for v in given) and any(v is None for v in given):
        raise DistributedError("--coordinator, --num-processes and --process-id go together "
                               "(or none of them: detected from the cluster environment)")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=int(timeout_s),
                                   heartbeat_timeout_seconds=int(heartbeat_timeout_s))
    except Exception as e:  # JAX raises several types here; all of them are fatal
        where = coordinator or "the coordinator of the cluster environment"
        raise DistributedError(f"cannot join the job at {where} as process "
                               f"{process_id if process_id is not None else '(detected)'} within "
                               f"{timeout_s} s: {type(e).__name__}: {e}") from e


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_primary() -> bool:
    """Whether this process writes the reports (process 0)."""
    return jax.process_index() == 0


def global_devices() -> list:
    """Every process's devices, ordered by (process, device id): consecutive devices share a
    process, so a mesh reshaped from this order keeps its last axis inside a process."""
    return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def mesh_shape(n_runs: int, n_devices: int, parallel: str, run_devices: int | None = None,
               n_processes: int = 1) -> tuple[int, int]:
    """(R, D): devices along "runs" and "data". pmap (one process only): R = 1. shard_map:
    `run_devices`, else the largest R dividing the run count and the device count such that "data"
    groups stay inside a process when the runs allow it (R a multiple of the process count):
    populations then train without gradient traffic between processes; a single run (or any R
    below the process count) is data-parallel across processes."""
    if parallel == "pmap":
        if n_processes > 1:
            raise ValueError("--parallel pmap runs in one process; with several processes use "
                             "--parallel shard_map (the multi-process path)")
        if run_devices not in (None, 1):
            raise ValueError("pmap maps the devices onto 'data' only: run_devices must be 1")
        return 1, n_devices
    r = math.gcd(n_runs, n_devices) if run_devices is None else run_devices
    if r < 1 or n_devices % r or n_runs % r:
        raise ValueError(f"run_devices={r} must divide both the device count {n_devices} and "
                         f"the number of runs {n_runs}")
    return r, n_devices // r


def build_mesh(devices, r: int, d: int) -> Mesh:
    """The ("runs", "data") mesh of `devices` (in `global_devices` order) as R x D."""
    return Mesh(np.array(devices).reshape(r, d), (RUNS, AXIS))


def put(tree: Any, sharding: NamedSharding) -> Any:
    """Host arrays (the same values on every process) -> global arrays with `sharding`: each
    process places only the shards its own devices hold."""
    def one(x):
        x = np.asarray(x)
        if sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(one, tree)


def fetch(tree: Any) -> Any:
    """Global (or local) arrays -> host NumPy arrays of the whole value on every process: a
    `device_get` in one process, an all-gather across processes otherwise."""
    leaves = jax.tree_util.tree_leaves(tree)
    if all(getattr(x, "is_fully_addressable", True) for x in leaves):
        return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
    from jax.experimental import multihost_utils

    return jax.tree_util.tree_map(
        lambda x: np.asarray(x) if getattr(x, "is_fully_addressable", True)
        else np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def barrier(name: str) -> None:
    """Wait until every process reached `name` (no-op in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(value: int) -> int:
    """Process 0's value of a small integer, on every process (itself in one process): for
    decisions a process would otherwise take from its own clock or file listing (when to save a
    checkpoint, which checkpoint steps exist), so that all processes call the same collectives."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))


def agree_steps(steps, most: int = 64) -> list[int]:
    """Process 0's list of (at most `most`) non-negative integers, on every process."""
    if jax.process_count() == 1:
        return [int(s) for s in steps]
    from jax.experimental import multihost_utils

    steps = sorted(int(s) for s in steps)[-most:]
    padded = np.full(most, -1, np.int64)
    padded[: len(steps)] = steps
    return [int(s) for s in multihost_utils.broadcast_one_to_all(padded) if s >= 0]


def check_same_data(sha256: str | None, source: str) -> None:
    """Stop with a DistributedError when the processes loaded different data: the sha256 of each
    process's file (or, for synthetic data, of its source recipe) is gathered and compared."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = hashlib.sha256((sha256 or source).encode()).digest()
    mine = np.frombuffer(digest, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine))  # [processes, 32]
    differ = [i for i in range(every.shape[0]) if not np.array_equal(every[i], every[0])]
    if differ:
        raise DistributedError(
            f"the processes loaded different data: process(es) {differ} differ from process 0 "
            f"(this process, {jax.process_index()}, read {source} with sha256 {sha256}); give "
            "every process the same file (a shared disk or identical copies)")
