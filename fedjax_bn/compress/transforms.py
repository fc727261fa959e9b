"""Compressors: transforms of the update a client sends, ``shared_after - shared_before`` over
the shared float leaves, each a NamedTuple of pure functions (optax's shape).

A :class:`Compressor` has a per-client ``state`` (a PRNG key for stochastic quantization, the
residual for error feedback; ``()`` when stateless) kept in the algorithm's client state, so
it persists while a client sits out. ``apply`` returns what the server decodes (the simulation
sends the decoded values; the bytes are counted by ``nbytes`` for the encoding described in
each factory) and the next state. Every transform works leaf by leaf (per tensor), so a leaf's
scale and top-k never mix with another leaf's.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
Update = Any  # a pytree of float32 arrays: one client's update of the shared float leaves
Shapes = Any  # a pytree of jax.ShapeDtypeStruct (or arrays): the update's leaves
VALUE_BYTES = 4  # a float32 value or scale on the wire
INDEX_BYTES = 4  # an int32 position within its leaf


class Compressor(NamedTuple):
    """A transform of what one client sends (see the module docstring).

    ``init(template, index)``: client ``index``'s starting state for updates shaped like
    ``template``; ``apply(update, state) -> (decoded, state)``; ``nbytes(shapes)``: the exact
    bytes one client sends for an update with these leaves.
    """

    name: str
    init: Callable[[Update, Array], Any]
    apply: Callable[[Update, Any], tuple[Update, Any]]
    nbytes: Callable[[Shapes], int]


def check_bits(bits: Any) -> int:
    """``bits`` as an int in 1..16, else one ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an int in 1..16, got {bits!r}.")
    return bits


def check_fraction(k: Any) -> float:
    """``k`` as a float in (0, 1], else one ValueError."""
    if isinstance(k, bool) or not isinstance(k, int | float) or not 0 < k <= 1:
        raise ValueError(f"k (the fraction of entries kept) must be in (0, 1], got {k!r}.")
    return float(k)


def kept(size: int, k: float) -> int:
    """Entries top-k keeps of a leaf of ``size``: ``ceil(k * size)``, at least 1."""
    return max(1, min(size, math.ceil(round(k * size, 6))))


def _sizes(shapes: Shapes) -> list[int]:
    return [math.prod(s.shape) for s in jax.tree.leaves(shapes)]


def stochastic_round(key: Array, v: Array, levels: int) -> Array:
    """``v`` on ``levels + 1`` evenly spaced values between its min and max, rounded up with
    probability equal to the remainder: unbiased (FedJAX's uniform stochastic quantization)."""
    return round_with(jax.random.uniform(key, v.shape), v, levels)


def round_with(u: Array, v: Array, levels: int) -> Array:
    """:func:`stochastic_round` given the uniform draws ``u`` (shaped like ``v``)."""
    lo, hi = jnp.min(v), jnp.max(v)
    span = hi - lo
    step = jnp.where(span > 0, span / levels, 1.0)
    x = (v - lo) / step
    floor = jnp.floor(x)
    q = floor + (u < x - floor)
    return jnp.where(span > 0, lo + jnp.clip(q, 0, levels) * step, v)


def uniform_like(key: Array, update: Update) -> Update:
    """Uniform draws shaped like every leaf of ``update``, from one draw of their total size
    (one random-bits program per compiled call instead of one per leaf: XLA:CPU compiles
    each in seconds)."""
    leaves, treedef = jax.tree.flatten(update)
    sizes = [v.size for v in leaves]
    flat = jax.random.uniform(key, (sum(sizes),))
    parts = jnp.split(flat, list(itertools.accumulate(sizes))[:-1])
    return treedef.unflatten([p.reshape(v.shape) for p, v in zip(parts, leaves, strict=True)])


