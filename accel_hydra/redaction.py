"""Hide credentials before anything is printed, logged or saved.

``storage_options`` carry keys, secrets, tokens and connection strings, and the
launcher puts the whole config (``trainer.storage_options`` included) into
``config_dict``, which the logger writes into event files. Everything that shows a
config or storage options to a person or a file passes it through :func:`redact`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["REDACTED", "redact"]

#: What a hidden value is replaced with.
REDACTED = "***"

# Key names whose values are credentials: matched anywhere in the key, any case,
# so ``aws_secret_access_key``, ``client_kwargs.token`` and ``sas_token`` all match.
_SECRET_KEY = re.compile(
    r"key|secret|token|password|passwd|credential|connection_string|conn_str|sas|signature"
    r"|auth",
    re.IGNORECASE,
)
# Keys that match the pattern above but name no secret.
_HARMLESS_KEYS = {"key_prefix", "use_listings_cache", "skip_instance_cache", "anon"}
# Credentials inside a longer string: an Azure connection string's AccountKey or
# SharedAccessSignature, a SAS URL's sig=, a URL's user:password@.
_SECRET_IN_TEXT = [
    (re.compile(r"(AccountKey|SharedAccessSignature|SharedAccessKey)=[^;]*", re.I), r"\1=***"),
    (re.compile(r"([?&]sig=)[^&]*", re.I), r"\1***"),
    (re.compile(r"(://[^/:@\s]+:)[^/@\s]+@"), r"\1***@"),
]


def redact(value: Any) -> Any:
    """A copy of ``value`` with every credential replaced by :data:`REDACTED`.

    Dicts and lists are walked recursively. A value is hidden when its key names a
    credential (``key``, ``secret``, ``token``, ``password``, ``credential``,
    ``connection_string``, ``sas``...); strings anywhere also lose the secret parts of
    connection strings and URLs. The input is never modified.

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
    if isinstance(value, (list, tuple)):
        return type(value)(redact(item) for item in value)
    if isinstance(value, str):
        for pattern, replacement in _SECRET_IN_TEXT:
            value = pattern.sub(replacement, value)
    return value


def _redact_item(key: str, value: Any) -> Any:
    if key.lower() in _HARMLESS_KEYS or not _SECRET_KEY.search(key):
        return redact(value)
    if value is None or isinstance(value, bool):
        return value  # "token: null" or "anon: true" reveal nothing
    return REDACTED
