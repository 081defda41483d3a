"""The mixins talk to the loop only through the documented protocol.

The extension-point table in ``accel_hydra/loop.py``'s docstring is the whole contract
between the loop and the mixins: a mixin may override or call the private names listed
there, use public attributes, and use the private names it defines itself. Anything
else (another capability's ``_private`` state, a loop internal) composes by luck only,
so this test reads the package's source and fails naming each such access.
"""

from __future__ import annotations

import ast
import os
import re

import accel_hydra
import accel_hydra.loop

MIXINS_DIR = os.path.join(os.path.dirname(accel_hydra.__file__), "mixins")


def protocol_names() -> set[str]:
    """The private names in the extension-point table of ``accel_hydra.loop``."""
    table = accel_hydra.loop.__doc__
    return set(re.findall(r"^``(_[a-z_]+)\(", table, flags=re.MULTILINE))


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def own_names(cls: ast.ClassDef) -> set[str]:
    """Names the class defines: methods, class attributes, and ``self._x = ...``."""
    names = set()
    for node in cls.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    for node in ast.walk(cls):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        for target in targets:
            for part in ast.walk(target):
                if _is_self_attribute(part):
                    names.add(part.attr)
    return names


def _is_self_attribute(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    )


def _is_super_attribute(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name)
        and node.value.func.id == "super"
    )


def _is_getattr_on_self(node: ast.AST) -> bool:
    """``getattr(self, "_name", ...)`` / ``hasattr(self, "_name")``: a read all the same."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("getattr", "hasattr")
        and len(node.args) >= 2
        and isinstance(node.args[0], ast.Name)
        and node.args[0].id == "self"
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
    )


def foreign_private_accesses(source: str, filename: str, allowed: set[str]) -> list[str]:
    """``file:line: Class uses self._x`` for each private name the class may not use."""
    found = []
    for cls in ast.walk(ast.parse(source, filename)):
        if not isinstance(cls, ast.ClassDef):
            continue
        mine = own_names(cls)
        for node in ast.walk(cls):
            if _is_self_attribute(node):
                name, how = node.attr, f"self.{node.attr}"
            elif _is_super_attribute(node):
                name, how = node.attr, f"super().{node.attr}"
            elif _is_getattr_on_self(node):
                name = node.args[1].value
                how = f'getattr(self, "{name}")'
            else:
                continue
            if is_private(name) and name not in mine and name not in allowed:
                found.append(f"{filename}:{node.lineno}: {cls.name} uses {how}")
    return sorted(found, key=lambda line: int(line.split(":")[1]))


def test_the_table_lists_the_extension_points():
    names = protocol_names()
    assert {"_after_update", "_state_to_save", "_load_state", "_read_loss"} <= names
    for name in names:  # every listed name exists on LoopBase
        assert hasattr(accel_hydra.LoopBase, name), f"{name} is in the table, not on LoopBase"


def test_mixins_touch_no_private_attribute_outside_the_protocol():
    allowed = protocol_names()
    found = []
    for filename in sorted(os.listdir(MIXINS_DIR)):
        if filename.endswith(".py"):
            path = os.path.join(MIXINS_DIR, filename)
            with open(path, encoding="utf-8") as file:
                found += foreign_private_accesses(file.read(), f"mixins/{filename}", allowed)
    assert not found, (
        "mixins use private attributes that neither they nor the extension-point table "
        "in accel_hydra/loop.py define; make what they need public (documented) or add "
        "it to the table:\n" + "\n".join(found)
    )


def test_the_check_catches_a_foreign_private_read():
    source = (
        "class PeekingMixin(LoopBase):\n"
        "    def _after_update(self):\n"
        "        super()._after_update()\n"
        "        self._mine = self._pending_loss_sum\n"
        "        norm = getattr(self, '_grad_norm', None)\n"
    )
    found = foreign_private_accesses(source, "peek.py", allowed={"_after_update"})
    assert found == [
        "peek.py:4: PeekingMixin uses self._pending_loss_sum",
        'peek.py:5: PeekingMixin uses getattr(self, "_grad_norm")',
    ]
