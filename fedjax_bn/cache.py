"""jax's persistent compilation cache, one call away (``fb.enable_compilation_cache()``).

Compiling a round's programs costs seconds on every fresh process (most of a short run); with
the cache, a second process with the same programs loads them instead. ``import fedjax_bn``
leaves jax's configuration alone: a program opts in with :func:`enable_compilation_cache`
(the experiment runner does, by default), which caches in ``path``, else in the directory the
environment variable ``FEDJAX_BN_COMPILATION_CACHE`` names, else in
``$XDG_CACHE_HOME/fedjax_bn/jax`` (default ``~/.cache/fedjax_bn/jax``). That variable set to
``0``, ``off``, ``false`` or ``no`` turns the call into a no-op, so a user can keep a program
that enables the cache from touching the disk.
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


def enable_compilation_cache(path: str | os.PathLike[str] | None = None) -> Path | None:
    """Cache every compiled program in ``path`` (default: ``FEDJAX_BN_COMPILATION_CACHE``'s
    directory, else :func:`default_cache_dir`); returns the directory, or None when the
    environment variable turns the cache off."""
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in OFF:
        return None
    where = Path(path or setting or default_cache_dir()).expanduser()
    jax.config.update("jax_compilation_cache_dir", str(where))
    # Cache every program, however quick to compile: a run compiles dozens of small ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return where


def disable_compilation_cache() -> None:
    """Turn the persistent cache off for this process."""
    jax.config.update("jax_compilation_cache_dir", None)
