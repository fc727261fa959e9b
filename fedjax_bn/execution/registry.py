"""The executors by name, and ``auto``'s pick among them.

Adding an executor is one module with a class ``(alg, options) -> Executor`` (``executor.py``)
and one line in ``REGISTRY``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax

from fedjax_bn.algorithms.base import Algorithm
from fedjax_bn.execution.executor import Executor
from fedjax_bn.execution.lockstep import ChunkedExecutor, VmapExecutor
from fedjax_bn.execution.sequential import SequentialExecutor
from fedjax_bn.execution.sharded import ShardedExecutor

if TYPE_CHECKING:
    from fedjax_bn.execution.options import RoundOptions

REGISTRY: dict[str, Callable[[Algorithm, RoundOptions], Executor]] = {
    "vmap": VmapExecutor,
    "chunked": ChunkedExecutor,
    "sequential": SequentialExecutor,
    "sharded": ShardedExecutor,
}
EXECUTORS: tuple[str, ...] = ("auto", *REGISTRY)
# auto on an accelerator: vmap up to this many clients, chunked above it.
AUTO_VMAP_MAX_CLIENTS = 1024


def choose_executor(
    num_clients: int, backend: str | None = None, device_count: int | None = None
) -> str:
    """``auto``'s pick: ``sequential`` on CPU (XLA:CPU's scan and vmapped convs are slow, see
    ``docs/design.md``); on GPU/TPU ``sharded`` over several devices, else ``vmap``, or
    ``chunked`` for a cohort above ``AUTO_VMAP_MAX_CLIENTS``."""
    backend = backend or jax.default_backend()
    device_count = jax.device_count() if device_count is None else device_count
    if backend == "cpu":
        return "sequential"
    if device_count > 1:
        return "sharded"
    return "vmap" if num_clients <= AUTO_VMAP_MAX_CLIENTS else "chunked"


def build_executor(name: str, alg: Algorithm, options: RoundOptions) -> Executor:
    """The executor ``name`` (not ``auto``) for ``alg``, its jitted functions built once."""
    if name not in REGISTRY:
        raise ValueError(f"Unknown executor {name!r}; valid executors: {', '.join(REGISTRY)}.")
    return REGISTRY[name](alg, options)
