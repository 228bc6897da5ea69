"""Triton's repository-API key ("admin key") and the host agent's API token, one of each per instance.

Triton takes the key only on its command line (`--http-restricted-api=model-repository:admin-key=K`),
so that is the one place it lives besides its file: never in a pid file, a log or the config of
the local stack. A key opens the load/unload/index API of its own instance only.

Where a key comes from, first match wins:
1. `triton.admin_keys.<instance>` in the config (production override per instance, e.g. from the
   secret store through `TRITON_HYBRID__TRITON__ADMIN_KEYS__<INSTANCE>`);
2. the file `<key dir>/<instance>.admin-key`, key dir = `triton.credentials_dir`, default
   `<run_dir>/secrets` (0700; files 0600). Whoever starts a Triton locally (`up`, the supervisor,
   the scaler, drills, tests) generates a random key there when the instance has none yet.

Every caller of the repository API gets the key through `admin_key(settings, instance)`.
The local stack's agent tokens (`/v1/status` of each instance's agent) live beside the keys as
`<key dir>/<instance>.agent-token`, made the same way by `ensure_agent_token`.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from control.config import ConfigError
from control.local.procs import private_dir

SUFFIX = ".admin-key"
TOKEN_SUFFIX = ".agent-token"


class AdminKeyMissing(ConfigError):
    """No key for an instance: the message names the instance and where the key is expected."""


def _name(instance) -> str:
    return instance if isinstance(instance, str) else instance.name


def key_dir(settings) -> Path:
    t = settings.triton
    return settings.path(t.credentials_dir) if t.credentials_dir else settings.run_path / "secrets"


def key_path(settings, instance) -> Path:
    return key_dir(settings) / f"{_name(instance)}{SUFFIX}"


def admin_key(settings, instance) -> str:
    """The admin key of one Triton instance (an InstanceConfig or its name)."""
    name = _name(instance)
    override = settings.triton.admin_keys.get(name)
    if override is not None and override.get_secret_value():
        return override.get_secret_value()
    path = key_path(settings, name)
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        raise AdminKeyMissing(f"no admin key for Triton instance {name!r}: {path} does not exist; "
                              "`triton-hybrid up` creates it for the local stack; elsewhere put the instance's "
                              f"key there (mode 0600) or set triton.admin_keys.{name}") from None
    if not key:
        raise AdminKeyMissing(f"the admin key file of Triton instance {name!r} ({path}) is empty")
    return key


def _create_secret(path: Path) -> None:
    """A random secret in a new 0600 file; when another starter won the race, its file stays."""
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32))


def ensure_admin_key(settings, instance) -> str:
    """The instance's key, generated (random, 0600) when it has none yet: for whoever starts a Triton."""
    try:
        return admin_key(settings, instance)
    except AdminKeyMissing:
        pass
    _create_secret(key_path(settings, instance))
    return admin_key(settings, instance)


def agent_token_path(settings, instance) -> Path:
    return key_dir(settings) / f"{_name(instance)}{TOKEN_SUFFIX}"


def ensure_agent_token(settings, instance) -> str:
    """The bearer token of the instance's local agent API, generated (random, 0600) on first use."""
    path = agent_token_path(settings, instance)
    if not path.exists():
        _create_secret(path)
    return path.read_text().strip()
