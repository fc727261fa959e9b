"""Compression from the config: ``config.compress.spec`` for every algorithm of a run, or a
spec after an algorithm's name (``fedavg+q4``), so one run compares several compressors.

A spec is a compressor's own name (``fedjax_bn.compress``): ``q<bits>`` (stochastic
quantization), ``top<k>`` (top-k, ``k`` a fraction), ``stc<k>`` (sparse ternary), each
optionally prefixed ``ef_`` (error feedback): ``q4``, ``top0.01``, ``ef_top0.01``,
``ef_stc0.01``. Empty: nothing compressed.
"""

from __future__ import annotations

import re

import ml_collections

import fedjax_bn as fb

Config = ml_collections.ConfigDict
SPEC = re.compile(r"(ef_)?(q|top|stc)([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)")
SPEC_HELP = "q<bits> | top<k> | stc<k>, optionally prefixed ef_ (e.g. q4, ef_top0.01)"


def split(name: str) -> tuple[str, str]:
    """An algorithm name and the compression spec after its ``+`` ('' when none)."""
    base, _, spec = name.partition("+")
    return base, spec


def build(spec: str, seed: int = 0) -> fb.compress.Compressor | None:
    """The compressor ``spec`` names (None for ''); a ValueError for a malformed spec or one
    whose bits or k are out of range (the library's own message)."""
    if not spec:
        return None
    match = SPEC.fullmatch(spec)
    if match is None:
        raise ValueError(f"Unknown compression {spec!r}; valid: {SPEC_HELP}.")
    ef, kind, number = match.groups()
    if kind == "q":
        if not number.isdigit():
            raise ValueError(f"Compression {spec!r}: bits must be an int in 1..16.")
        inner = fb.compress.quantize(int(number), seed=seed)
    else:
        factory = fb.compress.top_k if kind == "top" else fb.compress.stc
        inner = factory(float(number))
    return fb.compress.error_feedback(inner) if ef else inner


def spec_of(name: str, config: Config) -> str:
    """Algorithm ``name``'s spec: its ``+spec``, else ``config.compress.spec`` ('' if none)."""
    section = config.get("compress")
    return split(name)[1] or (section.spec if section is not None else "")


def from_config(config: Config) -> fb.compress.Compressor | None:
    """The compressor ``config.compress`` asks for (None when there is no such section)."""
    section = config.get("compress")
    return None if section is None else build(section.spec, section.seed)


def with_spec(config: Config, spec: str) -> Config:
    """A copy of ``config`` whose ``compress.spec`` is ``spec`` (an algorithm's ``+spec``)."""
    copy = Config(config.to_dict())
    if copy.get("compress") is None:
        copy.compress = Config({"spec": "", "seed": 0})
    copy.compress.spec = spec
    return copy
