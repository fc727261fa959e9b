"""Tests for fedjax_bn.policy: structural BN detection, the policy table, partition/merge."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from conftest import CounterModel, assert_trees_equal, init_shapes, random_like, tiny_cnn
from hypothesis import given
from hypothesis import strategies as st

from fedjax_bn.policy import (
    POLICIES,
    bn_module_paths,
    bn_param_mask,
    check_policy,
    leaf_role,
    merge,
    partition,
)
from fedjax_bn.tree import flatten

X = jnp.ones((2, 4, 4, 1), jnp.float32)


class Inner(nn.Module):
    """A BatchNorm hidden two levels down under a custom name, next to BN-looking non-BN layers."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = nn.Dense(3, name="bn_dense")(x)  # a name that looks like BN but is not
        x = nn.LayerNorm(name="norm")(x)  # has scale/bias, but no running statistics
        return nn.BatchNorm(use_running_average=not train, name="baz")(x)


class Middle(nn.Module):
    """A conv, then ``Inner`` under the name 'bar'."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return Inner(name="bar")(nn.Conv(3, (3, 3), name="conv")(x), train=train)


class Nested(nn.Module):
    """BatchNorm at params/foo/bar/baz; a top-level BN under a plain name; non-BN leaves."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        x = Middle(name="foo")(x, train=train)
        x = nn.BatchNorm(use_running_average=not train, name="head")(x)
        x = nn.Dense(2, name="out")(x.reshape((x.shape[0], -1)))
        self.variable("counters", "calls", jnp.zeros, (), jnp.int32)
        return x


def init_nested() -> dict[str, Any]:
    """Nested's variables with random values, built without compiling."""
    return random_like(init_shapes(Nested(), X), seed=0)


def true_paths(mask: Any) -> set[str]:
    """The '/'-joined paths where a bool mask tree is True."""
    return {"/".join(p) for p, v in flatten(mask).items() if v}


def test_bn_detection_finds_nested_renamed_layers_only() -> None:
    variables = init_nested()
    assert bn_module_paths(variables) == {("foo", "bar", "baz"), ("head",)}
    assert true_paths(bn_param_mask(variables)) == {
        "foo/bar/baz/scale",
        "foo/bar/baz/bias",
        "head/scale",
        "head/bias",
    }


def test_bn_detection_on_library_models_and_counter_model(sample_x: jax.Array) -> None:
    """SeedCNN's and the counter model's BN layers (the counter lives beside BN, not in it)."""
    cnn = init_shapes(tiny_cnn(), sample_x)
    assert true_paths(bn_param_mask(cnn)) == {
        "ConvBNReLU_0/BatchNorm_0/scale",
        "ConvBNReLU_0/BatchNorm_0/bias",
    }
    counted = init_shapes(CounterModel(), sample_x)
    assert true_paths(bn_param_mask(counted)) == {"CountedBN_0/bn/scale", "CountedBN_0/bn/bias"}


@given(
    names=st.lists(
        st.text("abcdefgh_", min_size=1, max_size=6).filter(lambda s: s[0] != "_"),
        min_size=1,
        max_size=3,
    ),
    decoy=st.sampled_from(["BatchNorm_0", "bn", "norm", "batch_stats"]),
)
def test_bn_detection_any_nesting_and_names(names: list[str], decoy: str) -> None:
    """A BN at any depth under any names is found; a Dense named like BN next to it is not."""

    class Leaf(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
            x = nn.Dense(2, name=decoy)(x)
            return nn.BatchNorm(use_running_average=not train, name="x")(x)

    def wrap(depth: int) -> nn.Module:
        if depth == len(names):
            return Leaf(name=names[-1] + "_leaf")

        class Wrapper(nn.Module):
            @nn.compact
            def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
                return wrap(depth + 1)(x, train=train)

        return Wrapper(name=names[depth])

    class Top(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
            return wrap(0)(x, train=train)

    variables = init_shapes(Top(), jnp.ones((2, 3)))
    prefix = "/".join([*names, names[-1] + "_leaf"])
    assert true_paths(bn_param_mask(variables)) == {f"{prefix}/x/scale", f"{prefix}/x/bias"}
    assert f"{prefix}/{decoy}/kernel" in {"/".join(p) for p in flatten(variables["params"])}


# The policy table of DESIGN.md: role of (collection, is BN layer) under each policy.
TABLE = {
    "fedavg": {("params", False): "shared", ("params", True): "shared", "batch_stats": "pooled"},
    "fedbn": {("params", False): "shared", ("params", True): "local", "batch_stats": "local"},
    "silobn": {("params", False): "shared", ("params", True): "shared", "batch_stats": "local"},
}


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_table(policy: str) -> None:
    """Every leaf gets the role DESIGN.md's table gives it, and lands in exactly that part."""
    variables = init_nested()
    bn = bn_module_paths(variables)
    parts = partition(variables, policy)
    roles = {role: set(flatten(getattr(parts, role))) for role in ("shared", "pooled", "local")}
    for path in flatten(variables):
        collection = path[0]
        if collection == "params":
            want = TABLE[policy][("params", path[1:-1] in bn)]
        elif collection == "batch_stats":
            want = TABLE[policy]["batch_stats"]
        else:
            want = "local"  # other mutable collections are client state
        assert leaf_role(path, policy, bn) == want
        assert {r for r, paths in roles.items() if path in paths} == {want}


def test_policy_table_concrete_leaves() -> None:
    """The table on named leaves: what fedbn keeps local, what fedavg pools."""
    variables = init_nested()
    fedbn = partition(variables, "fedbn")
    assert set(fedbn.local["params"]) == {"foo", "head"}
    assert set(fedbn.local["params"]["foo"]["bar"]) == {"baz"}
    assert "conv" in fedbn.shared["params"]["foo"] and "out" in fedbn.shared["params"]
    assert fedbn.pooled == {}
    fedavg = partition(variables, "fedavg")
    assert set(fedavg.pooled) == {"batch_stats"} and set(fedavg.local) == {"counters"}
    silobn = partition(variables, "silobn")
    assert set(silobn.shared) == {"params"} and set(silobn.local) == {"batch_stats", "counters"}


@pytest.mark.parametrize("policy", POLICIES)
def test_partition_merge_round_trip(policy: str, sample_x: jax.Array) -> None:
    """merge(*partition(v, policy)) == v, leaf for leaf, in any order of the parts."""
    counted = random_like(init_shapes(CounterModel(), sample_x), seed=1)
    for variables in (init_nested(), counted):
        parts = partition(variables, policy)
        n_leaves = sum(len(flatten(p)) for p in parts)
        assert n_leaves == len(flatten(variables))
        assert_trees_equal(merge(*parts), variables)
        assert_trees_equal(merge(parts.local, parts.shared, parts.pooled), variables)


def test_merge_rejects_overlap_and_unknown_policy() -> None:
    """Overlapping parts and unknown policies raise a ValueError naming them."""
    variables = init_nested()
    parts = partition(variables, "fedavg")
    with pytest.raises(ValueError, match="params/out/kernel"):
        merge(parts.shared, {"params": {"out": {"kernel": 0.0}}})
    with pytest.raises(ValueError, match="fedavg, fedbn, silobn"):
        partition(variables, "fedsgd")
    with pytest.raises(ValueError, match="fedbn"):
        check_policy("FedBN")
