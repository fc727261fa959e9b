"""Every check of an experiment config before anything runs or is written: field names,
number ranges (:data:`BOUNDS`), names of settings, algorithms, models, optimizers, samplers and
executors, and the options that do not fit together. :func:`validate` is the entry point; each
failure is one :class:`~experiments.registry.ConfigError` that says what was wrong and what
to give instead.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_collections

import fedjax_bn as fb
from experiments import attacks, compression, parallel, privacy, registry, sweep
from experiments.configs import base
from fedjax_bn.execution import EXECUTORS

Config = ml_collections.ConfigDict
ConfigError = registry.ConfigError

SAMPLERS = (*fb.sampling.SAMPLERS, "available")  # by name; available binds config.availability


def flat_fields(config: Config, prefix: str = "") -> dict[str, Any]:
    """Every leaf field of a config by dotted path (``data.alpha``), in config order."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        out.update(flat_fields(value, path + ".") if isinstance(value, Config) else {path: value})
    return out


def field_paths(config: Config) -> list[str]:
    """Every leaf field of a config as a dotted path, sorted."""
    return sorted(flat_fields(config))


def check_fields(config: Config) -> None:
    """Raise a ConfigError naming unknown fields and listing the valid ones (base.get_config)."""
    valid = field_paths(base.get_config())
    unknown = sorted(set(field_paths(config)) - set(valid))
    if unknown:
        raise ConfigError(f"Unknown config field(s) {unknown}; valid fields: {', '.join(valid)}.")


class Bound(NamedTuple):
    """The valid range of one numeric field: ``low <= value`` (``<`` if strict), ``<= high``
    (``<`` if high_strict)."""

    field: str
    kind: type  # int: integers only; float: any finite number
    low: float
    strict: bool = False
    high: float | None = None
    note: str = ""
    high_strict: bool = False  # ``value < high`` instead of ``<=``


# Every numeric field's valid range, checked by validate before anything is written.
BOUNDS: tuple[Bound, ...] = (
    Bound("rounds", int, 1),
    Bound("eval_every", int, 1),
    Bound("batch_size", int, 1),
    Bound("local_epochs", int, 1),
    Bound("eval_batch_size", int, 1),
    Bound("checkpoint_every", int, 1),
    Bound("parallel_runs", int, 1, note=" (seeds trained as one batched federation)"),
    Bound("cohort_size", int, 0, note=" (0: every client every round)"),
    Bound("client_threads", int, 0, note=" (0: 2 on a CPU with 2+ cores, else 1)"),
    Bound("availability", float, 0, strict=True, high=1),
    Bound("held_out", int, 0),
    Bound("eval_clients", int, 0, note=" (0: every client)"),
    Bound("budget_min_steps", int, 0),
    Bound("budget_max_steps", int, 0, note=" (0: no budget)"),
    Bound("keep_checkpoints", int, 1),
    Bound("mu", float, 0),  # even when no prox algorithm is selected
    Bound("clip_norm", float, 0, note=" (0: no clipping)"),
    Bound("server_lr", float, 0, note=" (0: the factory's default)"),
    Bound("data.num_clients", int, 1),
    Bound("data.alpha", float, 0, strict=True),
    Bound("data.min_size", int, 0),
    Bound("data.max_train", int, 0, note=" (0: all)"),
    Bound("data.max_test", int, 0, note=" (0: all)"),
    Bound("model.momentum", float, 0, high=1),
    Bound("model.num_filters", int, 1),
    Bound("model.dropout", float, 0, high=1, high_strict=True),
    Bound("label_smoothing", float, 0, high=1, high_strict=True),
    Bound("optim.lr", float, 0, strict=True),
    Bound("optim.weight_decay", float, 0),
    Bound("optim.momentum", float, 0),
    Bound("monitor.probe_size", int, 1),
    Bound("dp.noise_multiplier", float, 0),
    Bound("dp.clip_norm", float, 0, strict=True),
    Bound("dp.target_epsilon", float, 0, note=" (0: use dp.noise_multiplier)"),
    Bound("dp.delta", float, 0, high=1, high_strict=True),
    Bound("dp.q", float, 0, high=1),
    Bound("dp.target_quantile", float, 0, high=1, high_strict=True),
    Bound("dp.clip_learning_rate", float, 0, strict=True),
    Bound("aggregator.beta", float, 0, high=0.5, high_strict=True),
    Bound("aggregator.f", int, 0, note=" (0: the number of attackers)"),
    Bound("aggregator.max_norm", float, 0, strict=True),
    Bound("attack.fraction", float, 0, high=1, high_strict=True),
)


def describe(bound: Bound) -> str:
    """What ``bound`` accepts, e.g. ``'an integer >= 1'``, ``'a finite number in [0, 1]'``."""
    kind = "an integer" if bound.kind is int else "a finite number"
    if bound.high is not None:
        close = ")" if bound.high_strict else "]"
        return f"{kind} in {'(' if bound.strict else '['}{bound.low:g}, {bound.high:g}{close}"
    return f"{kind} {'>' if bound.strict else '>='} {bound.low:g}{bound.note}"


