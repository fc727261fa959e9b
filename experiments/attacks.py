"""Byzantine clients to measure robust aggregation against (``config.attack``; experiments only).

``config.attack.kind``:

- ``none``: every client honest;
- ``sign_flip``: an attacker sends the negated update ``server - (client - server)``;
- ``scale``: it sends its update times ``config.attack.scale`` (a boosted update);
- ``gaussian``: it sends ``server + noise``, noise of std ``config.attack.scale`` per coordinate;
- ``label_flip``: data poisoning, its training labels become ``num_classes - 1 - label`` before
  training; it then trains and sends honestly.

Which clients attack (``round(fraction * clients)`` of them) is drawn from the run's seed, so
every algorithm of a run faces the same attackers. Model poisoning (:func:`poisoned`) wraps an
algorithm's ``server_update``: the attackers' slots of the stacked messages are rewritten before
the algorithm folds them, honest slots untouched. It acts on what the policy sends, the shared
model (``Message.shared``) and the BN running statistics (``Message.pooled``, under ``fedavg``):
an attacker's BN means and variances get the same transform (sign-flipped, scaled, noised), its
variances sent as their absolute value (valid statistics a server cannot reject by sign), so a
server that averages statistics lets one client move every client's normalization.

A poisoned message that is not finite (an overflowing ``attack.scale``) is dropped as the
executors' NaN quarantine drops one (``quarantine.fold_finite``), though the round's
``quarantined`` column, computed before the attack rewrites the message, does not show it.

Each attacker's Gaussian noise comes from the PRNG key of its last local step (a function of the
run's seed, the round and the client), carried in the message beside the algorithm's own.
Attackers are identified by slot, so the whole federation must train every round (no cohort).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import fedjax_bn as fb
from fedjax_bn.data import FederatedData
from fedjax_bn.execution.quarantine import finite_clients, fold_finite
from fedjax_bn.policy import bn_moment_paths, float_leaves, with_leaves

Array = jax.Array
Config = ml_collections.ConfigDict
KINDS = ("none", "sign_flip", "scale", "gaussian", "label_flip")
MODEL_POISONING = ("sign_flip", "scale", "gaussian")
POISONED_FIELDS = ("shared", "pooled")  # message fields compared with the server's same field
ATTACK_STREAM = 0xA77AC  # folded into the seed (attackers) and the step key (noise)


class Attack(NamedTuple):
    """One run's attack: its kind, share of attackers, scale and the attackers' client ids."""

    kind: str
    fraction: float
    scale: float
    ids: tuple[int, ...]

    def record(self) -> dict[str, Any]:
        """The history/summary columns that describe the attack."""
        return {
            "attack": self.kind,
            "attack_fraction": self.fraction,
            "attack_scale": self.scale,
            "attackers": list(self.ids),
        }


def check(config: Config) -> None:
    """A ValueError (the runner reports it as a config error) for an attack that cannot run;
    ``attack.fraction``'s range is checked in ``checks.BOUNDS``."""
    a = config.attack
    if a.kind not in KINDS:
        raise ValueError(f"Unknown config.attack.kind {a.kind!r}; valid: {', '.join(KINDS)}.")
    needs_scale = a.kind in ("scale", "gaussian")
    if needs_scale and not (isinstance(a.scale, int | float) and 0 < a.scale < math.inf):
        raise ValueError(
            f"config.attack.scale must be a finite number > 0 for attack {a.kind}, got {a.scale!r}."
        )
    if a.kind in MODEL_POISONING and config.cohort_size:
        raise ValueError(
            f"attack {a.kind} identifies attackers by cohort slot: it needs every client every "
            f"round (config.cohort_size=0), got cohort_size={config.cohort_size}."
        )


def num_attackers(fraction: float, num_clients: int) -> int:
    """``round(fraction * num_clients)`` (halves up): how many clients attack."""
    return int(math.floor(fraction * num_clients + 0.5))


def count(config: Config) -> int:
    """Attackers among the run's training clients (0 when the attack is ``none``)."""
    if config.attack.kind == "none":
        return 0
    return num_attackers(config.attack.fraction, config.data.num_clients - config.held_out)


def choose_attackers(seed: int, num_clients: int, fraction: float) -> np.ndarray:
    """``[C]`` bool: the attacking clients, drawn without replacement from the run's ``seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, ATTACK_STREAM]))
    chosen = rng.choice(num_clients, num_attackers(fraction, num_clients), replace=False)
    out = np.zeros(num_clients, bool)
    out[chosen] = True
    return out


def flip_labels(data: FederatedData, attackers_C: np.ndarray) -> FederatedData:
    """``data`` with the attackers' training labels mapped ``y -> num_classes - 1 - y`` (their
    padding and test data untouched)."""
    if data.num_classes is None or not isinstance(data.train.y, jax.Array | np.ndarray):
        raise ValueError("label_flip needs integer class ids and num_classes.")
    y = np.asarray(jax.device_get(data.train.y))
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"label_flip needs integer class ids, got labels of dtype {y.dtype}.")
    rows_C = np.asarray(attackers_C, bool).reshape((-1,) + (1,) * (y.ndim - 1))
    real = np.arange(y.shape[1])[None, :] < np.asarray(jax.device_get(data.train.n))[:, None]
    real = real.reshape(real.shape + (1,) * (y.ndim - 2))
    flipped = np.where(rows_C & real, data.num_classes - 1 - y, y).astype(y.dtype)
    if isinstance(data.train.y, jax.Array):
        flipped = jnp.asarray(flipped)
    return data.replace(train=data.train.replace(y=flipped))


def _bad_update(kind: str, delta: Array, scale: float, key: Array) -> Array:
    """One attacker's update of one leaf (``delta = client - server``)."""
    if kind == "sign_flip":
        return -delta
    if kind == "scale":
        return scale * delta
    return scale * jax.random.normal(key, delta.shape, jnp.float32)  # gaussian


