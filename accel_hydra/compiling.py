"""``torch.compile`` for the loop: check the ``compile`` setting and the toolchain early.

The loop compiles the prepared model; what this module adds is the part a user
notices before that: a setting that is not ``torch.compile``'s is refused at
construction, and a machine that cannot build inductor's kernels (no C++ compiler on
CPU, no C compiler or Triton on a GPU) fails in one line before any training, instead
of deep inside the first batch's forward pass.
"""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["CompileToolchainError", "check_toolchain", "compile_options"]

#: What to do instead, in every toolchain error.
_ADVICE = (
    "install one, or set compile=False, or compile={'backend': 'aot_eager'} (no compiler needed)"
)


class CompileToolchainError(RuntimeError):
    """``compile`` asks for a backend this machine cannot build kernels for."""


def compile_options(setting: Any) -> dict[str, Any] | None:
    """The keyword arguments for ``torch.compile`` from a ``compile`` setting.

    Args:
        setting: ``False``/``None`` (no compilation), ``True`` (torch's defaults) or a
            mapping of ``torch.compile`` keyword arguments (``backend``, ``mode``,
            ``fullgraph``, ``dynamic``, ``options``).

    Returns:
        The keyword arguments, or ``None`` when the model is not compiled.

    Raises:
        ValueError: the setting is of another type, or names an argument
            ``torch.compile`` does not take.
    """
    if setting is None or setting is False:
        return None
    if setting is True:
        return {}
    if not isinstance(setting, Mapping):
        raise ValueError(
            f"compile must be True, False or a dict of torch.compile options, "
            f"got {type(setting).__name__} {setting!r}"
        )
    known = set(inspect.signature(torch.compile).parameters) - {"model"}
    unknown = sorted(str(key) for key in setting if key not in known)
    if unknown:
        raise ValueError(
            f"compile has option(s) {unknown} that torch.compile does not take; "
            f"use some of {sorted(known)}"
        )
    return _plain(setting)


def _plain(mapping: Mapping) -> dict[str, Any]:
    """A dict of dicts: a config node (OmegaConf) becomes what torch.compile expects."""
    return {
        str(key): _plain(value) if isinstance(value, Mapping) else value
        for key, value in mapping.items()
    }


def check_toolchain(options: dict[str, Any], device: torch.device) -> None:
    """Raise :class:`CompileToolchainError` when ``options`` cannot compile on ``device``.

    Only inductor (``torch.compile``'s default backend) builds native code: on CPU it
    needs a C++ compiler that works (tried on an empty file), on a GPU Triton and a C
    compiler for Triton's launcher. Other backends need nothing and pass.
    """
    backend = options.get("backend", "inductor")
    if backend != "inductor":
        return
    if device.type == "cpu":
        _check_cpp_compiler()
    elif device.type == "cuda":
        _check_triton()


def _check_cpp_compiler() -> None:
    from torch._inductor import cpp_builder

    try:
        compiler = cpp_builder.get_cpp_compiler()
    except Exception as err:
        raise CompileToolchainError(
            f"compile=True needs a C++ compiler for torch.compile's inductor backend on CPU "
            f"and none was found ({err}); {_ADVICE}"
        ) from None
    with tempfile.TemporaryDirectory(prefix="accel_hydra_cc_") as scratch:
        source = os.path.join(scratch, "probe.cpp")
        with open(source, "w", encoding="utf-8") as file:
            file.write("int accel_hydra_probe() { return 0; }\n")
        command = [compiler, "-c", source, "-o", os.path.join(scratch, "probe.o")]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            failure = result.stderr.strip().splitlines()[-1:] if result.returncode else None
        except (OSError, subprocess.TimeoutExpired) as err:
            failure = [f"{type(err).__name__}: {err}"]
    if failure is not None:
        detail = failure[0] if failure else "no message"
        raise CompileToolchainError(
            f"compile=True needs a working C++ compiler for torch.compile's inductor backend "
            f"on CPU; {compiler} failed on an empty file ({detail}); {_ADVICE}"
        )


def _check_triton() -> None:
    from torch.utils._triton import has_triton

    if not has_triton():
        raise CompileToolchainError(
            "compile=True needs Triton for torch.compile's inductor backend on a GPU and "
            f"it is not installed (pip install triton); {_ADVICE}"
        )
    compiler = os.environ.get("CC") or next(
        (found for name in ("cc", "gcc", "clang") if (found := shutil.which(name))), None
    )
    if compiler is None or shutil.which(compiler) is None:
        raise CompileToolchainError(
            "compile=True needs a C compiler (cc, gcc or clang, or $CC) for Triton's "
            f"kernel launcher on a GPU and none was found; {_ADVICE}"
        )
