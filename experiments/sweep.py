"""A hyperparameter grid in one runner process: ``--config.sweep.optim.lr=1e-4,5e-4,1e-3``.

Every swept field is one the library keeps as data in the state (``fedjax_bn/hyper.py``), so
each (setting, seed, algorithm) is built once and every point of the grid trains with the same
compiled programs: the point's values are written into the initial state with
``fb.with_hyperparams``. Each point is its own run, labelled ``<setting>@<field>=<value>,...``
in the history, the summary, the tables and the plots (one table and one plot per point).
Several swept fields make their Cartesian product, in config order.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import jax
import ml_collections

import fedjax_bn as fb
from experiments import privacy, registry

Config = ml_collections.ConfigDict
ConfigError = registry.ConfigError
Point = dict[str, float]  # config field (``optim.lr``) -> value

# The config fields a sweep may range over, and the hyperparameter each sets in the state.
SWEEPABLE: dict[str, str] = {
    "optim.lr": "client.learning_rate",
    "optim.weight_decay": "client.weight_decay",
    "optim.momentum": "client.momentum",
    "mu": "mu",
    "clip_norm": "clip_norm",
    "server_lr": "server.learning_rate",
    "dp.noise_multiplier": "dp.noise_multiplier",
    "dp.clip_norm": "dp.clip_norm",
}

# Fields whose 0 means something else outside a sweep (no momentum, the factory's server lr).
POSITIVE: dict[str, str] = {
    "optim.momentum": " (momentum 0 is no momentum, another program)",
    "server_lr": " (server_lr 0 is the factory's default)",
}


def _values(field: str, text: Any) -> tuple[float, ...]:
    """The distinct finite numbers of ``'1e-4,5e-4'`` (or a number, or a sequence of them)."""
    items = text if isinstance(text, list | tuple) else str(text).split(",")
    try:
        values = tuple(float(str(i).strip()) for i in items)
    except ValueError:
        raise ConfigError(
            f"config.sweep.{field} must list numbers, e.g. --config.sweep.{field}=1e-4,5e-4; "
            f"got {text!r}."
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"config.sweep.{field} must list finite numbers, got {text!r}.")
    if field in POSITIVE and not all(v > 0 for v in values):
        raise ConfigError(
            f"config.sweep.{field} must list numbers > 0, got {text!r}{POSITIVE[field]}."
        )
    if len(set(values)) != len(values):
        raise ConfigError(f"config.sweep.{field} lists a value more than once: {text!r}.")
    return values


def swept(config: Config) -> dict[str, tuple[float, ...]]:
    """``{field: values}`` of every field the config sweeps, in :data:`SWEEPABLE` order."""
    if "sweep" not in config:
        return {}
    out = {}
    for field in SWEEPABLE:
        text = config.sweep
        for part in field.split("."):
            text = text[part]
        if text not in ("", None, ()):
            out[field] = _values(field, text)
    return out


def points(config: Config) -> list[Point]:
    """The grid's points (``[{}]``, one empty point, without a sweep)."""
    grid = swept(config)
    if privacy.enabled(config) and "dp.noise_multiplier" in grid and config.dp.target_epsilon:
        raise ConfigError(
            "config.sweep.dp.noise_multiplier and config.dp.target_epsilon both set the noise; "
            "give one of them."
        )
    return [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]


def apply(config: Config, point: Point) -> Config:
    """A copy of ``config`` with the point's fields set (for checks and the accountant)."""
    out = Config(config.to_dict())
    for field, value in point.items():
        *parents, leaf = field.split(".")
        node = out
        for parent in parents:
            node = node[parent]
        node[leaf] = type(node[leaf])(value) if isinstance(node[leaf], float) else value
    return out


def label(setting: str, point: Point) -> str:
    """The run label of ``setting`` at ``point``: ``digits@optim.lr=0.0001``."""
    if not point:
        return setting
    return setting + "@" + ",".join(f"{f}={v:g}" for f, v in point.items())


def hyper_values(point: Point) -> dict[str, float]:
    """The point as ``fb.with_hyperparams`` names."""
    return {SWEEPABLE[f]: v for f, v in point.items()}


def check_run(alg_name: str, run: Any, point: Point) -> None:
    """A ConfigError naming each swept field that ``run``'s algorithm does not hold as data
    (e.g. ``mu`` for fedavg, ``optim.lr`` for scaffold, ``optim.momentum`` with momentum 0)."""
    if not point:
        return
    key = jax.random.key(run.seeds.init)  # train_run's init: its program is compiled once
    state = run.alg.init(key, run.data.train.sample_x(), run.data.num_clients)
    have = fb.hyperparams(state)
    missing = [f for f in point if SWEEPABLE[f] not in have]
    if missing:
        valid = ", ".join(f for f, h in SWEEPABLE.items() if h in have) or "none"
        raise ConfigError(
            f"{alg_name} cannot sweep {', '.join(f'config.sweep.{f}' for f in missing)}: it "
            f"holds no such value as data; it can sweep: {valid}."
        )


def at_point(config: Config, run: Any, point: Point) -> Any:
    """``run`` (built once) at ``point``: the same algorithm and round function (so the same
    compiled programs), the point's values for the initial state, its own DP epsilons."""
    if not point:
        return run
    epsilons = run.epsilons
    if "dp.noise_multiplier" in point and epsilons is not None:
        epsilons = privacy.epsilons(apply(config, point), config.rounds)
    return run._replace(hyper=hyper_values(point), epsilons=epsilons)
