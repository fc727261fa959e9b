"""Config names mapped to library factories: algorithms, settings, models, optimizers,
augmentations and losses.

One registry per kind; :func:`lookup` turns an unknown name into an error listing the valid ones.
A data source is a setting: to add one (e.g. a tensorflow-datasets CIFAR-100 label skew reading
``config.data.name`` and ``config.data.data_dir``) register a builder in :data:`SETTINGS`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

import fedjax_bn as fb
from experiments import attacks, compression, privacy
from fedjax_bn import data as fbd
from fedjax_bn.data import augment
from fedjax_bn.recalibrate import fedavg_batch_stats_only

T = TypeVar("T")
Config = ml_collections.ConfigDict
AlgorithmFactory = Callable[[nn.Module, optax.GradientTransformation, Config], fb.Algorithm]
SettingBuilder = Callable[[Config, int], fbd.FederatedData]


@functools.cache
def smoothed_cross_entropy(smoothing: float) -> fb.task.PerExample:
    """Per-example softmax cross-entropy against ``optax.smooth_labels`` targets (Szegedy et
    al. 2016: ``(1 - smoothing) * one_hot + smoothing / K``). Cached per value, so every run
    with the same value shares one loss function (and its compiled programs)."""

    def loss(logits_BK: jax.Array, y_B: jax.Array) -> jax.Array:
        labels_BK = optax.smooth_labels(jax.nn.one_hot(y_B, logits_BK.shape[-1]), smoothing)
        return optax.softmax_cross_entropy(logits_BK.astype(jnp.float32), labels_BK)

    return loss


# config.augment: training-batch augmentations ("" is none), built once so runs share them.
AUGMENTS: dict[str, fb.task.Augment] = {
    "crop": augment.random_crop(pad=4),
    "flip": augment.random_flip(),
    "cifar": augment.cifar_standard(pad=4),  # random crop of the 4-padded image, then flip
}

# config.loss: the loss keywords a factory gets (none: the library's default cross-entropy).
LOSSES: dict[str, Callable[[Config], dict[str, Any]]] = {
    "cross_entropy": lambda c: {},
    "label_smoothing": lambda c: {
        "loss": smoothed_cross_entropy(float(c.label_smoothing)),
        "metrics": {"accuracy": fb.task.accuracy},  # a custom loss drops accuracy otherwise
    },
}


def _common(config: Config) -> dict[str, Any]:
    """Options every factory takes: ``clip_norm`` when ``config.clip_norm`` is set (> 0),
    ``augment`` when ``config.augment`` names one, ``loss``/``metrics`` for a non-default
    ``config.loss``, ``dp`` when ``config.dp.enabled``, ``compress`` for
    ``config.compress.spec``."""
    out: dict[str, Any] = {"clip_norm": config.clip_norm} if config.clip_norm else {}
    if config.augment:
        out["augment"] = lookup(AUGMENTS, config.augment, "augment")
    out.update(lookup(LOSSES, config.loss, "loss function")(config))
    if privacy.enabled(config):
        out["dp"] = privacy.gaussian(config)
    compressor = compression.from_config(config)
    if compressor is not None:
        out["compress"] = compressor
    return out


def _renormed(model: nn.Module, norm: str) -> nn.Module:
    """``model`` with its normalization layers switched to ``norm``, or a ConfigError when the
    model has no ``norm`` field."""
    if "norm" not in {f.name for f in dataclasses.fields(model)}:
        raise ConfigError(
            f"This algorithm switches the model's normalization to {norm!r}, but "
            f"{type(model).__name__} has no `norm` field; models that have one: "
            f"{', '.join(NORM_MODELS)}."
        )
    return model.clone(norm=norm)


def _head(config: Config) -> tuple[str, ...]:
    """The head's module names (``config.head``, comma-separated), or a ConfigError."""
    head = names(config.head)
    if not head:
        raise ConfigError("config.head is empty; name the model's head module (e.g. Dense_1).")
    return head


def _server_lr(config: Config) -> dict[str, float]:
    """``server_lr=config.server_lr`` when it is set (> 0), else nothing (the default)."""
    return {"server_lr": config.server_lr} if config.server_lr else {}


