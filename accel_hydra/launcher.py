"""TrainLauncher: a YAML config -> the objects it names -> ``trainer.train(seed)``.

Each object is built by its own overridable method, so a project changes how one
piece is made (say, a model from a registry) by subclassing and passing
``--launcher pkg.module.MyLauncher`` on the command line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

__all__ = ["ConfigError", "TrainLauncher"]


class ConfigError(ValueError):
    """A config that cannot be built; the message names the key, the file and the fix."""


class TrainLauncher:
    """Build a run from a YAML file of Hydra ``_target_`` nodes and train it.

    The file holds ``model``, ``optimizer`` (built as a partial over the model's
    parameters), ``train_dataloader``, optional ``val_dataloader``, ``lr_scheduler`` and
    ``loss_fn``, the ``trainer`` node and ``seed``.

    Args:
        config_path: the YAML file.
        overrides: ``key=value`` strings applied on top of the file (``+key=value``
            adds a key the file does not have).

    Example:
        >>> TrainLauncher("examples/digits/configs/train.yaml", ["trainer.epochs=3"]).run()
        ... # doctest: +SKIP
    """

    def __init__(self, config_path: str, overrides: Sequence[str] = ()) -> None:
        self.config_path = str(config_path)
        self.overrides = list(overrides)

    def run(self) -> Any:
        """Load the config, build every object, train; return the trainer."""
        from accelerate.utils import set_seed

        self.register_resolvers()
        config = self.load_config()
        if config.get("seed") is not None:
            set_seed(config.seed)  # before the model exists, so its initial weights repeat
        trainer = self.build_trainer(config)
        trainer.train(seed=config.get("seed"))
        return trainer

    def register_resolvers(self) -> None:
        """Register OmegaConf resolvers the config uses (none by default)."""

    def load_config(self) -> Any:
        """Read the YAML file and apply the overrides.

        Raises:
            ConfigError: the file is missing, or an override names an unknown key.
        """
        from omegaconf import OmegaConf

        if not os.path.isfile(self.config_path):
            raise ConfigError(f"config file {self.config_path} not found; check the -c path")
        config = OmegaConf.load(self.config_path)
        for override in self.overrides:
            key, sep, value = override.partition("=")
            if not sep or not key.lstrip("+"):
                raise ConfigError(f"override {override!r} is not key=value (in {self.config_path})")
            adding = key.startswith("+")
            key = key.lstrip("+")
            if not adding and OmegaConf.select(config, key, default=_MISSING) is _MISSING:
                raise ConfigError(
                    f"override {key!r}: no such key in {self.config_path}; fix the spelling "
                    f"or write +{key}={value} to add it"
                )
            OmegaConf.update(config, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=True)
        return config

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
        trainer.config_dict = OmegaConf.to_container(config, resolve=True)
        return trainer

    def _instantiate(self, config: Any, key: str, **kwargs: Any) -> Any:
        from hydra.errors import InstantiationException
        from hydra.utils import instantiate

        node = config.get(key)
        if node is None:
            raise ConfigError(f"{self.config_path} has no '{key}' section; add one")
        try:
            return instantiate(node, **kwargs)
        except InstantiationException as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            lines = [line for line in str(err).strip().splitlines() if line.strip()]
            where = next(
                (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), key
            )
            reason = " ".join(ln.strip() for ln in lines if not ln.startswith("full_key:"))
            raise ConfigError(
                f"cannot build '{where}' from {self.config_path}: {reason} "
                "(set HYDRA_FULL_ERROR=1 for the full traceback)"
            ) from None


_MISSING = object()
