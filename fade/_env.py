"""Environment variables the command-line tools read, so container images need no arguments.

* ``FADE_ADDRESS``: the broker's endpoint, the default ``ADDRESS`` of
  ``fade-broker`` (to bind), ``fade-worker`` and ``fade-status`` (to connect).
* ``FADE_KEYS``: the key file of a pool that uses keys (see docs/deploying.md).

``fade.Executor()`` does not read them: with no address it starts an embedded
pool, and that must not change with the environment. Pass
``fade.Executor(os.environ["FADE_ADDRESS"])`` to opt in.
"""

from __future__ import annotations

import os

from fade.defaults import DEFAULT_ADDRESS

__all__ = ["ADDRESS_VAR", "KEYS_VAR", "default_address"]

ADDRESS_VAR = "FADE_ADDRESS"
KEYS_VAR = "FADE_KEYS"


def default_address() -> str:
    """``$FADE_ADDRESS`` if set and not empty, else the protocol's default endpoint."""
    return os.environ.get(ADDRESS_VAR) or DEFAULT_ADDRESS
