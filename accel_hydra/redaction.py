"""Hide credentials before anything is printed, logged or saved.

``storage_options`` carry keys, secrets, tokens and connection strings, and the
launcher puts the whole config (``trainer.storage_options`` included) into
``config_dict``, which the logger writes into event files and the launcher into
``config.yaml``. Everything that shows a config or storage options to a person or a
file passes it through :func:`redact`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["REDACTED", "is_secret_key", "redact"]

#: What a hidden value is replaced with.
REDACTED = "***"

# A key names a credential when one of its words (split on _ - . and camelCase) is one
# of these, or the whole key is one of the names below.
_SECRET_WORDS = {
    "secret",
    "password",
    "passwd",
    "token",
    "credential",
    "credentials",
    "key",
    "signature",
    "sas",
}
_SECRET_NAMES = {"connection_string", "connectionstring", "conn_str", "apikey"}
# Keys with a secret-looking word that name no secret.
_HARMLESS_NAMES = {"key_prefix"}
# Credentials inside a longer string: an Azure connection string's AccountKey or
# SharedAccessSignature, a SAS URL's sig=, a URL's user:password@.
_SECRET_IN_TEXT = [
    (re.compile(r"(AccountKey|SharedAccessSignature|SharedAccessKey)=[^;]*", re.I), r"\1=***"),
    (re.compile(r"([?&]sig=)[^&]*", re.I), r"\1***"),
    (re.compile(r"(://[^/:@\s]+:)[^/@\s]+@"), r"\1***@"),
]
# An OmegaConf interpolation names where a secret comes from, not the secret.
_INTERPOLATION = re.compile(r"^\$\{.*\}$")


def is_secret_key(name: str) -> bool:
    """Whether a mapping key names a credential (``aws_secret_access_key``, ``token``...)."""
    lowered = str(name).lower()
    if lowered in _HARMLESS_NAMES:
        return False
    words = re.split(r"[_\-.]", re.sub(r"([a-z])([A-Z])", r"\1_\2", str(name)).lower())
    return lowered in _SECRET_NAMES or any(word in _SECRET_WORDS for word in words)


def redact(value: Any) -> Any:
    """A copy of ``value`` with every credential replaced by :data:`REDACTED`.

    Dicts and lists are walked recursively. A value is hidden when its key names a
    credential (``key``, ``secret``, ``token``, ``password``, ``credential``,
    ``connection_string``, ``sas``...); strings anywhere also lose the secret parts of
    connection strings and URLs. An interpolation such as
    ``${oc.env:AWS_SECRET_ACCESS_KEY}`` is kept, so a saved config can be reused as is.
    The input is never modified.

    Args:
        value: a config, ``storage_options`` dict, list or string.

    Returns:
        The same structure with credentials hidden.

    Example:
        >>> redact({"key": "AKIA123", "client_kwargs": {"endpoint_url": "http://s3"}})
        {'key': '***', 'client_kwargs': {'endpoint_url': 'http://s3'}}
    """
    if isinstance(value, Mapping):
        return {k: _redact_item(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(item) for item in value)
    if isinstance(value, str):
        for pattern, replacement in _SECRET_IN_TEXT:
            value = pattern.sub(replacement, value)
    return value


def _redact_item(key: str, value: Any) -> Any:
    if not is_secret_key(key):
        return redact(value)
    if value is None or isinstance(value, bool):
        return value  # "token: null" or "anon: true" reveal nothing
    if isinstance(value, str) and _INTERPOLATION.match(value.strip()):
        return value
    return REDACTED
