"""What upstream AccelHydra (0.0.6) code and configs need to run here, or to fail clearly.

Where a name costs nothing to keep, it works (``project_dir / "x"``, the ``len`` and
``multiply`` resolvers). Where upstream's name would silently do nothing here (a
``get_dataloaders`` override this package never calls, a ``logging_config`` node),
the run stops at start with one line naming the replacement. ``docs/migrating.rst``
holds the full table.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

__all__ = [
    "UPSTREAM_LAUNCHER_METHODS",
    "UPSTREAM_TRAINER_METHODS",
    "LoggingConfig",
    "ProjectDir",
    "UpstreamNameError",
    "check_upstream_methods",
    "multiply",
    "register_default_resolvers",
    "upstream_module_hint",
]


class UpstreamNameError(TypeError):
    """Code or config uses an upstream AccelHydra name this package does not honour."""


#: Upstream ``TrainLauncher`` methods this package never calls -> what to use instead.
UPSTREAM_LAUNCHER_METHODS = {
    "get_dataloaders": "build_dataloaders(self, config) -> (train, val)",
    "get_steps_for_lr_scheduler": (
        "nothing: LRSchedulingMixin passes num_training_steps / num_warmup_steps to an "
        "lr_scheduler partial after prepare"
    ),
    "get_register_resolver_fn": "register_resolvers(self), which registers them itself",
}

#: Upstream ``Trainer`` methods this package never calls -> what to use instead.
UPSTREAM_TRAINER_METHODS = {
    "train_loop": "the on_train_epoch_start/on_train_epoch_end hooks (train() runs the loop)",
    "val_loop": "validation_step and the on_validation_start/on_validation_end hooks",
    "clean_checkpoints_to_k": "save_last_k (retention is CheckpointMixin's)",
    "get_context": "even_batches (the loop keeps uneven shards in step itself)",
    "gather_min_length": "nothing: the loop agrees on the epoch length across processes",
    "wrap_and_broadcast_value": "self.accelerator's collectives (broadcast, reduce)",
    "state_dict": "checkpoint_objects (a list of objects with state_dict/load_state_dict)",
    "load_state_dict": "checkpoint_objects (a list of objects with state_dict/load_state_dict)",
}


def check_upstream_methods(obj: Any, table: dict[str, str], base: type) -> None:
    """Raise if ``obj``'s class defines an upstream method name that ``base`` never calls.

    Only names the class (or a parent below ``base``) defines count: this package's
    own classes define none of them.

    Raises:
        UpstreamNameError: naming the method and what replaces it.
    """
    for klass in type(obj).__mro__:
        if klass is base or not issubclass(klass, base):
            continue
        for name, instead in table.items():
            if name in vars(klass):
                raise UpstreamNameError(
                    f"{klass.__qualname__}.{name} is an upstream AccelHydra method that "
                    f"accel_hydra never calls; use {instead} (see docs/migrating.rst)"
                )


#: Upstream modules that do not exist here -> what replaces them.
UPSTREAM_MODULES = {
    "accel_hydra.models": (
        "subclass torch.nn.Module (the start summary counts parameters; init_from "
        "loads pretrained weights)"
    ),
    "accel_hydra.losses": "compute (and sum) the losses in training_step",
    "accel_hydra.utils": "the TrainLauncher methods register_resolvers, load_config, build_*",
    "accel_hydra.data_module": "accel_hydra.data (PaddingCollate, BucketBatchSampler)",
}


def upstream_module_hint(error: BaseException) -> str:
    """A hint for an import of an upstream-only module anywhere in ``error``'s chain.

    Hydra reports a model module that fails to import as "Error locating target"; the
    real cause, an ``accel_hydra.models`` import say, is only in the chain.

    Returns:
        ``"; <module> is an upstream AccelHydra module ..."``, or ``""``.
    """
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        error = current
        seen.add(id(error))
        name = getattr(error, "name", None) or ""
        root = next((m for m in UPSTREAM_MODULES if name == m or name.startswith(m + ".")), None)
        if isinstance(error, ImportError) and root:
            return (
                f"; {name} is an upstream AccelHydra module that does not exist here: "
                f"{UPSTREAM_MODULES[root]} (see docs/migrating.rst)"
            )
        current = error.__cause__ or error.__context__
    return ""


class ProjectDir(str):
    """A run directory that is a ``str`` and also answers like a ``pathlib.Path``.

    Upstream code writes ``self.project_dir / "config.yaml"`` and
    ``self.project_dir.exists()``; code here joins it with ``os.path.join`` and passes
    it to Accelerate. Being a ``str`` keeps all of that (and fsspec URLs) working;
    ``/`` gives a ``pathlib.Path`` (an URL stays a string), and any other ``Path``
    attribute is answered by ``pathlib.Path(self)``.

    Example:
        >>> ProjectDir("runs/a") / "config.yaml"
        PosixPath('runs/a/config.yaml')
    """

    def __truediv__(self, other: str | os.PathLike) -> Any:
        if "://" in self:
            return ProjectDir(f"{self.rstrip('/')}/{os.fspath(other)}")
        return pathlib.Path(self) / other

    def __rtruediv__(self, other: str | os.PathLike) -> pathlib.Path:
        return pathlib.Path(other) / str(self)

    def __fspath__(self) -> str:
        return str.__str__(self)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(pathlib.Path(str.__str__(self)), name)


class LoggingConfig:
    """Upstream's ``accel_hydra.trainer.LoggingConfig``: refused with the replacement."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise UpstreamNameError(LOGGING_CONFIG_MESSAGE)


LOGGING_CONFIG_MESSAGE = (
    "trainer.logging_config (upstream AccelHydra's LoggingConfig) is not used here; "
    "delete it and set trainer.report_to (e.g. tensorboard) and trainer.log_dir "
    "(default {project_dir}/logs) instead (see docs/migrating.rst)"
)


def multiply(*values: Any) -> Any:
    """The product of the arguments: ``${multiply:${batch_size},${num_gpus}}``."""
    product = 1
    for value in values:
        product *= value
    return product


def register_default_resolvers() -> None:
    """Register the ``len`` and ``multiply`` OmegaConf resolvers upstream configs use.

    Existing resolvers of the same name are kept, so a project's own ``len`` wins.
    """
    from omegaconf import OmegaConf

    for name, function in (("len", len), ("multiply", multiply)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
