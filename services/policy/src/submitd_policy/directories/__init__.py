"""The directories policy reads logins from (``base.Directory``), chained by ``chain.Directories``.

``SUBMITD_POLICY_DIRECTORIES`` names them in order (``file`` by default; e.g. ``["ldap", "file"]``);
each is built from its own settings by the builder named here.
"""

from __future__ import annotations

import importlib

from .base import Account, Directory, DirectoryUnavailable

# name -> "module:function"; the function takes (settings, users_file) and returns a Directory.
BUILDERS = {
    "file": "submitd_policy.directories.file:build",
    "ldap": "submitd_policy.directories.ldap:build",
    "sql": "submitd_policy.directories.sql:build",
}


def build(name: str, settings, users) -> Directory:
    try:
        target = BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown directory {name!r} (known: {', '.join(BUILDERS)})") from None
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)(settings, users)


__all__ = ["Account", "Directory", "DirectoryUnavailable", "BUILDERS", "build"]
