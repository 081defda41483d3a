"""Check a config node against the signature of what it builds, before building it.

Hydra passes a node's keys to its ``_target_`` as they are: a typo'd key fails deep in
the call with ``unexpected keyword argument``, and ``epochs: ''`` fails later still,
inside the class, with ``'<' not supported between instances of 'str' and 'int'``.
Reading the target's real parameters first lets the error name the key, the type it
expects, and the parameter that was meant.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
import types
import typing
from typing import Any

__all__ = ["closest", "import_failure", "node_problem", "target_parameters", "yaml_position"]

#: Keys Hydra reads itself; never passed to the target.
_HYDRA_KEYS = {"_target_", "_partial_", "_args_", "_recursive_", "_convert_"}


def target_parameters(target: str) -> tuple[dict[str, Any], bool] | None:
    """``({name: annotation}, takes_any_keyword)`` of the callable ``target`` names.

    Returns None when it cannot be imported or has no readable signature (the build
    then reports the problem itself).
    """
    module, _, name = target.rpartition(".")
    try:  # not hydra's get_object: it logs an error of its own on failure
        obj = getattr(importlib.import_module(module), name)
    except Exception:
        return None
    try:
        signature = inspect.signature(obj)
    except Exception:
        return None
    params = {}
    any_keyword = False
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            any_keyword = True
        elif param.kind is not inspect.Parameter.VAR_POSITIONAL:
            params[name] = _evaluated(param.annotation, obj, name)
    return params, any_keyword


def _evaluated(annotation: Any, obj: Any, name: str) -> Any:
    """A string annotation (``from __future__ import annotations``) as a type, read in
    the module of the class that declared it (a dataclass field may come from a base
    class in another module); the string itself when it cannot be evaluated."""
    if not isinstance(annotation, str):
        return annotation
    owners = [
        k for k in getattr(obj, "__mro__", ()) if name in k.__dict__.get("__annotations__", {})
    ]
    module = owners[0].__module__ if owners else getattr(obj, "__module__", None)
    namespace = getattr(sys.modules.get(module) if module else None, "__dict__", {})
    try:
        return eval(annotation, dict(namespace))  # noqa: S307 - an annotation of imported code
    except Exception:
        return annotation


def closest(name: str, candidates: typing.Iterable[str]) -> str | None:
    """The candidate ``name`` was most likely meant to be, if any is close."""
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def node_problem(node: Any, key: str) -> tuple[str, str] | None:
    """The first key of ``node`` (at dotted ``key``) its target cannot take, or whose
    value has the wrong type: ``(dotted key, what is wrong and the fix)``; else None.

    Nested nodes with a ``_target_`` of their own are checked too.
    """
    from omegaconf import DictConfig

    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    target = node.get("_target_")
    found = target_parameters(str(target)) if target else None
    if found is not None:
        params, any_keyword = found
        for name in node:
            name = str(name)
            if name in _HYDRA_KEYS:
                continue
            where = f"{key}.{name}"
            if name not in params:
                if any_keyword:
                    continue
                guess = closest(name, [p for p in params if not p.startswith("_")])
                hint = f"did you mean '{guess}'? " if guess else ""
                return where, f"{target} has no parameter '{name}'; {hint}" + (
                    f"fix or remove {where}"
                )
            try:
                value = node[name]
            except Exception:
                continue  # an interpolation that cannot resolve: Hydra reports it
            wrong = _type_problem(value, params[name])
            if wrong:
                return where, f"{wrong}; set it like -o {where}={_example(params[name])}"
    for name in node:
        if str(name) in _HYDRA_KEYS:
            continue
        try:
            child = node[name]
        except Exception:
            continue
        problem = node_problem(child, f"{key}.{name}")
        if problem:
            return problem
    return None


def _accepted(annotation: Any) -> list[Any] | None:
    """The plain types (or Literal values) an annotation allows; None: unknown."""
    if annotation in (int, float, bool, str, type(None)):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return [("literal", v) for v in typing.get_args(annotation)]
    if origin in (typing.Union, types.UnionType):
        accepted: list[Any] = []
        for arg in typing.get_args(annotation):
            part = _accepted(arg)
            if part is None:
                return None
            accepted += part
        return accepted
    return None


def _type_problem(value: Any, annotation: Any) -> str | None:
    accepted = _accepted(annotation)
    if accepted is None:
        return None
    for kind in accepted:
        if isinstance(kind, tuple):
            if value == kind[1]:
                return None
        elif kind is type(None):
            if value is None:
                return None
        elif kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return None
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return None
        elif isinstance(value, kind):
            return None
    shown = "an empty value" if value == "" else f"{value!r} ({type(value).__name__})"
    return f"expected {_describe(accepted)}, got {shown}"


def _describe(accepted: list[Any]) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    words = []
    for kind in accepted:
        if isinstance(kind, tuple):
            words.append(repr(kind[1]))
        elif kind is type(None):
            words.append("null")
        else:
            words.append(names[kind])
    return " or ".join(dict.fromkeys(words))


def _example(annotation: Any) -> str:
    accepted = _accepted(annotation) or []
    for kind in accepted:
        if isinstance(kind, tuple):
            return str(kind[1])
        if kind in (int, float, bool, str):
            return {int: "5", float: "0.001", bool: "true", str: "text"}[kind]
    return "VALUE"


def import_failure(target: str) -> str | None:
    """Why ``target`` (``pkg.module.Name``) cannot be imported: the real error, one line."""
    module, _, attribute = target.rpartition(".")
    if not module:
        return None
    try:
        imported = importlib.import_module(module)
    except ModuleNotFoundError as err:
        return f"ModuleNotFoundError: {err}"
    except Exception as err:
        return " ".join(f"{type(err).__name__}: {err}".split())
    if not hasattr(imported, attribute):
        return f"module '{module}' has no attribute '{attribute}'"
    return None


def yaml_position(path: str, key: str) -> str | None:
    """``line L, column C`` of dotted ``key`` in the YAML file ``path``, if it is there."""
    import yaml

    try:
        with open(path) as f:
            node = yaml.compose(f)
    except Exception:
        return None
    mark = None
    for part in key.split("."):
        if not isinstance(node, yaml.MappingNode):
            return None
        for key_node, value_node in node.value:
            if key_node.value == part:
                mark, node = key_node.start_mark, value_node
                break
        else:
            return None
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
