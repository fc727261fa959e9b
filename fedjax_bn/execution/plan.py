"""The static plan of a round's local steps: groups for the lockstep executors, call schedules
for the sequential one.

A round's batches come from one canonical layout (``batches.round_batches``): client ``c`` gets
``S = epochs * ceil(n_max / B)`` steps, and in each epoch its ``ceil(n_c / B)`` real steps come
first, then masked no-op steps. Executors that run clients in lockstep (vmap, chunked, sharded)
pay for those no-op steps; a :class:`Plan` cuts them down by grouping clients of similar size,
and tells which steps are *full* for every client of a group (those run with no mask at all,
which is as fast as a plain train step; a masked BatchNorm costs more on XLA:CPU).
Plans are built on the host from the clients' sizes, are hashable, and are static under jit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from fedjax_bn.execution.batches import steps_per_epoch

# One sequential call of a client's schedule: (first step, number of steps, masked?).
Call = tuple[int, int, bool]


class Dispatch(NamedTuple):
    """One jitted call of the sequential executor: ``steps`` steps of a client from step
    ``first`` (``masked``: its batch is partial); ``opens``: it starts the client first;
    ``closes``: it then finishes the client and starts the lane's next one."""

    first: int
    steps: int
    masked: bool
    opens: bool
    closes: bool


@dataclasses.dataclass(frozen=True)
class Group:
    """Clients run together, and the global step indices they run.

    ``clients``: client indices (``None``: all clients in their natural order, no gather);
    entries past ``num_real`` are padding clients whose results are dropped. ``steps``: indices
    into the layout's S steps, per epoch ``full`` full steps first, then masked ones; ``n_hi``:
    the largest real client's size (examples past it are never indexed).
    """

    clients: tuple[int, ...] | None
    num_real: int
    steps: tuple[int, ...]
    full: int
    n_hi: int
    epochs: int

    @property
    def per_epoch(self) -> int:
        """Steps per epoch this group runs."""
        return len(self.steps) // self.epochs


@dataclasses.dataclass(frozen=True)
class Plan:
    """A round's static step plan: the groups, and the layout they index into."""

    groups: tuple[Group, ...]
    sizes: tuple[int, ...]
    batch_size: int
    epochs: int
    n_max: int

    @property
    def num_clients(self) -> int:
        """The number of real clients C."""
        return len(self.sizes)

    def real_steps(self) -> int:
        """Optimizer steps that see at least one real example, summed over clients."""
        return sum(real_steps(n, self.batch_size, self.epochs) for n in self.sizes)

    def run_steps(self) -> int:
        """Client-steps the plan executes, padding clients and no-op steps included."""
        return sum(len(g.clients or self.sizes) * len(g.steps) for g in self.groups)

    def padded_fraction(self) -> float:
        """Share of executed client-steps that are masked no-ops: ``1 - real / run``."""
        run = self.run_steps()
        return 0.0 if run == 0 else 1.0 - self.real_steps() / run


def real_steps(n_c: int, batch_size: int, epochs: int) -> int:
    """Steps of a size-``n_c`` client that hold any real example."""
    return epochs * math.ceil(n_c / batch_size)


def _group(
    clients: tuple[int, ...] | None,
    sizes: Sequence[int],
    num_real: int,
    batch_size: int,
    epochs: int,
    n_max: int,
) -> Group:
    real = [int(n) for n in sizes]
    spe = steps_per_epoch(n_max, batch_size)
    per_epoch = math.ceil(max(real) / batch_size)
    steps = tuple(e * spe + j for e in range(epochs) for j in range(per_epoch))
    full = min(real) // batch_size
    return Group(clients, num_real, steps, full, max(real), epochs)


def make_plan(
    sizes: Sequence[int],
    batch_size: int,
    epochs: int,
    n_max: int,
    *,
    num_groups: int = 1,
    multiple: int = 1,
) -> Plan:
    """Split clients into ``num_groups`` groups of similar size (sorted by size, near-equal
    counts); each group is padded with dummy clients to a multiple of ``multiple`` (devices).

    One group whose size is a multiple of ``multiple`` keeps the clients in place (no gather).
    """
    sizes = tuple(int(n) for n in sizes)
    num = len(sizes)
    if num_groups < 1 or multiple < 1:
        raise ValueError(f"num_groups and multiple must be >= 1, got {num_groups}, {multiple}.")
    if min(sizes, default=0) < 0 or max(sizes, default=0) > n_max:
        raise ValueError(f"client sizes must lie in [0, n_max={n_max}], got {sizes}.")
    if num_groups == 1 and num % multiple == 0:
        groups = (_group(None, sizes, num, batch_size, epochs, n_max),)
        return Plan(groups, sizes, batch_size, epochs, n_max)
    order = np.argsort(np.asarray(sizes), kind="stable")
    groups = []
    for part in np.array_split(order, min(num_groups, num)):
        real = tuple(int(c) for c in sorted(part))
        padded = real + (real[0],) * (-len(real) % multiple)
        groups.append(
            _group(padded, [sizes[c] for c in real], len(real), batch_size, epochs, n_max)
        )
    return Plan(tuple(groups), sizes, batch_size, epochs, n_max)


