"""Real git repos for the tests: the git CLI with fixed identities and dates (deterministic shas)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

BASE_TIME = 1_714_550_400  # 2024-05-01 08:00 UTC


class Repo:
    def __init__(self, path: Path, branch: str = "main") -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.clock = BASE_TIME
        self.git("init", "-q", "-b", branch)

    def env(self, when: int, tz: str = "+0200", author: str = "Ada Lovelace") -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        env.update(GIT_AUTHOR_NAME=author, GIT_AUTHOR_EMAIL="ada@example.org", GIT_COMMITTER_NAME=author,
                   GIT_COMMITTER_EMAIL="ada@example.org", GIT_AUTHOR_DATE=f"@{when} {tz}",
                   GIT_COMMITTER_DATE=f"@{when} {tz}", GIT_CONFIG_NOSYSTEM="1", HOME=str(self.path.parent))
        return env

    def git(self, *args: str, input: bytes | None = None, env: dict | None = None) -> str:
        out = subprocess.run(["git", "-C", str(self.path), "-c", "commit.gpgsign=false", *args], input=input,
                             capture_output=True, env=env or self.env(self.clock), check=True)
        return out.stdout.decode("utf-8", "replace").strip()

    def commit(self, message: str | bytes, files: dict[str, str | bytes | None] | None = None, *,
               encoding: str | None = None, author: str = "Ada Lovelace", tz: str = "+0200", step: int = 3600) -> str:
        """Write (or delete, with None) files, commit them with a raw-bytes message; return the sha."""
        self.clock += step
        for name, content in (files or {}).items():
            p = self.path / name
            if content is None:
                self.git("rm", "-q", "--", name)
                continue
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content.encode() if isinstance(content, str) else content)
            self.git("add", "--", name)
        msg = message.encode() if isinstance(message, str) else message
        msgfile = self.path.parent / f".msg-{self.path.name}"
        msgfile.write_bytes(msg)
        pre = ["-c", f"i18n.commitEncoding={encoding}"] if encoding else []
        self.git(*pre, "commit", "-q", "--allow-empty", "--cleanup=verbatim", "-F", str(msgfile),
                 env=self.env(self.clock, tz, author))
        return self.head()

    def head(self, ref: str = "HEAD") -> str:
        return self.git("rev-parse", ref)

    def linear(self, n: int, prefix: str = "change") -> list[str]:
        return [self.commit(f"{prefix} {i}\n", {f"src/{prefix}.txt": f"{prefix} {i}\n" * (i + 1)}) for i in range(n)]
