"""jax's persistent compilation cache, on by default for every user of the library.

Compiling a round's programs costs seconds on every fresh process (most of a short run); with
the cache, a second process with the same programs loads them instead. ``import fedjax_bn``
turns it on in ``$XDG_CACHE_HOME/fedjax_bn/jax`` (default ``~/.cache/fedjax_bn/jax``) unless:

- the environment variable ``FEDJAX_BN_COMPILATION_CACHE`` is ``0``, ``off``, ``false`` or
  ``no`` (any other non-empty value is taken as the cache directory);
- jax's own ``jax_compilation_cache_dir`` is already set (the user's choice wins);
- the program calls :func:`disable_compilation_cache` (or ``enable_compilation_cache(path)``
  to move it).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "FEDJAX_BN_COMPILATION_CACHE"
OFF = ("0", "off", "false", "no")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fedjax_bn/jax``, or ``~/.cache/fedjax_bn/jax``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedjax_bn" / "jax"


def enable_compilation_cache(path: str | os.PathLike[str] | None = None) -> Path:
    """Cache every compiled program in ``path`` (default :func:`default_cache_dir`)."""
    where = Path(path).expanduser() if path else default_cache_dir()
    jax.config.update("jax_compilation_cache_dir", str(where))
    # Cache every program, however quick to compile: a run compiles dozens of small ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return where


def disable_compilation_cache() -> None:
    """Turn the persistent cache off for this process."""
    jax.config.update("jax_compilation_cache_dir", None)


def enable_by_default() -> Path | None:
    """What ``import fedjax_bn`` does: honour ``FEDJAX_BN_COMPILATION_CACHE`` and a cache
    directory jax already has; else enable the default. Returns the directory in use."""
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in OFF:
        return None
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    return enable_compilation_cache(setting or None)
