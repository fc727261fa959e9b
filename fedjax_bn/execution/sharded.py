"""The sharded executor: the client axis split over a ``jax.sharding.Mesh`` of devices.

Each device runs its block of clients with the lockstep group function under
``jax.shard_map``; aggregation is the same ``server_update``, a weighted mean over the sharded
client axis that XLA lowers to an all-reduce. A cohort whose size is not a multiple of the
device count is padded with dummy clients whose results are dropped. Placement follows the
state layout: ``FedState.server`` replicated, every leaf of ``FedState.clients`` split.

Place the per-client arrays once with :func:`place` so that rounds move no data between
devices. Several hosts (one process per host):

1. call ``jax.distributed.initialize()`` (coordinator address, process count and id come from
   the cluster environment or its arguments) before any other JAX call;
2. build the mesh over every process's devices, ``client_mesh()`` (``jax.devices()`` is
   global after initialization);
3. give each process only its clients' data and assemble global arrays with
   ``jax.make_array_from_process_local_data(client_sharding(mesh), local_block)`` (the client
   axis is split over processes in device order), but keep the clients' sizes ``train.n`` and
   labels ``train.y`` whole on every process (a round reads them on the host); replicate the
   server state with :func:`replicated`;
4. call the same round function in every process, in the same order, with the same key.

``benchmarks/multihost.py`` does all of this; ``tests/test_multihost.py`` runs it as two
processes on one machine and checks them against one process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_bn.algorithms.base import Algorithm, FedState
from fedjax_bn.data import ClientArrays
from fedjax_bn.execution.lockstep import (
    GroupRunner,
    Inputs,
    LockstepExecutor,
    Outputs,
    default_local_loop,
    run_clients,
)
from fedjax_bn.execution.loop import LocalLoop
from fedjax_bn.execution.plan import Group

if TYPE_CHECKING:
    from fedjax_bn.execution.options import RoundOptions

CLIENTS = "clients"


def client_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh named ``clients`` over ``devices`` (default: every device of every host)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (CLIENTS,))


def client_sharding(mesh: Mesh) -> NamedSharding:
    """Split the leading (client) axis over the mesh."""
    return NamedSharding(mesh, PartitionSpec(CLIENTS))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def _laid_out(state: FedState, mesh: Mesh, put: Callable[[Any, NamedSharding], Any]) -> FedState:
    split, full = client_sharding(mesh), replicated(mesh)
    return FedState(put(state.server, full), put(state.clients, split), put(state.round, full))


def place(state: FedState, train: ClientArrays, mesh: Mesh) -> tuple[FedState, ClientArrays]:
    """Put per-client arrays on their devices (client axis sharded) and global ones everywhere.

    Needs the number of clients to be a multiple of the mesh size; otherwise leave them where
    they are (each round then pads and moves them).
    """
    num = train.n.shape[0]
    if num % mesh.size:
        raise ValueError(
            f"{num} clients do not split evenly over {mesh.size} devices; pass the arrays "
            "unplaced (the round pads the cohort) or use a mesh of a divisor of the client count."
        )
    return _laid_out(state, mesh, jax.device_put), jax.device_put(train, client_sharding(mesh))


def constrain_state(state: FedState, mesh: Mesh) -> FedState:
    """Keep the new state laid out as :func:`place` lays it out."""
    return _laid_out(state, mesh, jax.lax.with_sharding_constraint)


def sharded_runner(
    mesh: Mesh, alg: Algorithm, loop: LocalLoop, chunk_size: int | None
) -> GroupRunner:
    """A group function that runs each device's block of clients with ``run_clients``."""
    spec = PartitionSpec(CLIENTS)

    def run(group: Group, server: Any, inputs: Inputs) -> Outputs:
        inputs = jax.lax.with_sharding_constraint(inputs, client_sharding(mesh))
        body = jax.shard_map(
            lambda s, i: run_clients(alg, loop, chunk_size, group, s, i),
            mesh=mesh,
            in_specs=(PartitionSpec(), spec),
            out_specs=spec,
            # Each device's clients are independent: no collectives. With check_vma=True the
            # replicated global model would be implicitly pvary'd, and jax.grad (its transpose
            # is a psum) would sum client gradients across devices.
            check_vma=False,
        )
        return body(server, inputs)

    return run


class ShardedExecutor(LockstepExecutor):
    """``sharded``: the lockstep round with each group's clients split over ``options.mesh``
    (default: every device), ``options.chunk_size`` at a time per device (default: all)."""

    def __init__(self, alg: Algorithm, options: RoundOptions) -> None:
        mesh = options.mesh or client_mesh()
        loop = options.loop or default_local_loop()
        run_group = sharded_runner(mesh, alg, loop, options.chunk_size)
        super().__init__(alg, run_group, options, mesh, lambda state: constrain_state(state, mesh))
