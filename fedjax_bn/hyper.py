"""Hyperparameters as data: values the compiled round programs read from the state, so a sweep
over them reuses every program instead of compiling it again per value.

What is data (a traced float32 scalar in the state) and what stays a compile-time constant:

- ``mu`` (FedProx) and ``clip_norm`` of the FedAvg family (``algorithms/fedavg.py``), in
  ``ServerState.hyper``, when the algorithm is built with them on (``mu > 0``, ``clip_norm``
  set): whether the proximal term or the clipping exists is the program's structure, their
  values are data;
- an optimizer's numeric arguments when it is built with ``optax.inject_hyperparams``: the
  client optimizer's (``client.<name>``, e.g. ``client.learning_rate``, hoisted into
  ``ServerState.hyper["client"]`` and written into every client's optimizer state at the start
  of its round), and the server optimizer's (``server.<name>``, already in the server
  optimizer's state). ``experiments/registry.py`` builds its optimizers so; an optimizer built
  without it keeps its values as constants;
- DP-FedAvg's clip (``dp.clip_norm``, already ``DPServer.dp.clip``; the starting clip when
  adaptive) and, with a fixed clip, its noise multiplier (``dp.noise_multiplier``). With
  adaptive clipping the update's share of the noise is a float64 function of ``z`` and the
  cohort size, so ``z`` stays a constant there. The accountant is the caller's: a new ``z``
  or cohort needs a new epsilon.

The robust aggregators' parameters (trimmed-mean ``beta``, Krum's ``f``, ``norm_bound``'s
bound, the geometric median's iterations) stay constants of the build: the first three set
shapes or are closed over by the rule, and the rules take no state.

    state = alg.init(key, sample_x, num_clients)
    for lr in (1e-3, 3e-3, 1e-2):
        s = fb.with_hyperparams(state, {"client.learning_rate": lr, "mu": 0.01})
        s, result = round_fn(s, train, key)  # the same compiled programs for every lr

The arithmetic is the constant path's: a traced ``mu * prox`` or ``-lr * update`` rounds as the
constant one does, so results are bitwise equal (``tests/test_hyperparams.py``). A value the
optimizer transforms before use in float64 when constant (Adam's ``1 - b1``) would round
differently in float32, which is why the server factories inject the learning rate, FedAvgM's
momentum and FedAdam's ``tau``, and keep the betas constant.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
SCALARS: tuple[str, ...] = ("mu", "clip_norm")  # the algorithm's own, in ServerState.hyper


def _is_inject(node: Any) -> bool:
    return isinstance(node, optax.InjectStatefulHyperparamsState)


def injected(opt_state: Any) -> dict[str, Array]:
    """The numeric hyperparameters of every ``optax.inject_hyperparams`` node in an optimizer
    state, by name (scheduled ones excluded: a schedule recomputes them each step)."""
    found: dict[str, Array] = {}
    for node in jax.tree.leaves(opt_state, is_leaf=_is_inject):
        if _is_inject(node):
            scheduled = node.hyperparams_states or {}
            found.update({k: v for k, v in node.hyperparams.items() if k not in scheduled})
    return found


def inject(opt_state: Any, values: Mapping[str, Any]) -> Any:
    """``opt_state`` with the named injected hyperparameters replaced by ``values`` (each cast
    to the dtype the optimizer chose for it)."""
    if not values:
        return opt_state

    def replace(node: Any) -> Any:
        if not _is_inject(node):
            return node
        hp = {
            k: jnp.asarray(values[k], v.dtype) if k in values else v
            for k, v in node.hyperparams.items()
        }
        return node._replace(hyperparams=hp)

    return jax.tree.map(replace, opt_state, is_leaf=_is_inject)


def client_hyper(tx: optax.GradientTransformation, params: Any) -> dict[str, Array]:
    """The client optimizer's injected hyperparameters for ``params`` (an empty dict when it
    has none): names from shapes alone; values, when there are any, from one small jitted
    init (no eager op-by-op initialization of the optimizer state)."""
    if not injected(jax.eval_shape(tx.init, params)):
        return {}
    return _jitted_hyper(tx)(params)


@functools.lru_cache(maxsize=64)
def _jitted_hyper(tx: optax.GradientTransformation) -> Any:
    """One jit per optimizer, so every ``alg.init`` of one build (seeds, sweep points) reuses
    its program."""
    return jax.jit(lambda p: injected(tx.init(p)))


def algorithm_hyper(mu: float, clip_norm: float | None, client: Mapping[str, Array]) -> Any:
    """``ServerState.hyper``: ``mu`` when FedProx is on, ``clip_norm`` when clipping is, the
    client optimizer's injected values under ``client``; None when there is nothing."""
    hyper: dict[str, Any] = {}
    if mu:
        hyper["mu"] = jnp.asarray(mu, jnp.float32)
    if clip_norm is not None:
        hyper["clip_norm"] = jnp.asarray(clip_norm, jnp.float32)
    if client:
        hyper["client"] = dict(client)
    return hyper or None