ALGORITHMS: dict[str, AlgorithmFactory] = {
    "fedavg": lambda m, tx, c: fb.fedavg(m, tx, **_common(c)),
    "fedprox": lambda m, tx, c: fb.fedprox(m, tx, c.mu, **_common(c)),
    "fedbn": lambda m, tx, c: fb.fedbn(m, tx, **_common(c)),
    "silobn": lambda m, tx, c: fb.silobn(m, tx, **_common(c)),
    "fedbn_prox": lambda m, tx, c: fb.fedbn_prox(m, tx, c.mu, **_common(c)),
    # FedNova (Wang et al. 2020): normalized averaging, so clients doing more steps don't dominate.
    "fednova": lambda m, tx, c: fb.fednova(m, tx, **_common(c)),
    # The original bug, on purpose: FedProx whose local training keeps BN in eval mode.
    "fedprox_bn_eval": lambda m, tx, c: fb.fedprox(
        m, tx, c.mu, bn_train=False, name="fedprox_bn_eval", **_common(c)
    ),
    # Server optimizers (Reddi et al. 2021); config.server_lr 0 keeps each factory's default.
    "fedavgm": lambda m, tx, c: fb.fedavgm(m, tx, **_server_lr(c), **_common(c)),
    "fedadam": lambda m, tx, c: fb.fedadam(m, tx, **_server_lr(c), **_common(c)),
    "fedyogi": lambda m, tx, c: fb.fedyogi(m, tx, **_server_lr(c), **_common(c)),
    "fedadagrad": lambda m, tx, c: fb.fedadagrad(m, tx, **_server_lr(c), **_common(c)),
    "fedadam_fedbn": lambda m, tx, c: fb.fedadam(
        m, tx, policy="fedbn", name="fedadam_fedbn", **_server_lr(c), **_common(c)
    ),
    # SCAFFOLD's option II control variates need the client learning rate.
    "scaffold": lambda m, tx, c: fb.scaffold(m, tx, lr=c.optim.lr, **_common(c)),
    # FixBN: FedAvg until config.fix_round, then local BN frozen on the global statistics.
    "fixbn": lambda m, tx, c: fb.fixbn(m, tx, fix_round=c.fix_round, **_common(c)),
    # BN on batch statistics only, no running statistics kept: its global model is meaningful
    # only after recalibration (fedjax_bn.recalibrate.evaluate_recalibrated).
    "fedavg_batch_stats_only": lambda m, tx, c: fedavg_batch_stats_only(m, tx, **_common(c)),
    # FedAvg evaluated after exact BN recalibration over all clients' data (HeteroFL's static BN).
    "fedavg_recal": lambda m, tx, c: fb.fedavg(m, tx, name="fedavg_recal", **_common(c)),
    # Personalization baselines (docs/personalization.md); config.head names the head modules.
    "fedper": lambda m, tx, c: fb.fedper(m, tx, head=_head(c), **_common(c)),
    "fedper_fedbn": lambda m, tx, c: fb.fedper(
        m, tx, head=_head(c), policy="fedbn", name="fedper_fedbn", **_common(c)
    ),
    "lg_fedavg": lambda m, tx, c: fb.lg_fedavg(m, tx, head=_head(c), **_common(c)),
    "fedrep": lambda m, tx, c: fb.fedrep(
        m, tx, head=_head(c), head_steps=c.head_steps, **_common(c)
    ),
    "ditto": lambda m, tx, c: fb.ditto(m, tx, lam=c.ditto_lambda, **_common(c)),
    # The same model with another normalization (no BN: nothing local under any policy).
    "fedavg_group": lambda m, tx, c: fb.fedavg(
        _renormed(m, "group"), tx, name="fedavg_group", **_common(c)
    ),
    "fedavg_ws": lambda m, tx, c: fb.fedavg(
        _renormed(m, "none"), tx, name="fedavg_ws", **_common(c)
    ),
}


def _krum_f(config: Config) -> int:
    """Krum's ``f``: ``config.aggregator.f``, or (0) the number of attackers ``attack.fraction``
    gives, whatever ``attack.kind`` (so a clean baseline runs the same rule)."""
    population = config.data.num_clients - config.held_out
    return config.aggregator.f or attacks.num_attackers(config.attack.fraction, population)


