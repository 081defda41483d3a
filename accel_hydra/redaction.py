"""Redaction: credentials never reach a console, a log or a saved config.

Storage options and configs carry keys, secrets, tokens and connection strings. Every
place that prints or writes a config passes it through :func:`redact` first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["REDACTED", "is_secret_key", "redact"]

REDACTED = "<redacted>"

# A key is a credential when one of its words (split on _ - . and case) is one of these.
_SECRET_WORDS = {"secret", "password", "passwd", "token", "credential", "credentials", "key"}
_SECRET_NAMES = {"connection_string", "connectionstring", "sas", "sas_token", "apikey"}
_INTERPOLATION = re.compile(r"^\$\{.*\}$")


def is_secret_key(name: str) -> bool:
    """Whether a mapping key names a credential (``aws_secret_access_key``, ``token``...)."""
    lowered = str(name).lower()
    words = re.split(r"[_\-.]", re.sub(r"([a-z])([A-Z])", r"\1_\2", str(name)).lower())
    return lowered in _SECRET_NAMES or any(word in _SECRET_WORDS for word in words)


def redact(value: Any) -> Any:
    """A copy of ``value`` with the values of credential-like keys replaced by ``<redacted>``.

    Mappings and lists are walked recursively. An OmegaConf interpolation such as
    ``${oc.env:AWS_SECRET_ACCESS_KEY}`` is kept: it names where the secret comes from,
    not the secret, and keeping it lets a saved config be reused as is.
    """
    if isinstance(value, Mapping):
        return {
            key: (
                item
                if not is_secret_key(key) or _is_reference(item)
                else (None if item is None else REDACTED)
            )
            if not isinstance(item, Mapping | list | tuple)
            else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    return value


def _is_reference(item: Any) -> bool:
    return isinstance(item, str) and bool(_INTERPOLATION.match(item.strip()))
