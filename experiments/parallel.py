"""``--config.parallel_runs=S``: the seeds and sweep points of one (setting, algorithm) trained
as one batched federation (``fedjax_bn.vmap_runs``), S at a time, each run's rows written as if
it ran alone. A sweep point's values are leaves of its state (``experiments/sweep.py``), so the
points of a grid batch like seeds do: one program for every point.

Only runs whose partitions have the same shapes are batched together (a label-skew
partition's padded client size ``N_max`` usually differs between seeds: such runs are
grouped by shape, with a note, and a run that matches none trains alone). Every run keeps its
own state, key, history, checkpoints and TensorBoard events (``train.Live``); only the rounds
are batched. A round's ``seconds`` is the batched round's wall time divided by the runs in it
(their share of it).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import fedjax_bn as fb
from experiments import registry, train
from experiments.history import Row, split_label
from fedjax_bn.execution.lockstep import AUTO_CHUNK_SIZE

Config = ml_collections.ConfigDict
ConfigError = registry.ConfigError
# config.executor -> how a batched run's clients run: vmapped, or in chunks (lax.map).
CLIENT_AXIS = {"auto": "vmap", "sequential": "vmap", "vmap": "vmap", "chunked": "chunked"}


def check(config: Config) -> None:
    """A ConfigError for what batched runs do not support (cohorts, DP, budgets, sharding)."""
    if config.parallel_runs == 1:
        return
    unsupported = {
        "config.cohort_size > 0 (sampled cohorts)": config.cohort_size > 0,
        "config.dp.enabled (DP-FedAvg samples cohorts)": bool(config.dp.enabled),
        "config.budget_max_steps > 0 (step budgets)": config.budget_max_steps > 0,
        "config.executor=sharded": config.executor not in CLIENT_AXIS,
    }
    bad = [name for name, on in unsupported.items() if on]
    if bad:
        raise ConfigError(
            f"config.parallel_runs={config.parallel_runs} batches runs of every client every "
            f"round; it does not support {', '.join(bad)}: use config.parallel_runs=1 there."
        )


def data_shape(run: train.Run) -> tuple:
    """What must match for two runs to be batched: every training leaf's shape and dtype."""
    return tuple((np.shape(a), str(a.dtype)) for a in jax.tree.leaves(run.data.train))


def batches(keys: Sequence[Any], runs: dict[Any, train.Run], size: int) -> list[list[Any]]:
    """``keys`` (``(label, seed, algorithm)``, one setting and algorithm) in batches of at
    most ``size`` runs whose data shapes match, in order; a run matching no other runs alone."""
    by_shape: dict[tuple, list[Any]] = {}
    for key in keys:
        by_shape.setdefault(data_shape(runs[key]), []).append(key)
    if len(by_shape) > 1:
        groups = [[f"{key[0]} seed {key[1]}" for key in group] for group in by_shape.values()]
        print(
            f"note: {keys[0][2]} runs {groups}: partitions of different shapes, batched only "
            "within each group (batched runs need data of the same shapes)."
        )
    out = [group[i : i + size] for group in by_shape.values() for i in range(0, len(group), size)]
    return sorted(out, key=lambda batch: list(keys).index(batch[0]))


def train_batched(
    config: Config, runs: Sequence[train.Run], keys: Sequence[Any], out: Path, *, resume: bool
) -> list[list[Row]]:
    """Train ``runs`` (seeds or points of one setting and algorithm, data of one shape) batched;
    returns each run's rows. Runs resumed at different rounds train one after another instead."""
    lives = [
        train.open_run(config, run, label, alg, out, resume=resume)
        for run, (label, _, alg) in zip(runs, keys, strict=True)
    ]
    if len({live.done for live in lives}) > 1:
        for live in lives:
            live.ckpt.close()
        print(
            f"note: {keys[0][0]} {keys[0][2]}: runs resumed at different rounds train one by one."
        )
        return [
            train.train_run(config, run, label, alg, seed, out, resume=resume)
            for run, (label, seed, alg) in zip(runs, keys, strict=True)
        ]
    try:
        if lives[0].done < config.rounds:
            for live in lives:
                train.begin(config, live, out)
            batched_rounds(config, lives)
    except KeyboardInterrupt:
        for live in lives:
            train.save_interrupted(live)
        raise
    finally:
        for live in lives:
            train.close_run(live)
    return [live.rows for live in lives]


def batched_rounds(config: Config, lives: list[train.Live]) -> None:
    """The remaining rounds of every run, one batched round at a time, each run's row recorded
    from its slice of the batched state and result."""
    round_fn = fb.vmap_runs(
        lives[0].run.alg,
        batch_size=config.batch_size,
        local_epochs=config.local_epochs,
        chunk_size=AUTO_CHUNK_SIZE if CLIENT_AXIS[config.executor] == "chunked" else None,
    )
    data = fb.stack_runs([live.run.data.train for live in lives], "training data")
    states = fb.stack_runs([live.state for live in lives], "states")
    keys = jnp.stack([live.key for live in lives])
    unstack = jax.jit(fb.unstack_run)  # one program for every run's slice
    split = jax.jit(jax.vmap(jax.random.split))  # each run's key split as it is alone
    for rnd in range(lives[0].done + 1, config.rounds + 1):
        pairs = split(keys)
        keys, round_keys = pairs[:, 0], pairs[:, 1]
        t0 = time.perf_counter()
        states, results = round_fn(states, data, round_keys)
        jax.block_until_ready(states)
        seconds = (time.perf_counter() - t0) / len(lives)
        for r, live in enumerate(lives):
            live.key = keys[r]
            state, result = unstack(states, r), unstack(results, r)
            train.record_round(config, live, rnd, state, result, seconds)


def training_order(config: Config, runs: dict[tuple[str, int, str], Any]) -> list[list[Any]]:
    """The runs' keys ``(label, seed, algorithm)`` in training batches: one run each, or
    with ``config.parallel_runs > 1`` the seeds and sweep points of each (setting, algorithm)
    batched; batches in the order of their first run."""
    keys = list(runs)
    if config.parallel_runs == 1:
        return [[key] for key in keys]
    groups: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for key in keys:
        groups[(split_label(key[0])[0], key[2])].append(key)
    out = [b for g in groups.values() for b in batches(g, runs, config.parallel_runs)]
    return sorted(out, key=lambda b: keys.index(b[0]))


def train_batch(
    config: Config, runs: dict[Any, train.Run], batch: list[Any], out: Path, resume: bool
) -> list[list[Row]]:
    """Each run's rows: one run trained alone (``train_run``), several batched."""
    (label, seed, alg_name), built = batch[0], [runs[key] for key in batch]
    if len(batch) == 1:
        return [train.train_run(config, built[0], label, alg_name, seed, out, resume=resume)]
    return train_batched(config, built, batch, out, resume=resume)
