"""DP-FedAvg around a FedAvg-family algorithm: what a client sends is one clipped update.

:func:`privatize` wraps the functions of ``make_algorithm``'s algorithm (``dp=`` calls it):

- a client sends :class:`DPMessage`: its update of every float leaf the policy sends, the
  shared parameters and (policy ``fedavg``) the BN running statistics, clipped *jointly* to
  the round's clip, plus adaptive clipping's bit. Nothing else: no example count, no step
  count, no unclipped leaf. What a policy keeps local (``fedbn``: BN affine and statistics;
  ``silobn``: BN statistics) never enters the message;
- BN statistics under ``fedavg`` travel as changes of ``(mean, var + mean^2)`` from the
  global ones (``bn_stats="pooled"``: the server recovers the pooled moments of the union,
  as without DP) or of ``(mean, var)`` (``"mean"``), inside the clipped, noised vector; the
  server floors the new variances at ``variance_floor`` so noise cannot make them negative;
- the server uses ``weights_C`` only as a participation mask (``weights_C > 0``: empty cohort
  slots and quarantined clients): every participant counts once and the noised sum is divided
  by the fixed expected cohort size (uniform weights; example counts would leak sizes);
- ``frozen_stats(server)`` (FixBN after its freeze): while true the BN statistics' entries of
  every update are zero (a constant, whatever the client's data) and the server keeps its
  statistics as they are; the noise on those entries is discarded (post-processing);
- the round's noise key is ``fold_in(key(seed), dp.round)``, ``dp.round`` counting the
  server's updates, so a run is reproducible from its state. The server runs its update on
  rounds where no client took part too (``Algorithm.update_empty``): noise is released every
  round, as the accountant assumes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_bn.policy import BnStats, bn_moment_paths, float_leaves, merge, with_leaves
from fedjax_bn.privacy.gaussian import Flat, Gaussian, clip_flat, next_clip, noised_mean
from fedjax_bn.tree import Variables, flatten, unflatten

if TYPE_CHECKING:  # the algorithms package imports this module: no run-time import back
    from fedjax_bn.algorithms.base import Algorithm, FedState

Array = jax.Array
ServerStep = Callable[[Variables, Any, Variables], tuple[Variables, Any]]
FrozenStats = Callable[[Any], "Array | bool"]  # server -> whether BN statistics are frozen


class DPState(NamedTuple):
    """Replicated: the current clip and the number of noised updates released so far."""

    clip: Array  # float32
    round: Array  # int32; keys the noise


class DPServer(NamedTuple):
    """FedAvg's server state (global shared, pooled statistics, server optimizer) plus DP's."""

    shared: Variables
    pooled: Variables
    opt_state: Any
    dp: DPState


class DPCarry(NamedTuple):
    """A client mid-round: the wrapped algorithm's carry, the global values its update is
    measured from (BN variances as second moments with ``bn_stats="pooled"``), the clip."""

    base: Any
    start: Variables
    clip: Array
    frozen: Array | None = None  # BN statistics frozen this round (None: never frozen)


class DPMessage(NamedTuple):
    """What a client sends under DP: its jointly clipped update (float leaves only) and
    ``below``, 1.0 when its unclipped norm was at most the clip (adaptive clipping's count)."""

    delta: Variables
    below: Array


def moments(variables: Variables, how: BnStats) -> Flat:
    """Float leaves of ``variables``; with ``how="pooled"`` each BN ``var`` leaf becomes the
    second moment ``var + mean^2`` (what averages to the union's moments)."""
    flat = {p: v.astype(jnp.float32) for p, v in float_leaves(variables).items()}
    if how == "pooled":
        for mean_p, var_p in bn_moment_paths(variables.get("batch_stats", {})):
            m, v = ("batch_stats", *mean_p), ("batch_stats", *var_p)
            flat[v] = flat[v] + jnp.square(flat[m])
    return flat


def from_moments(flat: Flat, batch_stats: Variables, how: BnStats, floor: float) -> Flat:
    """The inverse of :func:`moments`, every BN variance floored at ``floor``."""
    flat = dict(flat)
    for mean_p, var_p in bn_moment_paths(batch_stats):
        m, v = ("batch_stats", *mean_p), ("batch_stats", *var_p)
        var = flat[v] - jnp.square(flat[m]) if how == "pooled" else flat[v]
        flat[v] = jnp.maximum(var, floor)
    return flat


def _cast_into(tree: Variables, flat: Flat) -> Variables:
    """``tree`` with its float leaves replaced by ``flat``'s, each in the leaf's own dtype."""
    old = float_leaves(tree)
    return with_leaves(tree, {p: flat[p].astype(old[p].dtype) for p in old})


def without_stats(delta: Flat, frozen: Array | None) -> Flat:
    """``delta`` with its ``batch_stats`` entries zeroed where ``frozen`` (None: unchanged)."""
    if frozen is None:
        return delta
    return {
        p: jnp.where(frozen, jnp.zeros_like(v), v) if p[0] == "batch_stats" else v
        for p, v in delta.items()
    }


def privatize(
    alg: Algorithm,
    dp: Gaussian,
    *,
    server_step: ServerStep,
    how: BnStats,
    frozen_stats: FrozenStats | None = None,
) -> Algorithm:
    """``alg`` (a FedAvg-family algorithm whose server state has ``shared``, ``pooled``,
    ``opt_state`` and whose message has ``shared``, ``pooled``, ``steps=None``) as DP-FedAvg.

    ``server_step(shared, opt_state, mean) -> (shared, opt_state)``: the server optimizer's
    step from the noised mean (post-processing; plain FedAvg takes the mean).
    ``frozen_stats(server)``: whether the BN statistics are frozen in the round that starts
    from ``server`` (a bool, or a traced one from the server's state); None: never.
    """

    def is_frozen(server: DPServer) -> Array | None:
        return None if frozen_stats is None else jnp.asarray(frozen_stats(server))

    def init(rng_or_variables: Any, sample_x: Array, num_clients: int) -> FedState:
        state = alg.init(rng_or_variables, sample_x, num_clients)
        s = state.server
        dp_state = DPState(jnp.asarray(dp.clip_norm, jnp.float32), jnp.zeros((), jnp.int32))
        return state._replace(server=DPServer(s.shared, s.pooled, s.opt_state, dp_state))

    def client_init(server: DPServer, client: Any) -> DPCarry:
        start = unflatten(moments(merge(server.shared, server.pooled), how))
        base = alg.client_init(server, client)
        return DPCarry(base, start, server.dp.clip, is_frozen(server))

    def client_step(carry: DPCarry, batch: Any) -> DPCarry:
        return carry._replace(base=alg.client_step(carry.base, batch))

    def client_final(carry: DPCarry) -> tuple[DPMessage, Any, Any]:
        message, client, metrics = alg.client_final(carry.base)
        if getattr(message, "steps", None) is not None:
            raise ValueError("DP-FedAvg sends no step count; normalize='fednova' is refused.")
        new = moments(merge(message.shared, message.pooled), how)
        start = flatten(carry.start)
        delta = without_stats({p: new[p] - start[p] for p in start}, carry.frozen)
        clipped, below = clip_flat(delta, carry.clip)
        return DPMessage(unflatten(clipped), below), client, metrics

    def server_update(server: DPServer, messages: DPMessage, weights_C: Array) -> DPServer:
        mask_C = (jnp.asarray(weights_C) > 0).astype(jnp.float32)
        denominator = dp.expected_cohort_size or weights_C.shape[0]
        noise_key, count_key = jax.random.split(
            jax.random.fold_in(jax.random.key(dp.seed), server.dp.round)
        )
        std = dp.update_noise_multiplier(float(denominator)) * server.dp.clip
        mean = noised_mean(flatten(messages.delta), mask_C, std, denominator, noise_key)
        start = moments(merge(server.shared, server.pooled), how)
        new = {p: start[p] + mean[p] for p in start}
        stats = server.pooled.get("batch_stats", {}) if server.pooled else {}
        new = from_moments(new, stats, how, dp.variance_floor)
        shared, opt_state = server_step(
            server.shared, server.opt_state, _cast_into(server.shared, new)
        )
        pooled = server.pooled and _cast_into(server.pooled, new)
        if frozen_stats is not None and server.pooled:
            keep = is_frozen(server)
            pooled = jax.tree.map(lambda o, n: jnp.where(keep, o, n), server.pooled, pooled)
        clip = next_clip(dp, server.dp.clip, messages.below, mask_C, denominator, count_key)
        return DPServer(shared, pooled, opt_state, DPState(clip, server.dp.round + 1))

    return alg._replace(
        init=init,
        client_init=client_init,
        client_step=client_step,
        client_final=client_final,
        server_update=server_update,
        update_empty=True,
    )
