"""Client samplers: which ``cohort_size`` of a population's ``num_clients`` clients train a round.

Every sampler is a pure function ``(key, round, num_clients, cohort_size, ...) -> ids``: the
same key and round number give the same cohort, on any device. ``ids`` is an int32 array of
length ``cohort_size``, sorted ascending. A cohort can come out smaller than ``cohort_size``
(``by_size`` when fewer clients hold data, ``available`` when fewer are online): its empty
slots hold ``num_clients`` (one past the last client id), so ids stay sorted with the real ones
first and the array keeps one shape (no re-compilation); :func:`cohort_mask` tells them apart.
Cohort rounds (``make_round(cohort_size=...)``) give empty slots no data and no weight.

``poisson`` (each client independently with probability ``q``, for DP accounting) pads its
variable cohort to ``cohort_size`` slots the same way. All draw by the Gumbel-top-k trick: the
``k`` largest of ``log w_c + Gumbel noise`` are a draw of ``k`` clients without replacement,
each next one picked with probability proportional to ``w_c`` among those left (successive
sampling; Kool et al., ICML 2019).
Clients of weight zero are never drawn.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
# (key, round, num_clients, cohort_size) -> sorted int32 ids [cohort_size]; extra data bound.
Sampler = Callable[[Array, Array | int, int, int], Array]


def check_cohort(num_clients: int, cohort_size: int) -> None:
    """Raise a ValueError unless ``1 <= cohort_size <= num_clients``."""
    if not 1 <= cohort_size <= num_clients:
        raise ValueError(
            f"cohort_size must lie in [1, num_clients={num_clients}], got {cohort_size}."
        )


def cohort_mask(ids: Array, num_clients: int) -> Array:
    """``[K]`` bool: which slots of a cohort hold a client (empty slots hold ``num_clients``)."""
    return jnp.asarray(ids) < num_clients


@functools.partial(jax.jit, static_argnums=3)
def _draw(key: Array, round_: Array, log_w: Array, cohort_size: int) -> Array:
    """Gumbel-top-k over ``log_w`` (-inf: never drawn); sorted ids, empty slots = N."""
    noise = jax.random.gumbel(jax.random.fold_in(key, round_), log_w.shape)
    scores, idx = jax.lax.top_k(log_w + noise, cohort_size)
    ids = jnp.where(jnp.isfinite(scores), idx, log_w.shape[0])
    return jnp.sort(ids).astype(jnp.int32)


def _per_client(values: Array | np.ndarray, num_clients: int, what: str) -> Array:
    """``values`` as a float32 ``[num_clients]`` array; a ValueError for a wrong shape."""
    values = jnp.asarray(values, jnp.float32)
    if values.shape != (num_clients,):
        raise ValueError(f"{what} must have shape ({num_clients},), got {values.shape}.")
    return values


def uniform(key: Array, round: Array | int, num_clients: int, cohort_size: int) -> Array:
    """``cohort_size`` clients uniformly at random without replacement (FedAvg's sampling)."""
    check_cohort(num_clients, cohort_size)
    return _draw(key, jnp.asarray(round), jnp.zeros((num_clients,), jnp.float32), cohort_size)


def by_size(
    key: Array, round: Array | int, num_clients: int, cohort_size: int, sizes: Array
) -> Array:
    """Clients drawn without replacement with probability proportional to their size.

    Clients of size zero are never drawn; with fewer than ``cohort_size`` non-empty clients,
    the cohort is all of them plus empty slots.
    """
    check_cohort(num_clients, cohort_size)
    sizes = _per_client(sizes, num_clients, "sizes")
    if not isinstance(sizes, jax.core.Tracer) and bool(jnp.any(sizes < 0)):
        raise ValueError("client sizes must be >= 0.")
    return _draw(key, jnp.asarray(round), jnp.log(sizes), cohort_size)


def available(
    key: Array,
    round: Array | int,
    num_clients: int,
    cohort_size: int,
    probabilities: Array,
) -> Array:
    """Each client is online this round with its own probability (independently); the cohort
    is ``cohort_size`` of the online clients, uniformly without replacement.

    With fewer than ``cohort_size`` online, the cohort is every online client plus empty slots
    (an empty cohort when none is): a round of partial availability trains fewer clients.
    """
    check_cohort(num_clients, cohort_size)
    p = _per_client(probabilities, num_clients, "probabilities")
    if not isinstance(p, jax.core.Tracer) and bool(jnp.any((p < 0) | (p > 1))):
        raise ValueError("availability probabilities must lie in [0, 1].")
    online_key, draw_key = jax.random.split(jax.random.fold_in(key, round))
    online = jax.random.uniform(online_key, (num_clients,)) < p
    log_w = jnp.where(online, 0.0, -jnp.inf)
    return _draw(draw_key, jnp.asarray(round), log_w, cohort_size)


def poisson(key: Array, round: Array | int, num_clients: int, cohort_size: int, q: float) -> Array:
    """Poisson sampling, for DP accounting: each client takes part independently with
    probability ``q``; ``cohort_size`` is the bucket (the most slots a round has), padded with
    empty slots, so rounds keep one shape.

    If more than ``cohort_size`` clients are drawn, a uniform ``cohort_size`` of them train
    (an overflow the accountant does not model): size the bucket with :func:`poisson_bucket`
    so this happens with negligible probability.
    """
    check_cohort(num_clients, cohort_size)
    if not 0 < q <= 1:
        raise ValueError(f"The Poisson sampling rate q must lie in (0, 1], got {q}.")
    drawn_key, order_key = jax.random.split(jax.random.fold_in(key, round))
    drawn = jax.random.uniform(drawn_key, (num_clients,)) < q
    log_w = jnp.where(drawn, 0.0, -jnp.inf)
    return _draw(order_key, jnp.asarray(round), log_w, cohort_size)


def poisson_bucket(num_clients: int, q: float, overflow: float = 1e-9) -> int:
    """The smallest bucket ``K`` with ``P(Binomial(num_clients, q) > K) <= overflow`` (the
    chance that a Poisson round draws more clients than :func:`poisson` keeps)."""
    if not 0 < q <= 1:
        raise ValueError(f"The Poisson sampling rate q must lie in (0, 1], got {q}.")
    if not 0 < overflow < 1:
        raise ValueError(f"overflow must lie in (0, 1), got {overflow}.")
    k = np.arange(num_clients + 1)
    log_pmf = (
        _log_choose(num_clients, k) + k * np.log(q) + (num_clients - k) * np.log1p(-q)
        if q < 1
        else np.where(k == num_clients, 0.0, -np.inf)
    )
    tail = np.cumsum(np.exp(log_pmf)[::-1])[::-1]  # tail[k] = P(X >= k)
    above = np.append(tail[1:], 0.0)  # above[k] = P(X > k)
    return max(1, int(np.argmax(above <= overflow)))


def _log_choose(n: int, k: np.ndarray) -> np.ndarray:
    """``log C(n, k)`` elementwise, through log-gamma (no overflow for large ``n``)."""
    from math import lgamma

    lg = np.vectorize(lgamma)
    return lg(n + 1) - lg(k + 1) - lg(n - k + 1)


SAMPLERS: tuple[str, ...] = ("uniform", "by_size")  # by name in make_round; others as callables


def sampler_for(name_or_fn: str | Sampler, sizes: np.ndarray) -> Sampler:
    """A sampler by name (``by_size`` bound to the population's ``sizes``) or as given."""
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn == "uniform":
        return uniform
    if name_or_fn == "by_size":
        return functools.partial(by_size, sizes=jnp.asarray(sizes, jnp.float32))
    raise ValueError(
        f"Unknown sampler {name_or_fn!r}; valid by name: {', '.join(SAMPLERS)} "
        "(or pass a callable, e.g. functools.partial(sampling.available, probabilities=p))."
    )
