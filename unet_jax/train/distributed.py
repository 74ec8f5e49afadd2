"""One run as several processes (one per host, or several on one machine) with
``jax.distributed``.

Launch: the coordinator address, the process count and this process's id come from the
CLI's flags or JAX's own environment variables (``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``); with none of them, JAX's cluster detection
(SLURM, Open MPI, Kubernetes, TPU pods) finds them. CPU processes talk through Gloo.

What the training loop does with several processes (unet_jax.train.loop):

* every process builds the same split; each puts only its own share of the training
  images (rows ``[p N / P, (p + 1) N / P)``) on its devices, and the global batch drawn
  from the sharded array is the one a single process would draw;
* process 0 alone writes the run folder's files (config, split, logs, TensorBoard,
  results, plots); every process takes part in Orbax's checkpoint saves (Orbax writes
  replicated arrays once, from the primary host);
* decisions taken from the host clock (the time cap) are process 0's, broadcast;
* a process that stops (killed, crashed) makes the others' next collective fail: they
  stop with :class:`PeerLost`, whose message says what is kept and how to resume.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

__all__ = [
    "Launch",
    "PeerLost",
    "launch_from",
    "initialize",
    "is_primary",
    "sync",
    "agree",
    "to_host",
    "is_peer_failure",
    "ENV_VARS",
]

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


class PeerLost(RuntimeError):
    """Another process of a multi-process run stopped; this one cannot go on alone."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """Where the coordinator listens (``host:port``, the same for every process), how many
    processes the run has, and which one this is (``0 <= process_id < num_processes``)."""

    coordinator: str
    num_processes: int
    process_id: int


def launch_from(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> Launch | None:
    """The launch given by flags, else by JAX's environment variables; ``None`` when neither
    gives any (then :func:`initialize` leaves it to JAX's cluster detection). Giving some
    but not all three is a ``ValueError`` naming the missing ones."""
    environ = os.environ if environ is None else environ
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    for (field, value), var in zip(list(given.items()), ENV_VARS):
        if value is None and environ.get(var) not in (None, ""):
            given[field] = environ[var]
    if all(v is None for v in given.values()):
        return None
    flags = {
        "coordinator": "--coordinator / JAX_COORDINATOR_ADDRESS",
        "num_processes": "--num-processes / JAX_NUM_PROCESSES",
        "process_id": "--process-id / JAX_PROCESS_ID",
    }
    missing = [flags[k] for k, v in given.items() if v is None]
    if missing:
        raise ValueError(
            f"a multi-process launch needs all of coordinator, process count and process id; "
            f"missing {', '.join(missing)}"
        )
    address = str(given["coordinator"])
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator {address!r}: expected host:port (e.g. 10.0.0.1:12355)")
    count, index = _integer("process count", given["num_processes"]), _integer("process id", given["process_id"])
    if count < 1:
        raise ValueError(f"process count {count}: expected at least 1")
    if not 0 <= index < count:
        raise ValueError(f"process id {index}: expected 0 <= id < {count} (the process count)")
    return Launch(address, count, index)


def _integer(what: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {value!r}: expected an integer") from None


def initialize(launch: Launch | None = None, heartbeat_timeout_s: int = 100) -> None:
    """``jax.distributed.initialize`` for ``launch`` (``None``: JAX's cluster detection).
    Must run before anything else touches a JAX backend; a second call does nothing.

    ``heartbeat_timeout_s``: how long the coordinator waits for a silent process before
    declaring it dead (a killed process is usually noticed sooner, by the next collective).
    """
    if jax.distributed.is_initialized():
        return
    # CPU processes need a collectives implementation to form one mesh (GPUs use NCCL).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if launch is None:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
    else:
        jax.distributed.initialize(
            launch.coordinator, launch.num_processes, launch.process_id, heartbeat_timeout_seconds=heartbeat_timeout_s
        )


def is_primary() -> bool:
    """The process that writes the run folder's files."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait until every process reaches the point called ``name`` (one process: no-op)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def agree(value: bool) -> bool:
    """Process 0's ``value`` on every process (a host-side decision, e.g. from the clock,
    that all processes must take alike or their collectives would wait on each other)."""
    if jax.process_count() == 1:
        return value
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(value, np.bool_)))


def to_host(tree: Any) -> Any:
    """NumPy copies of a tree of arrays. A replicated array that spans other processes'
    devices (not fully addressable) is read from this process's own copy."""

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError(
                    f"array of shape {x.shape} is sharded across processes; expected a replicated "
                    f"array (gather it first)"
                )
            return np.asarray(x.addressable_data(0))
        return jax.device_get(x)

    return jax.tree.map(one, tree)


# Messages of a collective whose peer went away (Gloo over TCP on CPU, the coordination
# service everywhere).
_PEER_SIGNS = (
    "gloo",
    "connection reset",
    "connection closed",
    "heartbeat",
    "unavailable",
    "socket closed",
    "broken pipe",
    "coordination service",
)


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err`` (raised by a JAX computation) says another process went away."""
    text = f"{type(err).__name__}: {err}".lower()
    return jax.process_count() > 1 and any(sign in text for sign in _PEER_SIGNS)
