"""Bearer tokens for the model server, stored as SHA-256 hashes in a 0600 file; the secret is shown once.

    tokens = TokenStore(tokens_path(home))
    secret = tokens.issue("frontend")          # print it once; only its hash is kept
    tokens.authenticate(secret)                # "frontend", or None
    tokens.revoke("frontend")
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path

from secure_ml.custody.integrity import atomic_write
from secure_ml.errors import BadInput, ConfigurationError

_TOKEN_NAME = re.compile(r"^[A-Za-z0-9_.@:-]{1,64}$")


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """Bearer tokens for the server, stored as SHA-256 hashes (0600); the secret is shown once."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._cached: tuple[tuple[int, int, int], list[dict[str, str]]] | None = None

    def _load(self) -> list[dict[str, str]]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return []
        # Re-read only when the file changed (issue and revoke replace it by rename): a flood of bad
        # tokens costs a stat and a hash each, not a file parse.
        identity = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if self._cached is not None and self._cached[0] == identity:
            return self._cached[1]
        tokens = self._parse()
        self._cached = (identity, tokens)
        return tokens

    def _parse(self) -> list[dict[str, str]]:
        try:
            data = json.loads(self.path.read_text())
            tokens = data["tokens"]
            if not isinstance(tokens, list):
                raise TypeError
            return [{"name": str(t["name"]), "sha256": str(t["sha256"]), "created": str(t.get("created", ""))}
                    for t in tokens]
        except (ValueError, KeyError, TypeError):
            raise ConfigurationError(f"token file {self.path} is malformed") from None

    def issue(self, name: str) -> str:
        if not _TOKEN_NAME.match(name or ""):
            raise BadInput(f"token name must be 1-64 letters, digits or _.@:- (got {name[:70]!r})")
        tokens = [t for t in self._load() if t["name"] != name]
        secret = secrets.token_urlsafe(32)
        tokens.append({"name": name, "sha256": _hash_token(secret),
                       "created": datetime.now(UTC).isoformat(timespec="seconds")})
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with atomic_write(self.path, mode=0o600) as out:
            out.write(json.dumps({"tokens": tokens}, indent=1).encode())
        return secret

    def revoke(self, name: str) -> bool:
        tokens = self._load()
        kept = [t for t in tokens if t["name"] != name]
        with atomic_write(self.path, mode=0o600) as out:
            out.write(json.dumps({"tokens": kept}, indent=1).encode())
        return len(kept) != len(tokens)

    def names(self) -> list[str]:
        return [t["name"] for t in self._load()]

    def authenticate(self, token: str) -> str | None:
        """The client name for ``token``, or None. Compares every stored hash in constant time."""
        presented = _hash_token(token)
        found: str | None = None
        for entry in self._load():
            if hmac.compare_digest(presented, entry["sha256"]):
                found = entry["name"]
        return found


def tokens_path(home: Path) -> Path:
    return Path(home) / "serving" / "tokens.json"