def quantize(bits: int, *, seed: int = 0) -> Compressor:
    """Unbiased stochastic uniform quantization of each leaf to ``bits`` bits (1..16).

    Wire: ``ceil(size * bits / 8)`` bytes of codes plus the leaf's min and max (float32).
    Client ``i``'s keys start at ``fold_in(PRNGKey(seed), i)`` and advance each time it sends.
    """
    bits = check_bits(bits)
    levels = 2**bits - 1

    def init(template: Update, index: Array) -> Array:
        return jax.random.fold_in(jax.random.PRNGKey(seed), index)

    def apply(update: Update, key: Array) -> tuple[Update, Array]:
        use, nxt = jax.random.split(key)
        u = uniform_like(use, update)
        return jax.tree.map(lambda u, v: round_with(u, v, levels), u, update), nxt

    def nbytes(shapes: Shapes) -> int:
        return sum(math.ceil(n * bits / 8) + 2 * VALUE_BYTES for n in _sizes(shapes))

    return Compressor(f"q{bits}", init, apply, nbytes)


def _top(v: Array, m: int) -> tuple[Array, Array]:
    """The flat positions of ``v``'s ``m`` largest magnitudes and their values."""
    flat = v.reshape(-1)
    _, idx = jax.lax.top_k(jnp.abs(flat), m)
    return idx, flat[idx]


def _scatter(v: Array, idx: Array, values: Array) -> Array:
    return jnp.zeros(v.size, v.dtype).at[idx].set(values).reshape(v.shape)


def _stateless(name: str, leaf: Callable[[Array], Array], nbytes: Callable) -> Compressor:
    return Compressor(
        name, lambda template, index: (), lambda u, s: (jax.tree.map(leaf, u), s), nbytes
    )


def top_k(k: float) -> Compressor:
    """Top-k sparsification: each leaf keeps its ``ceil(k * size)`` largest-magnitude entries.

    Wire: each kept entry's value (float32) and position (int32). Biased alone; wrap it in
    :func:`error_feedback` to send what it drops in later rounds.
    """
    k = check_fraction(k)

    def leaf(v: Array) -> Array:
        idx, values = _top(v, kept(v.size, k))
        return _scatter(v, idx, values)

    def nbytes(shapes: Shapes) -> int:
        return sum(kept(n, k) * (VALUE_BYTES + INDEX_BYTES) for n in _sizes(shapes))

    return _stateless(f"top{k:g}", leaf, nbytes)


def stc(k: float) -> Compressor:
    """Sparse ternary compression (Sattler et al. 2019; SecretFlow's STC): top-k of each leaf,
    each kept entry sent as its sign times the kept entries' mean magnitude.

    Wire: the kept positions (int32), one sign bit each, and the mean magnitude (float32).
    """
    k = check_fraction(k)

    def leaf(v: Array) -> Array:
        idx, values = _top(v, kept(v.size, k))
        return _scatter(v, idx, jnp.mean(jnp.abs(values)) * jnp.sign(values))

    def nbytes(shapes: Shapes) -> int:
        return sum(
            kept(n, k) * INDEX_BYTES + math.ceil(kept(n, k) / 8) + VALUE_BYTES
            for n in _sizes(shapes)
        )

    return _stateless(f"stc{k:g}", leaf, nbytes)


class FeedbackState(NamedTuple):
    """Error feedback's per-client state: what was not sent yet, and the inner state."""

    residual: Update
    inner: Any


def error_feedback(inner: Compressor) -> Compressor:
    """Error feedback (Seide et al. 2014; Karimireddy et al. 2019): the client compresses its
    update plus its residual and keeps what the compression dropped, so every part of every
    update is sent eventually. Same bytes as ``inner``."""
    if not isinstance(inner, Compressor):
        raise ValueError(f"error_feedback wraps a Compressor, got {inner!r}.")

    def init(template: Update, index: Array) -> FeedbackState:
        zeros = jax.tree.map(lambda v: jnp.zeros(v.shape, jnp.float32), template)
        return FeedbackState(zeros, inner.init(template, index))

    def apply(update: Update, state: FeedbackState) -> tuple[Update, FeedbackState]:
        target = jax.tree.map(jnp.add, update, state.residual)
        sent, inner_state = inner.apply(target, state.inner)
        return sent, FeedbackState(jax.tree.map(jnp.subtract, target, sent), inner_state)

    return Compressor(f"ef_{inner.name}", init, apply, inner.nbytes)
