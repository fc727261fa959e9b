"""Command line: ``python -m experiments.run [--config=experiments/configs/X.py] [--config.F=V]``.

With no ``--config`` the embedded default (``experiments/configs/base.py``: the digits BatchNorm
study) runs. Any field can be overridden, e.g. ``--config.rounds=3 --config.seeds=0,1,2
--config.algorithms=fedavg,fedbn --config.mu=0.01 --config.out_dir=/tmp/run``.

An output directory that already holds results is refused: ``--resume=DIR`` continues the run
saved there (its config, its checkpoints; bit for bit), ``--overwrite`` replaces its results.
"""

from __future__ import annotations

import difflib
import inspect
import json
import runpy
import signal
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from experiments import checks, registry, runner
from experiments.configs import base
from fedjax_bn.execution import EXECUTORS

DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "base.py")
USAGE = __doc__
HELP_WIDTH = 100


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
        valid = checks.field_paths(_load(_config_file(argv)))
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


def _valid_names() -> dict[str, list[str]]:
    """The names each name field accepts, from the registries."""
    return {
        "algorithms": sorted(registry.ALGORITHMS),
        "settings": sorted(registry.SETTINGS),
        "model.name": sorted(registry.MODELS),
        "optim.name": sorted(registry.OPTIMIZERS),
        "executor": list(EXECUTORS),
        "augment": sorted(registry.AUGMENTS),
        "loss": sorted(registry.LOSSES),
    }


def field_meanings(notes: dict[str, str], name: str) -> dict[str, str]:
    """What each field means (``base.HELP``, in its order), each followed by the note config
    file ``name`` adds in its own ``HELP`` (``notes``), if any."""
    meanings = dict(base.HELP)
    for k, v in notes.items():
        if v != meanings.get(k):
            meanings[k] = f"{meanings[k]} [{name}: {v}]" if meanings.get(k) else v
    return meanings


def help_text(argv: Sequence[str]) -> str:
    """Usage, the chosen config file's docstring, every field with its value there and its
    meaning (the config files' ``HELP``), valid names."""
    spec = _config_file(argv)
    path = spec.partition(":")[0]
    module = runpy.run_path(path)
    fields: dict[str, Any] = checks.flat_fields(_load(spec))
    meanings = field_meanings(module.get("HELP", {}), Path(path).name)
    order = {k: i for i, k in enumerate(meanings)}  # base.py's order, then the file's own
    values = {k: repr(v) for k, v in fields.items()}
    kw = max(map(len, fields))
    vw = min(max(map(len, values.values())), 24)
    lines = [
        textwrap.fill(
            meanings.get(k) or "(no description)",
            width=HELP_WIDTH,
            initial_indent=f"  {k:<{kw}} = {values[k]:<{vw}}  # ",
            subsequent_indent=" " * (kw + vw + 9),
            break_on_hyphens=False,
            break_long_words=False,
        )
        for k in sorted(fields, key=lambda k: order.get(k, len(order)))
    ]
    names = [
        textwrap.fill(", ".join(v), HELP_WIDTH, initial_indent=f"  {k}: ", subsequent_indent="    ")
        for k, v in _valid_names().items()
    ]
    about = inspect.cleandoc(module.get("__doc__") or "")
    return "\n".join(
        [
            USAGE,
            f"{path}:",
            textwrap.indent(about, "  "),
            "",
            f"Fields (--config.FIELD=VALUE), their values in {spec}\nand what they mean:",
            *lines,
            "",
            "Valid names:",
            *names,
        ]
    )


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _run_flags(argv: list[str]) -> tuple[list[str], str, bool]:
    """``(argv without them, --resume=DIR or '', --overwrite)``; --resume takes no other flag."""
    resume = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--resume=")]
    overwrite = "--overwrite" in argv[1:]
    rest = [a for a in argv if not a.startswith("--resume=") and a != "--overwrite"]
    if resume and (len(rest) > 1 or overwrite):
        raise runner.ConfigError(
            "--resume=DIR continues a run with the config saved in DIR/config.json; give it "
            "alone (no --config flags, no --overwrite)."
        )
    if resume and not resume[0]:
        raise runner.ConfigError("--resume needs the run's output directory: --resume=DIR.")
    return rest, resume[0] if resume else "", overwrite


def resume_config(directory: str) -> ml_collections.ConfigDict:
    """The config a run in ``directory`` was started with (its ``config.json``)."""
    path = Path(directory).expanduser() / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise runner.ConfigError(f"Cannot resume from {directory}: {e}.") from e
    # Fields added to the config since the run started take their defaults (they did not
    # exist, so the run behaved as their defaults do).
    config = _load(DEFAULT_CONFIG)
    unknown = _overlay(config, saved, "")
    if unknown:
        raise runner.ConfigError(
            f"Cannot resume from {directory}: its config.json has fields this version does not "
            f"know: {', '.join(unknown)}."
        )
    config.out_dir = str(path.parent.resolve())
    return config


def _overlay(config: ml_collections.ConfigDict, saved: dict[str, Any], prefix: str) -> list[str]:
    """Set ``saved``'s values into ``config``; returns the dotted names it does not have."""
    unknown = []
    for key, value in saved.items():
        if key not in config:
            unknown.append(prefix + key)
        elif isinstance(value, dict):
            unknown += _overlay(config[key], value, f"{prefix}{key}.")
        else:
            config[key] = tuple(value) if isinstance(value, list) else value
    return unknown


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: parse, run, exit status (0 ok, 2 bad input, 130 interrupted)."""
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        try:
            print(help_text(argv))
        except Exception as e:  # a missing or broken config file
            spec = _config_file(argv)
            why = f"{type(e).__name__}: {e}"
            print(f"error: cannot read config file {spec!r}: {why}", file=sys.stderr)
            return 2
        return 0
    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` checkpoints and summarizes too
    try:
        argv, resume, overwrite = _run_flags(argv)
        config = resume_config(resume) if resume else parse_config(argv)
        runner.run_experiment(config, resume=bool(resume), overwrite=overwrite)
    except runner.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
