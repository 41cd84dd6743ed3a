"""Secret values kept out of everything the project writes for people to read: MLflow runs, notes, logs.

A secret is the value of an environment variable named like a key, token or password, or of one the
inventory names (an endpoint's `api_key_env`, the Hub's `token_env`). It is replaced by `[redacted]`
wherever it appears, before the text leaves the process.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from idp_pipelines import settings

if TYPE_CHECKING:
    from idp_pipelines.lab import Lab

REDACTED = "[redacted]"

# A key whose last dotted part is named like a secret has its value redacted whatever it is
# (engine.api_key); `max_num_batched_tokens` and `asset_key` are not secrets, `hf_token` is.
_SECRET_NAME = re.compile(r"(?i)((^|[_-])(api[_-]?key|apikey|token|secret|passw(or)?d|authori[sz]ation|"
                          r"credentials?|private[_-]?key|access[_-]?key)|^key)$")
_SECRET_ENV = re.compile(r"(?i)(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH)")


def service_env_path(host: str, home: Path | None = None) -> Path:
    """The key store of a Docker host: its `.env` (0600), written by the deploy group's service_secrets."""
    return settings.deploy_dir(home) / host / ".env"


def read_env_file(path: Path) -> dict[str, str]:
    """NAME=value lines of a .env (comments and blank lines skipped); {} when the file does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    return parse_env(text)


def parse_env(text: str) -> dict[str, str]:
    """The one .env parser: NAME=value lines, comments and blank lines skipped."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            out[name.strip()] = value.strip()
    return out


def stored_key(host: str, name: str) -> str | None:
    """A generated key from the host's key store (None when service_secrets has not made it)."""
    return read_env_file(service_env_path(host)).get(name) or None


def stored_keys(home: Path | None = None) -> list[str]:
    """Every generated service key under IDP_HOME: the redactor learns them wherever it runs."""
    root = settings.deploy_dir(home)
    if not root.is_dir():
        return []
    return [v for env in sorted(root.glob("*/.env")) for v in read_env_file(env).values()]


class Redactor:
    """Replaces secret values (and the values of secret-named keys) in text."""

    def __init__(self, secrets: Sequence[str] = ()) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        self.secrets = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)
        # one C-level scan per text, whatever the number of secrets (100 000 commit subjects per notes run)
        self._pattern = re.compile("|".join(map(re.escape, self.secrets))) if self.secrets else None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, names: Sequence[str] = ()) -> Redactor:
        """Values of env vars named like keys/tokens/passwords, the named ones (api_key_env, token_env) and
        the service keys the deploy group generated (the hosts' .env files under IDP_HOME)."""
        env = os.environ if env is None else env
        values = [v for k, v in env.items() if _SECRET_ENV.search(k) and len(v) >= 8]
        values += [env[n] for n in names if env.get(n)]
        return cls(values + stored_keys())

    @classmethod
    def for_lab(cls, lab: Lab, env: Mapping[str, str] | None = None) -> Redactor:
        """The secrets of this lab: those `from_env` finds plus every env var the inventory names as one."""
        return cls.from_env(env, names=[e.api_key_env for e in lab.endpoints if e.api_key_env] + [lab.hub.token_env])

    def text(self, value: str) -> str:
        return self._pattern.sub(REDACTED, value) if self._pattern is not None and value else value

    def value(self, key: str, value: str) -> str:
        return REDACTED if _SECRET_NAME.search(key.rsplit(".", 1)[-1]) else self.text(value)

    def leaks(self, blob: str | bytes) -> bool:
        if isinstance(blob, bytes):
            return any(s.encode() in blob for s in self.secrets)
        return self._pattern is not None and self._pattern.search(blob) is not None
