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
import sys
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
from accel_hydra.config_checks import (
    closest,
    import_failure,
    node_problem,
    target_parameters,
    yaml_position,
)
from accel_hydra.distributed import launched_without_gpus
from accel_hydra.redaction import redact

__all__ = ["CONFIG_FILE", "ConfigError", "RunNotStartedError", "TrainLauncher"]

#: The resolved config a run saves into its ``project_dir`` (credentials redacted).
CONFIG_FILE = "config.yaml"

#: Where ``config.yaml`` records facts about the launch itself (not passed to anything).
RUN_INFO_KEY = "accel_hydra"

_FULL_ERROR = "set HYDRA_FULL_ERROR=1 for the full traceback"


class ConfigError(ValueError):
    """A config that cannot be built; the message names the key, the file and the fix."""


class RunNotStartedError(ConfigError):
    """The objects were built, but the run could not start (a directory that cannot be
    written, a checkpoint that does not fit, a monitored metric validation never
    returns...). Nothing was written into the run directory."""


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


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
        #: How the run is continued after an interruption, shown in the message, with
        #: ``{run_dir}`` for the run directory. The console script sets its command
        #: line; left None, the message names the Python API.
        self.resume_advice: str | None = None
        _refuse_upstream_launcher(self)
        register_default_resolvers()

    def run(self) -> Any:
        """Load the config, save it, build every object, train; return the trainer."""
        self.register_resolvers()
        return self.run_config(self.load_config())

    def run_config(self, config: Any) -> Any:
        """Build every object, train, and save the config once the run started.

        ``config.yaml`` is written when the trainer has restored its checkpoint and
        passed its pre-flight checks, just before the first batch: a run that fails
        to build or to start leaves the run directory exactly as it was. Such a
        failure is raised as :class:`RunNotStartedError` (one line; the original
        exception with ``HYDRA_FULL_ERROR=1``). Returns the trainer.

        The entry point for a config composed elsewhere (``accel_hydra.hydra_app``, where
        Hydra's own launchers such as submitit run the job).
        """
        from accelerate.utils import set_seed

        if config.get("seed") is not None:
            set_seed(config.seed)  # before the model exists, so its initial weights repeat
        trainer = self.build_trainer(config)
        if self.resume_advice:
            run_dir = os.path.abspath(str(trainer.project_dir))
            trainer.resume_advice = self.resume_advice.format(run_dir=run_dir)
        started = []
        trainer._run_start_actions.append(lambda: started.append(self.save_config(config)))
        try:
            trainer.train(seed=config.get("seed"))
        except Exception as err:
            if started or _full_error() or not _is_setup_error(err):
                raise
            raise RunNotStartedError(
                f"{_one_line(err)} (the run did not start and wrote nothing; {_FULL_ERROR})"
            ) from None
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
        import yaml
        from hydra import compose, initialize_config_dir
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if not os.path.isfile(self.config_path):
            raise ConfigError(f"config file {self.config_path} not found; check the -c path")
        config_dir, filename = os.path.split(os.path.abspath(self.config_path))
        overrides = list(self.overrides)
        # A field of the target that the file leaves out is not a typo: set it without
        # "+" (so the advice `-o trainer.resume_from_checkpoint=latest` works).
        for _ in range(len(overrides) + 1):
            try:
                with initialize_config_dir(config_dir=config_dir, version_base=None):
                    return compose(config_name=os.path.splitext(filename)[0], overrides=overrides)
            except (HydraException, OmegaConfBaseException, yaml.YAMLError) as err:
                if _full_error():
                    raise
                retry = self._unknown_override(err, overrides, config_dir, filename)
                if retry is None:
                    raise self._load_error(err, config_dir) from None
                overrides = retry
        raise AssertionError("unreachable: each retry adds a prefix to one more override")

    def _unknown_override(
        self, err: Exception, overrides: list[str], config_dir: str, filename: str
    ) -> list[str] | None:
        """Overrides to retry with after ``Could not override 'a.b'``, or None.

        Retries with ``++a.b=...`` when ``b`` is a parameter of the ``_target_`` at
        ``a``; otherwise raises the error with the closest parameter name.
        """
        from hydra import compose, initialize_config_dir

        found = re.search(r"Could not override '([^']+)'", str(err))
        if not found:
            return None
        key = found.group(1)
        index = next(
            (i for i, o in enumerate(overrides) if o.split("=", 1)[0].lstrip("+~") == key), None
        )
        parent_key, _, name = key.rpartition(".")
        if index is None or not parent_key:
            return None
        try:
            with initialize_config_dir(config_dir=config_dir, version_base=None):
                before = compose(
                    config_name=os.path.splitext(filename)[0], overrides=overrides[:index]
                )
            from omegaconf import OmegaConf

            parent = OmegaConf.select(before, parent_key)
            target = parent.get("_target_") if parent is not None else None
        except Exception:
            return None
        found_params = target_parameters(str(target)) if target else None
        if found_params is None:
            return None
        params, any_keyword = found_params
        if name in params or any_keyword:
            return [*overrides[:index], "++" + overrides[index], *overrides[index + 1 :]]
        guess = closest(name, [p for p in params if not p.startswith("_")])
        hint = f"did you mean '{parent_key}.{guess}'? " if guess else ""
        raise ConfigError(
            f"-o {overrides[index]}: {target} has no parameter '{name}' (config "
            f"{self.config_path}); {hint}check the key"
        )

    def _load_error(self, err: Exception, config_dir: str) -> ConfigError:
        import yaml

        syntax = _yaml_syntax_error(err)
        if syntax is None and "yaml" in type(err).__module__ + str(err).lower():
            syntax = _first_bad_yaml(config_dir)
        if syntax is not None:
            return ConfigError(syntax)
        if isinstance(err, yaml.YAMLError):
            return ConfigError(f"{self.config_path}: {_one_line(err)}")
        return ConfigError(f"{_one_line(err)} (config {self.config_path}; {_FULL_ERROR})")

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
            plain["trainer"]["project_dir"] = os.path.abspath(str(project_dir))
            info = plain.get(RUN_INFO_KEY)
            info = dict(info) if isinstance(info, dict) else {}
            # Where `--resume` finds the project's modules again, from any directory.
            info["working_dir"] = _import_root(OmegaConf.select(config, "trainer._target_"))
            plain[RUN_INFO_KEY] = info
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
        problem = None if _full_error() else node_problem(node, key)
        if problem:
            where, what = problem
            raise ConfigError(f"{where} in {self._where(where)}: {what}")
        try:
            return instantiate(node, **kwargs)
        except (InstantiationException, OmegaConfBaseException) as err:
            if _full_error():
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
                f" ({_FULL_ERROR})"
            ) from None

    def _where(self, key: str) -> str:
        """``FILE line L, column C`` for a key written in the file; the override
        for one set on the command line."""
        for override in self.overrides:
            if override.split("=", 1)[0].lstrip("+~") == key:
                return f"-o {override}"
        position = yaml_position(self.config_path, key)
        return f"{self.config_path} {position}" if position else self.config_path


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
    located = re.match(r"Error locating target '([^']+)'", reason)
    if located:
        real = import_failure(located.group(1))
        because = f" ({real})" if real else ""
        return (
            f"{because}; check {key}._target_ (module.Name) and that its module imports from "
            f"{os.getcwd()} (run from the directory that holds the package, or put that "
            "directory on PYTHONPATH)"
        )
    return ""