def in_bounds(bound: Bound, value: Any) -> bool:
    """Whether ``value`` has ``bound``'s kind (bools never count), is finite and in range."""
    kinds = int if bound.kind is int else int | float
    if isinstance(value, bool) or not isinstance(value, kinds):
        return False
    if not isinstance(value, int) and not abs(value) < float("inf"):  # NaN, inf
        return False
    above = value > bound.low if bound.strict else value >= bound.low
    if bound.high is None:
        return above
    return above and (value < bound.high if bound.high_strict else value <= bound.high)


def check_numbers(config: Config) -> None:
    """One ConfigError naming every numeric field outside its :data:`BOUNDS` and what is valid."""
    fields = flat_fields(config)
    bad = [
        f"config.{b.field} must be {describe(b)}, got {fields[b.field]!r}"
        for b in BOUNDS
        if b.field in fields and not in_bounds(b, fields[b.field])
    ]
    if bad:
        raise ConfigError("; ".join(bad) + ".")


def _seed(item: Any) -> int:
    """One seed: a non-negative int, or its decimal digits."""
    if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
        return item
    if isinstance(item, str) and item.isascii() and item.isdigit():
        return int(item)
    raise ConfigError(
        f"config.seeds must be non-negative integers, e.g. --config.seeds=0,1,2; got {item!r}."
    )


def _distinct(field: str, items: tuple[Any, ...]) -> tuple[Any, ...]:
    """``items``, or a ConfigError naming the repeated ones (their runs would share files)."""
    repeated = sorted({str(i) for i in items if items.count(i) > 1})
    if repeated:
        raise ConfigError(f"config.{field} lists more than once: {', '.join(repeated)}.")
    return items


def parse_seeds(value: Any) -> tuple[int, ...]:
    """Distinct non-negative seeds from an int, a sequence, or text like ``'0,1,2'``."""
    items = list(value) if isinstance(value, list | tuple) else [value]
    pieces = [p for i in items for p in (registry.names(i) if isinstance(i, str) else [i])]
    seeds = _distinct("seeds", tuple(_seed(p) for p in pieces))
    if not seeds:
        raise ConfigError("Give at least one seed, e.g. --config.seeds=0,1,2.")
    return seeds


def validate(config: Config) -> Config:
    """Check every name and number before any training; returns a copy with names normalized."""
    check_fields(config)
    config = Config(config.to_dict())  # unlocked copy; the caller's config is left alone
    config.settings = _distinct("settings", registry.names(config.settings))
    config.algorithms = _distinct("algorithms", registry.names(config.algorithms))
    for name in config.settings:
        registry.lookup(registry.SETTINGS, name, "setting")
    for name in config.algorithms:
        registry.lookup(registry.ALGORITHMS, compression.split(name)[0], "algorithm")
        try:
            compression.build(compression.spec_of(name, config))
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from e
    if config.augment:  # '' is none
        registry.lookup(registry.AUGMENTS, config.augment, "augment")
    registry.lookup(registry.LOSSES, config.loss, "loss function")
    if not config.settings or not config.algorithms:
        raise ConfigError("Give at least one setting and one algorithm.")
    config.seeds = parse_seeds(config.seeds)
    check_numbers(config)
    population = config.data.num_clients - config.held_out
    if population < 1:
        raise ConfigError(
            f"config.held_out ({config.held_out}) leaves no client to train out of "
            f"config.data.num_clients = {config.data.num_clients}."
        )
    if config.cohort_size > population:
        raise ConfigError(
            f"config.cohort_size ({config.cohort_size}) exceeds the population "
            f"(config.data.num_clients - config.held_out = {population}); 0 trains every client."
        )
    if config.sampler not in SAMPLERS:
        valid = ", ".join(SAMPLERS)
        raise ConfigError(f"Unknown config.sampler {config.sampler!r}; valid: {valid}.")
    if config.budget_max_steps and config.budget_min_steps > config.budget_max_steps:
        raise ConfigError(
            f"config.budget_min_steps ({config.budget_min_steps}) exceeds "
            f"config.budget_max_steps ({config.budget_max_steps})."
        )
    if config.budget_min_steps and not config.budget_max_steps:
        raise ConfigError("config.budget_min_steps needs config.budget_max_steps >= it.")
    if config.sampler != "uniform" and not config.cohort_size:
        raise ConfigError(f"config.sampler={config.sampler!r} needs config.cohort_size >= 1.")
    try:
        privacy.check(config)
        attacks.check(config)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if privacy.enabled(config) and config.dp.target_epsilon:  # config.json: the noise used
        config.dp.noise_multiplier = privacy.plan(config).noise_multiplier
    for point in sweep.points(config):  # every point's values in their fields' bounds
        try:
            check_numbers(sweep.apply(config, point))
        except ConfigError as e:
            raise ConfigError(f"config.sweep: {e}") from None
    registry.lookup(registry.MODELS, config.model.name, "model")
    registry.lookup(registry.OPTIMIZERS, config.optim.name, "optimizer")
    registry.lookup(dict.fromkeys(EXECUTORS), config.executor, "executor")
    parallel.check(config)
    return config  # the factories' own checks run when each run is built (train.build_run)