# Robust server rules (fedjax_bn.robust, docs/robust_and_compression.md), from config.aggregator.
AGGREGATORS: dict[str, Callable[[Config], fb.aggregators.Aggregator]] = {
    "median": lambda c: fb.aggregators.median(),
    "trimmed_mean": lambda c: fb.aggregators.trimmed_mean(c.aggregator.beta),
    "krum": lambda c: fb.aggregators.krum(_krum_f(c)),
    "multi_krum": lambda c: fb.aggregators.multi_krum(_krum_f(c)),
    "geomed": lambda c: fb.aggregators.geometric_median(),
    "norm_bound": lambda c: fb.aggregators.norm_bound(c.aggregator.max_norm),
}


def _robust(rule: str, bn_stats: str) -> AlgorithmFactory:
    """FedAvg whose server folds the parameters by ``rule`` and the BN statistics by
    ``bn_stats`` (``robust``: the same rule; ``pooled``: averaged, FedAvg's way)."""
    suffix = "" if bn_stats == "robust" else "_bnavg"

    def build(m: nn.Module, tx: optax.GradientTransformation, c: Config) -> fb.Algorithm:
        agg = AGGREGATORS[rule](c)
        name = f"fedavg_{rule}{suffix}"
        return fb.fedavg(m, tx, aggregator=agg, bn_stats=bn_stats, name=name, **_common(c))

    return build


# fedavg_<rule> (BN statistics by the rule too) and fedavg_<rule>_bnavg (statistics pooled).
ALGORITHMS.update(
    {
        f"fedavg_{rule}{suffix}": _robust(rule, how)
        for rule in AGGREGATORS
        for suffix, how in (("", "robust"), ("_bnavg", "pooled"))
    }
)

# Algorithms whose global model is evaluated after recalibrate_bn (config.recalibrate: all).
RECALIBRATED: frozenset[str] = frozenset({"fedavg_recal", "fedavg_batch_stats_only"})

SETTINGS: dict[str, SettingBuilder] = {
    "digits_label_skew": lambda d, seed: fbd.digits_label_skew(
        d.num_clients, d.alpha, seed=seed, min_size=d.min_size
    ),
    "digits_feature_shift": lambda d, seed: fbd.digits_feature_shift(d.num_clients, seed=seed),
    "digits_iid": lambda d, seed: fbd.digits_iid(d.num_clients, seed=seed),
    # Any tensorflow-datasets image classification set (config.data.name), Dirichlet label skew.
    "tfds_label_skew": lambda d, seed: fbd.tfds_label_skew(
        d.name,
        d.num_clients,
        d.alpha,
        seed=seed,
        min_size=d.min_size,
        data_dir=d.data_dir or None,
        max_train=d.max_train or None,
        max_test=d.max_test or None,
    ),
    # Fashion-MNIST from local IDX files (apt-get install dataset-fashion-mnist, or data_dir).
    "fashion_mnist_label_skew": lambda d, seed: fbd.fashion_mnist_label_skew(
        d.num_clients,
        d.alpha,
        seed=seed,
        min_size=d.min_size,
        data_dir=d.data_dir or fbd.FASHION_MNIST_DIR,
        max_train=d.max_train or None,
        max_test=d.max_test or None,
    ),
    "fashion_mnist_iid": lambda d, seed: fbd.fashion_mnist_iid(
        d.num_clients,
        seed=seed,
        data_dir=d.data_dir or fbd.FASHION_MNIST_DIR,
        max_train=d.max_train or None,
        max_test=d.max_test or None,
    ),
    "fashion_mnist_feature_shift": lambda d, seed: fbd.fashion_mnist_feature_shift(
        d.num_clients,
        seed=seed,
        data_dir=d.data_dir or fbd.FASHION_MNIST_DIR,
        max_train=d.max_train or None,
        max_test=d.max_test or None,
    ),
}

# A model from (config.model, classes, example shape [H, W, C], init seed); Linen models ignore
# the last two (the library initializes them from the run's key), NNX models are built with them.
MODELS: dict[str, Callable[[Config, int, tuple[int, ...], int], Any]] = {
    # config.model.norm: batch (default) | group | layer | none (weight-standardized convs).
    "seed_cnn": lambda m, k, shape, seed: fb.SeedCNN(
        num_classes=k,
        widths=tuple(m.widths),
        hidden=m.hidden,
        momentum=m.momentum,
        norm=m.get("norm", "batch"),
    ),
    "digit_model": lambda m, k, shape, seed: fb.DigitModel(
        num_classes=k,
        conv_widths=tuple(m.conv_widths),
        fc_widths=tuple(m.fc_widths),
        momentum=m.momentum,
        norm=m.get("norm", "batch"),
    ),
    # The flax-examples ResNet-18 (CIFAR stem); BatchNorm only, no `norm` field.
    "resnet18": lambda m, k, shape, seed: fb.ResNet18(num_classes=k, num_filters=m.num_filters),
    # A Flax NNX CNN with dropout (seed_cnn's widths and hidden width; BN and dropout modes set
    # by the library at every call); its starting values come from the init seed.
    "nnx_cnn": lambda m, k, shape, seed: fb.NnxCNN(
        num_classes=k,
        in_channels=shape[-1],
        widths=tuple(m.widths),
        hidden=m.hidden,
        dropout=m.dropout,
        rngs=nnx_rngs(seed),
    ),
}