#: Exception types accel_hydra raises for a setting it cannot start with.
_SETUP_ERRORS = (ValueError, KeyError, TypeError, OSError, RuntimeError)


def _is_setup_error(err: BaseException) -> bool:
    """Whether ``err`` is a setup problem accel_hydra reported itself (raised in its
    own code, of a type it uses for settings), not a bug in user code, which keeps
    its traceback."""
    if not isinstance(err, _SETUP_ERRORS):
        return False
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    package = os.path.dirname(os.path.abspath(__file__))
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(
        package + os.sep
    )


def _one_line(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split())


def _yaml_syntax_error(err: BaseException) -> str | None:
    """``FILE:LINE:COLUMN: YAML syntax error: ...`` from a YAML error in ``err``'s chain."""
    import yaml

    seen: BaseException | None = err
    while seen is not None and not isinstance(seen, yaml.MarkedYAMLError):
        seen = seen.__cause__ or seen.__context__
    if seen is None or seen.problem_mark is None:
        return None
    mark = seen.problem_mark
    what = " ".join(p for p in (seen.context, seen.problem) if p)
    return (
        f"{mark.name}:{mark.line + 1}:{mark.column + 1}: YAML syntax error: {what}; fix the "
        "file at that line (check brackets, quotes and indentation)"
    )


def _first_bad_yaml(config_dir: str) -> str | None:
    import yaml

    for root, _, files in sorted(os.walk(config_dir)):
        for name in sorted(files):
            if not name.endswith((".yaml", ".yml")):
                continue
            path = os.path.join(root, name)
            try:
                with open(path) as f:
                    yaml.safe_load(f)
            except yaml.YAMLError as err:
                return _yaml_syntax_error(err)
            except OSError:
                continue
    return None


def _import_root(target: Any) -> str:
    """The directory the module of ``target`` was imported from (its package root);
    the working directory when that is unknown or an installed package."""
    module_name = str(target or "").rpartition(".")[0]
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if not path or "site-packages" in path or "dist-packages" in path:
        return os.getcwd()
    root = os.path.dirname(os.path.abspath(path))
    depth = module_name.count(".") + (1 if path.endswith("__init__.py") else 0)
    for _ in range(depth):
        root = os.path.dirname(root)
    return root
