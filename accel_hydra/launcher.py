"""TrainLauncher: a YAML config -> the objects it names -> ``trainer.train(seed)``.

Each object is built by its own overridable method, so a project changes how one
piece is made (say, a model from a registry) by subclassing and passing
``--launcher pkg.module.MyLauncher`` on the command line. Configs are composed by
Hydra's compose API, so the whole override grammar works: ``key=value``, ``+new=1``,
``++key=value``, ``~key`` and config-group switches such as ``model=big``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from accel_hydra.compat import (
    LOGGING_CONFIG_MESSAGE,
    UPSTREAM_LAUNCHER_METHODS,
    UpstreamNameError,
    check_upstream_methods,
    register_default_resolvers,
    upstream_module_hint,
)
from accel_hydra.distributed import launched_without_gpus
from accel_hydra.redaction import redact

__all__ = ["CONFIG_FILE", "ConfigError", "TrainLauncher"]

#: The resolved config a run saves into its ``project_dir`` (credentials redacted).
CONFIG_FILE = "config.yaml"


class ConfigError(ValueError):
    """A config that cannot be built; the message names the key, the file and the fix."""


class TrainLauncher:
    """Build a run from a YAML file of Hydra ``_target_`` nodes and train it.

    The file holds ``model``, ``optimizer`` (built as a partial over the model's
    parameters), ``train_dataloader``, optional ``val_dataloader``, ``lr_scheduler`` and
    ``loss_fn``, the ``trainer`` node and ``seed``.

    Args:
        config_path: the YAML file. Config groups (``model=big``) are looked up in the
            folders beside it, as Hydra does.
        overrides: Hydra overrides applied on top of the file.

    Example:
        >>> TrainLauncher("examples/digits/configs/train.yaml", ["trainer.epochs=3"]).run()
        ... # doctest: +SKIP
    """

    def __init__(self, config_path: str, overrides: Sequence[str] = ()) -> None:
        self.config_path = str(config_path)
        self.overrides = list(overrides)
        _refuse_upstream_launcher(self)
        register_default_resolvers()

    def run(self) -> Any:
        """Load the config, save it, build every object, train; return the trainer."""
        self.register_resolvers()
        return self.run_config(self.load_config())

    def run_config(self, config: Any) -> Any:
        """Save an already composed config, build every object, train; return the trainer.

        The entry point for a config composed elsewhere (``accel_hydra.hydra_app``, where
        Hydra's own launchers such as submitit run the job).
        """
        from accelerate.utils import set_seed

        if config.get("seed") is not None:
            set_seed(config.seed)  # before the model exists, so its initial weights repeat
        trainer = self.build_trainer(config)
        # Only a config that built is saved: a failed run never replaces a good record.
        self.save_config(config)
        trainer.train(seed=config.get("seed"))
        return trainer

    def register_resolvers(self) -> None:
        """Register OmegaConf resolvers the config uses.

        ``len`` and ``multiply`` (``${multiply:${a},${b}}``) are always registered,
        as upstream AccelHydra did; override this to add your own.
        """

    def load_config(self) -> Any:
        """Compose the YAML file with the overrides.

        Raises:
            ConfigError: the file is missing, or an override is malformed or names a
                key the file does not have.
        """
        from hydra import compose, initialize_config_dir
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if not os.path.isfile(self.config_path):
            raise ConfigError(f"config file {self.config_path} not found; check the -c path")
        config_dir, filename = os.path.split(os.path.abspath(self.config_path))
        try:
            with initialize_config_dir(config_dir=config_dir, version_base=None):
                return compose(config_name=os.path.splitext(filename)[0], overrides=self.overrides)
        except (HydraException, OmegaConfBaseException) as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
            raise ConfigError(
                f"{' '.join(lines)} (config {self.config_path}; "
                "set HYDRA_FULL_ERROR=1 for the full traceback)"
            ) from None

    def save_config(self, config: Any) -> str | None:
        """Write the config into the run directory, credentials redacted; one process.

        Interpolations such as ``${oc.env:AWS_SECRET_ACCESS_KEY}`` are saved as written,
        so ``--resume RUN_DIR`` can rebuild the run from this file.

        Returns:
            The path written (on the main process), else None.
        """
        from accelerate import PartialState
        from omegaconf import OmegaConf

        project_dir = OmegaConf.select(config, "trainer.project_dir")
        state = PartialState(cpu=launched_without_gpus())
        path = None
        if project_dir and state.is_main_process:
            os.makedirs(project_dir, exist_ok=True)
            path = os.path.join(project_dir, CONFIG_FILE)
            plain = OmegaConf.to_container(config, resolve=False)
            # The run directory itself is stored as resolved: an interpolation such as
            # ${hydra:runtime.output_dir} means nothing outside the job that wrote it.
            plain["trainer"]["project_dir"] = str(project_dir)
            with open(path + ".tmp", "w") as f:
                f.write(OmegaConf.to_yaml(OmegaConf.create(redact(plain))))
            os.replace(path + ".tmp", path)
        state.wait_for_everyone()
        return path

    def build_model(self, config: Any) -> Any:
        return self._instantiate(config, "model")

    def build_optimizer(self, config: Any, model: Any) -> Any:
        factory = self._instantiate(config, "optimizer", _partial_=True)
        return factory(model.parameters())

    def build_lr_scheduler(self, config: Any) -> Any:
        if config.get("lr_scheduler") is None:
            return None
        return self._instantiate(config, "lr_scheduler", _partial_=True)

    def build_loss_fn(self, config: Any) -> Any:
        return self._instantiate(config, "loss_fn") if config.get("loss_fn") else None

    def build_dataloaders(self, config: Any) -> tuple[Any, Any]:
        train = self._instantiate(config, "train_dataloader")
        val = self._instantiate(config, "val_dataloader") if config.get("val_dataloader") else None
        return train, val

    def build_trainer(self, config: Any) -> Any:
        """Build every part, then the trainer from the ``trainer`` node."""
        from omegaconf import OmegaConf

        if OmegaConf.select(config, "trainer.logging_config") is not None:
            raise ConfigError(f"{LOGGING_CONFIG_MESSAGE} (config {self.config_path})")
        model = self.build_model(config)
        train_dataloader, val_dataloader = self.build_dataloaders(config)
        parts = {
            "model": model,
            "optimizer": self.build_optimizer(config, model),
            "train_dataloader": train_dataloader,
            "val_dataloader": val_dataloader,
            "lr_scheduler": self.build_lr_scheduler(config),
            "loss_fn": self.build_loss_fn(config),
        }
        # Optional parts the config leaves out are not passed, so a trainer composed
        # without (say) LRSchedulingMixin can be built from a config without a schedule.
        optional = ("val_dataloader", "lr_scheduler", "loss_fn")
        parts = {k: v for k, v in parts.items() if v is not None or k not in optional}
        trainer = self._instantiate(config, "trainer", **parts)
        # Set afterwards: passed to instantiate, its _target_ nodes would be built too.
        trainer.config_dict = redact(OmegaConf.to_container(config, resolve=True))
        return trainer

    def _instantiate(self, config: Any, key: str, **kwargs: Any) -> Any:
        from hydra.errors import InstantiationException
        from hydra.utils import instantiate
        from omegaconf.errors import OmegaConfBaseException

        node = config.get(key)
        if node is None:
            raise ConfigError(f"{self.config_path} has no '{key}' section; add one")
        try:
            return instantiate(node, **kwargs)
        except (InstantiationException, OmegaConfBaseException) as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            lines = [line for line in str(err).strip().splitlines() if line.strip()]
            where = next(
                (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), key
            )
            reason = " ".join(ln.strip() for ln in lines if not ln.startswith("full_key:"))
            reason = reason.replace(
                ", set env var HYDRA_FULL_ERROR=1 to see chained exception.", ""
            )
            raise ConfigError(
                f"cannot build '{where}' from {self.config_path}: {reason}{_fix_for(reason, where)}"
                f"{upstream_module_hint(err)}"
                " (set HYDRA_FULL_ERROR=1 for the full traceback)"
            ) from None


def _refuse_upstream_launcher(launcher: TrainLauncher) -> None:
    """Stop at start when a subclass overrides an upstream method that is never called."""
    try:
        check_upstream_methods(launcher, UPSTREAM_LAUNCHER_METHODS, TrainLauncher)
    except UpstreamNameError as err:
        raise ConfigError(str(err)) from None


def _fix_for(reason: str, key: str) -> str:
    """A hint that turns a Hydra instantiation error into what to change."""
    missing = re.search(
        r"missing \d+ required (?:keyword-only |positional )?argument[s]?: '(\w+)'", reason
    )
    if missing:
        name = missing.group(1)
        return f"; set {key}.{name} in the file, or add it with +{key}.{name}=VALUE"
    if reason.startswith("Error locating target"):
        return f"; check {key}._target_ (module.Name) and that its module imports"
    return ""
