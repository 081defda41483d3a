"""The ``accel-hydra-train`` console script."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from accel_hydra.launcher import ConfigError, TrainLauncher

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accel-hydra-train",
        description="Train from a YAML config of Hydra _target_ nodes.",
    )
    parser.add_argument("-c", "--config", required=True, help="the YAML config file")
    parser.add_argument(
        "-o",
        "--overrides",
        nargs="*",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="overrides, e.g. trainer.epochs=5 optimizer.lr=1e-3 (+key=value adds a key)",
    )
    parser.add_argument(
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run training from the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    # Like `python -m`, let configs name modules of the project run from.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        _launcher_class(args.launcher)(args.config, args.overrides).run()
    except ConfigError as err:
        print(f"accel-hydra-train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
