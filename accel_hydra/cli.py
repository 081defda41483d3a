"""The ``accel-hydra-train`` console script (also ``python -m accel_hydra.train_entry``)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from accel_hydra.distributed import shut_down_process_group
from accel_hydra.launcher import CONFIG_FILE, ConfigError, TrainLauncher
from accel_hydra.redaction import REDACTED, is_secret_key
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
        "-l",  # upstream AccelHydra's short flag
        "--launcher",
        default=None,
        metavar="PKG.MODULE.CLASS",
        help="a TrainLauncher subclass to use instead of the default",
    )
    return parser


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
    return saved, ["++trainer.resume_from_checkpoint=latest", *args.overrides]


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
        cls(config, [*job, f"++trainer.project_dir={run_dir}"]).run()
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
        config, overrides = _config_and_overrides(args)
        if args.multirun:
            _run_sweep(cls, config, overrides)
        else:
            cls(config, overrides).run()
    except ConfigError as err:
        print(f"accel-hydra-train: error: {err}", file=sys.stderr)
        return 2
    shut_down_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