def nnx_rngs(seed: int) -> Any:
    """``nnx.Rngs(seed)`` (flax.nnx loads only when an NNX model is asked for)."""
    from flax import nnx

    return nnx.Rngs(seed)


# The models with a `norm` field (config.model.norm; fedavg_group and fedavg_ws switch it).
NORM_MODELS: tuple[str, ...] = ("digit_model", "seed_cnn")


def coupled_adam(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
    """Coupled L2 (torch's ``Adam(weight_decay=)``): decay joins the gradient before Adam
    scales it."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))


def coupled_sgd(
    learning_rate: float, weight_decay: float, momentum: float | None
) -> optax.GradientTransformation:
    """SGD (with heavy-ball ``momentum`` unless None) on the gradient plus ``weight_decay * w``."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum)
    )


# The learning rate, weight decay and momentum are data in the optimizer state
# (optax.inject_hyperparams, fedjax_bn/hyper.py): a sweep over them reuses the compiled programs.
# Momentum 0 is no momentum at all (None, a different program), as in torch.
OPTIMIZERS: dict[str, Callable[[Config], optax.GradientTransformation]] = {
    "adam": lambda o: optax.inject_hyperparams(coupled_adam)(o.lr, o.weight_decay),
    "sgd": lambda o: optax.inject_hyperparams(coupled_sgd)(
        o.lr, o.weight_decay, o.momentum or None
    ),
}


class ConfigError(ValueError):
    """Bad experiment input (a name, a value, an output directory), caught before training."""


def lookup(registry: Mapping[str, T], name: str, kind: str) -> T:
    """``registry[name]``, or a ConfigError that lists the valid names of this ``kind``."""
    if name not in registry:
        raise ConfigError(f"Unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(registry))}.")
    return registry[name]


def names(value: str | Sequence[Any]) -> tuple[str, ...]:
    """A tuple of names from a tuple, or from comma-separated strings (``'fedavg,fedbn'``)."""
    items = [value] if isinstance(value, str) else list(value)
    out = tuple(p.strip() for item in items for p in str(item).split(",") if p.strip())
    return out


def build_model(
    config: Config, num_classes: int, example_shape: tuple[int, ...] = (8, 8, 1), seed: int = 0
) -> Any:
    """The configured model for ``num_classes`` outputs and examples of ``example_shape``
    (``seed``: an NNX model's initial values)."""
    build = lookup(MODELS, config.model.name, "model")
    return build(config.model, num_classes, tuple(example_shape), seed)


def build_optimizer(config: Config) -> optax.GradientTransformation:
    """The configured client optimizer."""
    return lookup(OPTIMIZERS, config.optim.name, "optimizer")(config.optim)


def build_algorithm(
    name: str, model: nn.Module, tx: optax.GradientTransformation, config: Config
) -> fb.Algorithm:
    """Algorithm ``name`` from its library factory, with ``config.mu`` where it takes one; a
    ``+spec`` after the name (``fedavg+q4``) compresses what its clients send
    (``experiments/compression.py``), as ``config.compress.spec`` does for every algorithm."""
    base, spec = compression.split(name)
    factory = lookup(ALGORITHMS, base, "algorithm")
    if not spec:
        return factory(model, tx, config)
    return factory(model, tx, compression.with_spec(config, spec))._replace(name=name)


def build_setting(name: str, config: Config, seed: int) -> fbd.FederatedData:
    """The federated data set of setting ``name``, partitioned with ``seed``."""
    builder = lookup(SETTINGS, name, "setting")
    try:
        return builder(config.data, seed)
    except ValueError as e:
        raise ConfigError(f"Setting {name!r} cannot be built from config.data: {e}") from e
