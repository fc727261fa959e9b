"""Command line: ``python -m experiments.run [--config=experiments/configs/X.py] [--config.F=V]``.

With no ``--config`` the embedded default (``experiments/configs/base.py``: the digits BatchNorm
study) runs. Any field can be overridden, e.g. ``--config.rounds=3 --config.seeds=0,1,2
--config.algorithms=fedavg,fedbn --config.mu=0.01 --config.out_dir=/tmp/run``.
"""

from __future__ import annotations

import difflib
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

import ml_collections
from absl import flags
from ml_collections import config_flags

from experiments import runner

DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "base.py")
USAGE = __doc__


def _config_file(argv: Sequence[str]) -> str:
    """The ``--config`` file argv names (``path[:args]``), else the default."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return DEFAULT_CONFIG


def _load(spec: str) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(":")
    get_config = runpy.run_path(path)["get_config"]
    return get_config(arg) if arg else get_config()


def _unknown_field_error(argv: Sequence[str], cause: Exception) -> runner.ConfigError:
    """A ConfigError naming the unknown ``--config.X`` fields of argv and listing the valid ones."""
    try:
        valid = runner.field_paths(_load(_config_file(argv)))
    except Exception:  # the config file itself is broken: report the original error
        return runner.ConfigError(f"Bad command line: {cause}")
    given = [a[len("--config.") :].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    unknown = [g for g in given if g not in valid]
    if not unknown:
        return runner.ConfigError(f"Bad command line: {cause}")
    hints = [
        f"{u!r} (did you mean {m[0]!r}?)"
        if (m := difflib.get_close_matches(u, valid, 1))
        else repr(u)
        for u in unknown
    ]
    return runner.ConfigError(
        f"Unknown config field(s) {', '.join(hints)}; valid fields: {', '.join(valid)}."
    )


def parse_config(argv: Sequence[str]) -> ml_collections.ConfigDict:
    """The config selected and overridden by ``argv`` (``argv[0]`` is the program name).

    Flags live in a private ``FlagValues``, so this can be called in-process (tests) repeatedly.
    """
    argv = list(argv)
    fv = flags.FlagValues()
    try:
        holder = config_flags.DEFINE_config_file(
            "config", DEFAULT_CONFIG, "Experiment config file.", flag_values=fv, sys_argv=argv
        )
        rest = fv(argv)
    except (KeyError, AttributeError) as e:
        raise _unknown_field_error(argv, e) from e
    except (flags.Error, ValueError, TypeError) as e:
        raise runner.ConfigError(f"Bad command line: {e}") from e
    if len(rest) > 1:
        raise runner.ConfigError(f"Unexpected arguments {rest[1:]}; use --config.FIELD=VALUE.")
    return holder.value


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: parse, run, exit status (0 ok, 2 bad input, 130 interrupted)."""
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(USAGE)
        fields = runner.flat_fields(_load(_config_file(argv)))
        print("Fields (--config.FIELD=VALUE) and their values in this config:")
        print("\n".join(f"  {k} = {v!r}" for k, v in fields.items()))
        return 0
    try:
        config = parse_config(argv)
        runner.run_experiment(config)
    except runner.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