def client_order(plan: Plan) -> np.ndarray | None:
    """Where each client's result lands after concatenating the groups' real clients; ``None``
    when the plan keeps the natural order."""
    if len(plan.groups) == 1 and plan.groups[0].clients is None:
        return None
    ran = np.concatenate([np.asarray(g.clients[: g.num_real]) for g in plan.groups])
    return np.argsort(ran)


def padded_fraction(
    sizes: Sequence[int], batch_size: int, local_epochs: int = 1, *, num_groups: int = 1
) -> float:
    """Share of lockstep (vmap/chunked) client-steps that are masked no-ops for these sizes."""
    sizes = [int(n) for n in sizes]
    plan = make_plan(sizes, batch_size, local_epochs, max(sizes), num_groups=num_groups)
    return plan.padded_fraction()


def schedule(
    n_c: int, n_max: int, batch_size: int, epochs: int, per_call: int, budget: int | None = None
) -> list[Call]:
    """A client's jitted calls for ``sequential``: runs of up to ``per_call`` full steps, then
    the partial step, per epoch. A client with no data has no calls. ``budget``: the calls are
    cut after that many steps (``fedjax_bn.budgets``), the steps past it never run."""
    spe = steps_per_epoch(n_max, batch_size)
    full, partial = divmod(n_c, batch_size)
    calls: list[Call] = []
    for e in range(epochs):
        for s in range(0, full, per_call):
            calls.append((e * spe + s, min(per_call, full - s), False))
        if partial:
            calls.append((e * spe + full, 1, True))
    return calls if budget is None else truncate(calls, budget)


def truncate(calls: list[Call], budget: int) -> list[Call]:
    """The prefix of ``calls`` that runs ``budget`` steps (the last call cut short if needed)."""
    if budget < 0:
        raise ValueError(f"a budget must be >= 0 steps, got {budget}.")
    out: list[Call] = []
    for s, num, masked in calls:
        if budget <= 0:
            break
        out.append((s, min(num, budget), masked))
        budget -= num
    return out


def dispatches(calls: list[Call]) -> list[Dispatch]:
    """A client's calls as the sequential executor's dispatches.

    The client's closing (``client_final``, then the opening of the lane's next client) is
    fused into its last call when that one is masked, else it runs as a 0-step dispatch of
    its own; openings are the lane's (``SequentialExecutor``): a lane opens its first client,
    and each closing opens the next. So whatever the sizes and budgets, the dispatches that
    hold a train step come in three kinds (full, masked, masked + closing) per step count, and
    each compiles once; a size that is a multiple of the batch, or a budget that cuts a
    schedule short, adds only the 0-step closing kind (cheap to compile).
    """
    if not calls:
        return []
    out = [Dispatch(s, num, masked, False, False) for s, num, masked in calls]
    if out[-1].masked:
        out[-1] = out[-1]._replace(closes=True)
    else:
        out.append(Dispatch(out[-1].first, 0, False, False, True))
    return out


def lanes(costs: Sequence[int], num_lanes: int) -> tuple[tuple[int, ...], ...]:
    """Clients split into ``num_lanes`` lanes of similar total cost (longest first, each to the
    least loaded lane), each lane in client order; clients of cost 0 are left out, so a lane
    may be empty (the number of lanes, and so what compiles, never depends on the sizes)."""
    if num_lanes < 1:
        raise ValueError(f"num_lanes must be >= 1, got {num_lanes}.")
    load = [0] * num_lanes
    members: list[list[int]] = [[] for _ in range(num_lanes)]
    for c in sorted(range(len(costs)), key=lambda c: (-costs[c], c)):
        if costs[c] > 0:
            k = min(range(num_lanes), key=lambda k: (load[k], k))
            load[k] += costs[c]
            members[k].append(c)
    return tuple(tuple(sorted(m)) for m in members)
