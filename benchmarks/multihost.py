"""One process of a multi-host ``sharded`` run: sampled cohort rounds over a split population.

Run one command per host (same arguments, its own ``--process_id``); process 0's host also
runs the coordinator at ``--coordinator``:

    python -m benchmarks.multihost --coordinator=HOST0:8476 --num_processes=2 --process_id=0
    python -m benchmarks.multihost --coordinator=HOST0:8476 --num_processes=2 --process_id=1

(``--cpu`` forces the CPU backend, as the test does on one machine with ``127.0.0.1``.)

Each process builds only its own clients' images and client state (the client axis is split
over every process's devices, in device order); sizes and labels are small and replicated,
because a round reads them on the host (its step plan, the label check). Every process runs
the same rounds with the same keys and writes ``process{ID}.npz`` to ``--out``: the
(replicated) server state, the whole population's client state (gathered) and the sampled
cohorts. ``--num_processes=1`` runs everything in one process, the reference
``tests/test_multihost.py`` compares two localhost processes against.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

import fedjax_bn as fb
from fedjax_bn.algorithms.base import Algorithm, FedState
from fedjax_bn.data import ClientArrays
from fedjax_bn.execution.sharded import client_mesh, client_sharding, replicated
from fedjax_bn.models import SeedCNN

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 3


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0's coordinator")
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument(
        "--out", type=Path, default=Path("results/multihost"), help="process{ID}.npz here"
    )
    p.add_argument("--clients", type=int, default=8, help="population size")
    p.add_argument("--cohort", type=int, default=4, help="clients sampled per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max_size", type=int, default=12, help="largest client's examples")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="force the CPU backend")
    p.add_argument("--local_devices", type=int, default=0, help="CPU devices per process")
    p.add_argument("--timeout", type=int, default=120, help="seconds to wait for the others")
    return p.parse_args(argv)


def client_sizes(seed: int, num_clients: int, max_size: int) -> np.ndarray:
    """Every client's number of examples, in [max_size // 2, max_size] (host, cheap)."""
    rng = np.random.default_rng([seed, 0])
    return rng.integers(max(1, max_size // 2), max_size + 1, num_clients).astype(np.int32)


def client_labels(seed: int, c: int, size: int, max_size: int) -> np.ndarray:
    """Client ``c``'s labels ``[max_size]``, zero past its size."""
    y = np.random.default_rng([seed, 1, c]).integers(0, NUM_CLASSES, max_size)
    return np.where(np.arange(max_size) < size, y, 0).astype(np.int32)


def client_images(seed: int, c: int, size: int, max_size: int) -> np.ndarray:
    """Client ``c``'s images ``[max_size, *IMAGE_SHAPE]``, each client with its own offset and
    scale (so BN statistics differ across clients), zero past its size."""
    rng = np.random.default_rng([seed, 2, c])
    shift, scale = rng.normal() * 2.0, 1.0 + rng.uniform()
    x = rng.normal(size=(max_size, *IMAGE_SHAPE)) * scale + shift
    valid = (np.arange(max_size) < size)[:, None, None, None]
    return np.where(valid, x, 0.0).astype(np.float32)


def rows_of(index: tuple[slice, ...], num: int) -> range:
    """The client rows a shard's index selects (its first entry slices the client axis)."""
    return range(num)[index[0]]


def population(args: argparse.Namespace, mesh: jax.sharding.Mesh) -> ClientArrays:
    """The population's data as global arrays: images split by client over the mesh, each
    process building only its own clients' rows; sizes and labels replicated."""
    n = client_sizes(args.seed, args.clients, args.max_size)
    shape = (args.clients, args.max_size, *IMAGE_SHAPE)

    def images(index: tuple[slice, ...]) -> np.ndarray:
        rows = rows_of(index, args.clients)
        return np.stack([client_images(args.seed, c, n[c], args.max_size) for c in rows])

    x = jax.make_array_from_callback(shape, client_sharding(mesh), images)
    y = np.stack([client_labels(args.seed, c, n[c], args.max_size) for c in range(args.clients)])
    full = replicated(mesh)
    return ClientArrays(x=x, y=jax.device_put(y, full), n=jax.device_put(n, full))


def algorithm() -> Algorithm:
    """FedBN + FedProx with persistent client optimizers: local BN and momentum per client,
    so the client state really is per client."""
    model = SeedCNN(num_classes=NUM_CLASSES, widths=(4,), hidden=8)
    return fb.fedbn_prox(
        model, optax.sgd(0.05, momentum=0.9), mu=0.1, persist_client_optimizer=True
    )


def init_state(alg: Algorithm, seed: int, num_clients: int, mesh: jax.sharding.Mesh) -> FedState:
    """``alg.init`` laid out as ``sharded.place`` lays it out, each process computing only its
    own clients' rows (server and round replicated, client state split)."""
    init = functools.partial(
        alg.init, sample_x=np.zeros((1, *IMAGE_SHAPE), np.float32), num_clients=num_clients
    )
    shapes = jax.eval_shape(init, jax.random.key(seed))
    split, full = client_sharding(mesh), replicated(mesh)
    out = FedState(
        jax.tree.map(lambda _: full, shapes.server),
        jax.tree.map(lambda _: split, shapes.clients),
        full,
    )
    return jax.jit(init, out_shardings=out)(jax.random.key(seed))


def host_tree(tree: Any) -> dict[str, np.ndarray]:
    """Every leaf of ``tree`` as a whole numpy array on this host, by its key path."""
    full = jax.experimental.multihost_utils.process_allgather(tree, tiled=True)
    flat = jax.tree_util.tree_flatten_with_path(full)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def run(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """The rounds of this process; every array the comparison needs, on the host."""
    mesh = client_mesh()
    if args.clients % mesh.size:
        raise ValueError(f"{args.clients} clients do not split over {mesh.size} devices.")
    alg = algorithm()
    train = population(args, mesh)
    state = init_state(alg, args.seed, args.clients, mesh)
    first = host_tree(state.server)
    rnd = fb.make_round(
        alg,
        executor="sharded",
        mesh=mesh,
        batch_size=args.batch_size,
        cohort_size=args.cohort,
        state_placement="device",
    )
    cohorts = []
    for r in range(args.rounds):
        state, result = rnd(state, train, jax.random.fold_in(jax.random.key(args.seed), r))
        cohorts.append(np.asarray(result.clients))
    local = jax.tree.leaves(state.clients)[0].addressable_shards
    out = {f"server{k}": v for k, v in host_tree(state.server).items()}
    out |= {f"init_server{k}": v for k, v in first.items()}
    out |= {f"clients{k}": v for k, v in host_tree(state.clients).items()}
    out["round"] = np.asarray(host_tree(state.round)[""])
    out["cohorts"] = np.stack(cohorts)
    out["devices"] = np.asarray(mesh.size)
    out["local_clients"] = np.asarray(sum(s.data.shape[0] for s in local))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Initialize the distributed runtime (several processes), run, write ``process{ID}.npz``."""
    args = parse(argv)
    if args.cpu:
        jax.config.update("jax_platforms", "cpu")
    if args.local_devices:
        jax.config.update("jax_num_cpu_devices", args.local_devices)
    if args.num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=args.timeout,
        )
    out = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / f"process{args.process_id}.npz", **out)
    print(
        f"process {jax.process_index()}/{jax.process_count()}: {out['devices']} devices, "
        f"{out['local_clients']} of {args.clients} clients here, {args.rounds} rounds, "
        f"cohorts {out['cohorts'].tolist()}",
        flush=True,
    )
    if args.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
