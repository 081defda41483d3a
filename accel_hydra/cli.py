"""The ``accel-hydra-train`` console script (also ``python -m accel_hydra.train_entry``)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from accel_hydra.distributed import shut_down_process_group
from accel_hydra.evaluate_run import DEFAULT_CHECKPOINT, validate_run
from accel_hydra.launcher import CONFIG_FILE, RUN_INFO_KEY, ConfigError, TrainLauncher
from accel_hydra.redaction import REDACTED, is_secret_key, redact
from accel_hydra.sweeps import expand_sweeps

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accel-hydra-train",
        description="Train from a YAML config of Hydra _target_ nodes.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-c", "--config", help="the YAML config file")
    source.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help=f"continue a run from its saved {CONFIG_FILE} and latest checkpoint",
    )
    parser.add_argument(
        "-o",
        "--overrides",
        nargs="*",
        action="extend",
        default=[],
        metavar="OVERRIDE",
        help="Hydra overrides: key=value, +new=1, ~key, group=option (with -m, a=1,2 sweeps)",
    )
    parser.add_argument(
        "-m",
        "--multirun",
        action="store_true",
        help="run every combination of the swept overrides, one after another, each in "
        "<project_dir>/multirun/<n>",
    )
    parser.add_argument(
        "--validate",
        nargs="?",
        const=DEFAULT_CHECKPOINT,
        default=None,
        metavar="CHECKPOINT",
        help="with --resume: validate a checkpoint of the run instead of training (a name "
        "such as best or step_20, latest, or a path/URL; default: best, else latest), print "
        "one line per metric; writes nothing into the run directory",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="with --validate: print the metrics as one JSON object",
    )
    parser.add_argument(
        "-l",  # upstream AccelHydra's short flag
        "--launcher",
        default=None,
        metavar="PKG.MODULE.CLASS",
        help="a TrainLauncher subclass to use instead of the default",
    )
    return parser


def _check_validate_arguments(args: argparse.Namespace) -> None:
    if args.validate is not None and not args.resume:
        raise ConfigError(
            "--validate needs --resume RUN_DIR: it evaluates a checkpoint of that run"
        )
    if args.validate is not None and args.multirun:
        raise ConfigError("--validate and -m/--multirun do not go together; validate one run")
    if args.json and args.validate is None:
        raise ConfigError("--json only applies to --validate")


def _launcher_class(dotted: str | None) -> type[TrainLauncher]:
    if dotted is None:
        return TrainLauncher
    module_name, _, class_name = dotted.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"--launcher {dotted}: cannot import it ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, TrainLauncher)):
        raise ConfigError(f"--launcher {dotted} is not a subclass of TrainLauncher")
    return cls


def _config_and_overrides(args: argparse.Namespace) -> tuple[str, list[str]]:
    if args.config:
        return args.config, list(args.overrides)
    saved = os.path.join(args.resume, CONFIG_FILE)
    if not os.path.isfile(saved):
        raise ConfigError(
            f"--resume {args.resume}: no {CONFIG_FILE} there; give the run directory "
            "(the trainer's project_dir) of a run started with accel-hydra-train"
        )
    return saved, [*_resume_overrides(args.resume, saved), *args.overrides]


def _resume_overrides(run_dir: str, saved: str) -> list[str]:
    """Overrides that make a run continue in ``run_dir``, wherever it now lives.

    The run directory given wins over the ``project_dir`` saved in its config (a
    copied or moved run must not write into the original), and local
    ``checkpoint_dir``/``log_dir`` paths that were inside the old run directory move
    with it. The working directory the run's modules came from goes on ``sys.path``.
    """
    import yaml

    try:
        with open(saved) as f:
            plain = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--resume {run_dir}: cannot read {saved} ({err})") from None
    run_dir = os.path.abspath(run_dir)
    trainer: dict[str, Any] = plain["trainer"] if isinstance(plain.get("trainer"), dict) else {}
    info: dict[str, Any] = plain[RUN_INFO_KEY] if isinstance(plain.get(RUN_INFO_KEY), dict) else {}
    working_dir = info.get("working_dir")
    if isinstance(working_dir, str) and os.path.isdir(working_dir) and working_dir not in sys.path:
        sys.path.insert(1, working_dir)
    overrides = [
        "++trainer.resume_from_checkpoint=latest",
        f"++trainer.project_dir={_quoted(run_dir)}",
    ]
    old = trainer.get("project_dir")
    base = working_dir if isinstance(working_dir, str) else os.getcwd()
    for key in ("checkpoint_dir", "log_dir"):
        value = trainer.get(key)
        if not isinstance(old, str) or not isinstance(value, str):
            continue
        if "${" in value or "://" in value:
            continue  # an interpolation follows project_dir; a URL stays where it is
        path = os.path.normpath(os.path.join(base, value))
        old_abs = os.path.normpath(os.path.join(base, old))
        if path == old_abs or path.startswith(old_abs + os.sep):
            moved = os.path.join(run_dir, os.path.relpath(path, old_abs))
            overrides.append(f"++trainer.{key}={_quoted(moved)}")
    return overrides


def _quoted(value: str) -> str:
    """A path as a Hydra override value, whatever characters it holds."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _resume_command() -> str:
    """The command line that continues a run (``{run_dir}`` filled in by the launcher)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return (
            "run `accelerate launch <the same launch options> -m accel_hydra.train_entry "
            "--resume {run_dir}`"
        )
    return "run `accel-hydra-train --resume {run_dir}`"


def _run_sweep(cls: type[TrainLauncher], config: str, overrides: list[str]) -> None:
    from accelerate.state import AcceleratorState, GradientState
    from omegaconf import OmegaConf

    try:
        jobs = expand_sweeps(overrides)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    base = OmegaConf.select(cls(config, jobs[0]).load_config(), "trainer.project_dir")
    for index, job in enumerate(jobs):
        run_dir = os.path.join(base, "multirun", str(index))
        if int(os.environ.get("RANK", "0")) == 0:
            shown = " ".join(_hide_secret_override(o) for o in job)
            print(f"accel-hydra-train: job {index + 1}/{len(jobs)}: {shown} -> {run_dir}")
        launcher = cls(config, [*job, f"++trainer.project_dir={run_dir}"])
        launcher.resume_advice = _resume_command()
        launcher.run()
        # Each job builds its own Accelerator; keep the process group, drop the rest.
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _hide_secret_override(override: str) -> str:
    key, sep, _ = override.partition("=")
    if sep and is_secret_key(key.lstrip("+~").rsplit(".", 1)[-1]):
        return f"{key}={REDACTED}"
    return override


def main(argv: Sequence[str] | None = None) -> int:
    """Run training from the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    # Like `python -m`, let configs name modules of the project run from.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        cls = _launcher_class(args.launcher)
        _check_validate_arguments(args)
        config, overrides = _config_and_overrides(args)
        if args.validate is not None:
            validate_run(cls(config, overrides), args.validate, as_json=args.json)
        elif args.multirun:
            _run_sweep(cls, config, overrides)
        else:
            launcher = cls(config, overrides)
            launcher.resume_advice = _resume_command()
            launcher.run()
    except ConfigError as err:
        # The error may quote an override or a URL verbatim: hide any credential in it.
        line = " ".join(redact(str(err)).split())
        print(f"accel-hydra-train: error: {line}", file=sys.stderr)
        return 2
    shut_down_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