def hyperparams(state: Any) -> dict[str, Array]:
    """Every hyperparameter that is data in ``state`` (a ``FedState``), by name: ``mu``,
    ``clip_norm``, ``client.<name>``, ``server.<name>``, ``dp.clip_norm``,
    ``dp.noise_multiplier``."""
    server = state.server
    hyper = getattr(server, "hyper", None) or {}
    out = {k: hyper[k] for k in SCALARS if k in hyper}
    out.update({f"client.{k}": v for k, v in hyper.get("client", {}).items()})
    out.update({f"dp.{k}": v for k, v in hyper.get("dp", {}).items()})
    if "dp" in getattr(server, "_fields", ()):  # DP-FedAvg's clip (the starting one if adaptive)
        out["dp.clip_norm"] = server.dp.clip
    server_opt = getattr(server, "opt_state", None)
    out.update({f"server.{k}": v for k, v in injected(server_opt).items()})
    return out


def check_values(values: Mapping[str, Any]) -> None:
    """Raise a ValueError for a concrete ``mu < 0`` or ``clip_norm <= 0`` (traced values, e.g.
    under ``vmap``, are not checked)."""
    checks = (
        ("mu", 0.0, False),
        ("clip_norm", 0.0, True),
        ("dp.clip_norm", 0.0, True),
        ("dp.noise_multiplier", 0.0, False),
    )
    for name, low, strict in checks:
        v = values.get(name)
        if v is None or isinstance(v, jax.core.Tracer):
            continue
        bad = np.any(np.asarray(v) <= low) if strict else np.any(np.asarray(v) < low)
        if bad:
            raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {v}.")


def with_hyperparams(state: Any, values: Mapping[str, Any]) -> Any:
    """``state`` with the named hyperparameters (names as :func:`hyperparams` gives them) set
    to ``values``; the structure, shapes and dtypes stay, so no program compiles again."""
    have = hyperparams(state)
    unknown = sorted(set(values) - set(have))
    if unknown:
        valid = ", ".join(sorted(have)) or "none"
        raise ValueError(
            f"Unknown hyperparameters {unknown}; this state's are: {valid}. "
            "An optimizer's values are data only when it is built with optax.inject_hyperparams; "
            "mu and clip_norm only when the algorithm is built with them on."
        )
    check_values(values)
    server = state.server
    hyper = dict(server.hyper or {})
    for k in SCALARS:
        if k in values:
            hyper[k] = jnp.asarray(values[k], hyper[k].dtype)
    client = {k[len("client.") :]: v for k, v in values.items() if k.startswith("client.")}
    if client:
        old = hyper["client"]
        hyper["client"] = {**old, **{k: jnp.asarray(v, old[k].dtype) for k, v in client.items()}}
    for k, v in values.items():
        if k.startswith("dp.") and k != "dp.clip_norm":
            name = k[len("dp.") :]
            hyper["dp"] = {**hyper["dp"], name: jnp.asarray(v, hyper["dp"][name].dtype)}
    srv = {k[len("server.") :]: v for k, v in values.items() if k.startswith("server.")}
    new = server._replace(opt_state=inject(server.opt_state, srv)) if srv else server
    if "dp.clip_norm" in values:
        clip = jnp.asarray(values["dp.clip_norm"], server.dp.clip.dtype)
        new = new._replace(dp=server.dp._replace(clip=clip))
    if "hyper" in getattr(new, "_fields", ()):
        new = new._replace(hyper=hyper or None)
    return state._replace(server=new)