def poison_tree(
    kind: str, scale: float, sent: Any, server: Any, bad_C: np.ndarray, keys_C: Array
) -> Any:
    """Stacked ``sent`` (leaves ``[C, ...]``) with the float leaves of the slots in ``bad_C``
    rewritten by ``kind``; variances of BN moments sent as their absolute value."""
    new, old = float_leaves(sent), float_leaves(server)
    variances = {var for _, var in bn_moment_paths(sent)}
    out = {}
    for i, (path, leaf) in enumerate(new.items()):
        base = old[path].astype(jnp.float32)

        def one(x: Array, key: Array, base: Array = base, i: int = i) -> Array:
            return base + _bad_update(kind, x.astype(jnp.float32) - base, scale, fold(key, i))

        bad = jax.vmap(one)(leaf, keys_C)
        if path in variances:
            bad = jnp.abs(bad)
        mask = jnp.asarray(bad_C).reshape((-1,) + (1,) * (leaf.ndim - 1))
        out[path] = jnp.where(mask, bad.astype(leaf.dtype), leaf)
    return with_leaves(sent, out)


def fold(key_data: Array, i: int) -> Array:
    """A typed PRNG key from a carried key's raw data, folded with the attack stream and ``i``."""
    key = jax.random.wrap_key_data(key_data)
    return jax.random.fold_in(jax.random.fold_in(key, ATTACK_STREAM), i)


def raw_key(key: Array | None, like: Array) -> Array:
    """A step key's raw ``uint32`` data (``like`` when the step had no key)."""
    if key is None:
        return like
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return jnp.asarray(key, like.dtype)


class Carry(NamedTuple):
    """The wrapped algorithm's carry and the raw data of the client's last step key."""

    inner: Any
    key: Array


class Sent(NamedTuple):
    """What a wrapped client sends: the algorithm's message and its last step key."""

    message: Any
    key: Array


def poisoned(alg: fb.Algorithm, attackers_C: np.ndarray, kind: str, scale: float) -> Any:
    """``alg`` whose attacking clients (``attackers_C``, by slot) send poisoned messages."""
    if kind not in MODEL_POISONING:
        raise ValueError(f"poisoned() takes one of {MODEL_POISONING}, got {kind!r}.")
    bad_C = np.asarray(attackers_C, bool)
    zero = jax.random.key_data(jax.random.key(0))

    def client_init(server: Any, client: Any) -> Carry:
        return Carry(alg.client_init(server, client), jnp.zeros_like(zero))

    def client_step(carry: Carry, batch: fb.Batch) -> Carry:
        return Carry(alg.client_step(carry.inner, batch), raw_key(batch.key, carry.key))

    def client_final(carry: Carry) -> tuple[Sent, Any, Any]:
        message, client, metrics = alg.client_final(carry.inner)
        return Sent(message, carry.key), client, metrics

    def server_update(server: Any, sent: Sent, weights_C: Array) -> Any:
        if len(weights_C) != len(bad_C):
            raise ValueError(
                f"attack {kind} was set up for {len(bad_C)} clients but a round has "
                f"{len(weights_C)} slots; attacks need every client every round."
            )
        msg = sent.message
        fields = {
            f: poison_tree(kind, scale, getattr(msg, f), getattr(server, f), bad_C, sent.key)
            for f in POISONED_FIELDS
            if hasattr(msg, f) and hasattr(server, f)
        }
        poisoned_msg = msg._replace(**fields)  # quarantined again: an overflow is dropped
        ok_C = finite_clients(poisoned_msg, len(bad_C))
        return fold_finite(alg, server, poisoned_msg, weights_C, ok_C)

    stages = tuple((r, poisoned(a, bad_C, kind, scale)) for r, a in alg.stages)
    return alg._replace(
        client_init=client_init,
        client_step=client_step,
        client_final=client_final,
        server_update=server_update,
        stages=stages,
    )


def prepare(
    config: Config, alg: fb.Algorithm, data: FederatedData, seed: int
) -> tuple[fb.Algorithm, FederatedData, Attack | None]:
    """The run's algorithm and training data under ``config.attack`` (unchanged for ``none``),
    and the attack's record (None for ``none``)."""
    a = config.attack
    if a.kind == "none":
        return alg, data, None
    bad_C = choose_attackers(seed, data.num_clients, a.fraction)
    ids = tuple(np.flatnonzero(bad_C).tolist())
    attack = Attack(a.kind, float(a.fraction), float(a.scale), ids)
    if a.kind == "label_flip":
        return alg, flip_labels(data, bad_C), attack
    return poisoned(alg, bad_C, a.kind, float(a.scale)), data, attack
