"""Key-encryption keys (KEKs) from a key provider; data keys never leave an artifact's key slot.

    keys = LocalKeyring.create(home / "keys" / "keyring.json")   # once: `secure-ml keys init`
    keys = LocalKeyring(home / "keys" / "keyring.json")          # then
    key_id, kek = keys.active_key()

Providers share the small :class:`KeyProvider` interface, so a cloud KMS or Vault provider can
stand behind it later:

- :class:`LocalKeyring`: a JSON keyring file that must be owned by this user and readable by
  nobody else (mode 0600); the default for local development.
- :class:`EnvKeyProvider`: base64 keys from environment variables, for CI secrets. The variable
  is taken out of the process environment on first use (:func:`take_kek_from_environment`), so
  no child inherits it; ``SECURE_ML_KEK_FILE`` (a 0600 file of this user, a Kubernetes Secret
  volume's file: :func:`read_kek_file`; or ``-`` for stdin) hands it over without an environment
  variable at all.

Key material never appears in a repr, a log line or an exception message: only key ids, which
are derived from the key by a one-way hash.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Protocol

from secure_ml.custody.integrity import atomic_write_bytes
from secure_ml.errors import ConfigurationError, KeyUnavailable

KEY_BYTES = 32


class KeyProvider(Protocol):
    """Where key-encryption keys come from."""

    def active_key(self) -> tuple[str, bytes]:
        """The (key id, key) new artifacts are wrapped under."""
        ...

    def key(self, key_id: str) -> bytes:
        """The key with this id; raises KeyUnavailable when there is none."""
        ...


def key_id_for(material: bytes) -> str:
    """A public, one-way identifier for a key (never the key itself)."""
    return "kek-" + hashlib.sha256(b"secure-ml key id v1\0" + material).hexdigest()[:16]


class LocalKeyring:
    """A keyring file with owner-only permissions holding one active and any older KEKs."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"LocalKeyring({str(self.path)!r})"

    # -- creation and rotation -------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, *, exist_ok: bool = True) -> LocalKeyring:
        """Create a keyring with one fresh key (idempotent unless ``exist_ok`` is False)."""
        path = Path(path)
        if path.exists():
            if not exist_ok:
                raise ConfigurationError(f"keyring already exists: {path}")
            keyring = cls(path)
            keyring._load()  # refuse an unsafe existing keyring now, not later
            return keyring
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        material = os.urandom(KEY_BYTES)
        kid = key_id_for(material)
        cls(path)._save({"version": 1, "active": kid, "rotation_pending": False,
                         "keys": {kid: _entry(material)}})
        return cls(path)

    def begin_rotation(self) -> tuple[str, bool]:
        """Add a new active key (or keep the one of an unfinished rotation).

        Returns (active key id, whether this resumed an unfinished rotation). The old keys stay
        until :meth:`finish_rotation`, so an interrupted rotation never strands an artifact.
        """
        data = self._load()
        if data.get("rotation_pending"):
            return str(data["active"]), True
        material = os.urandom(KEY_BYTES)
        kid = key_id_for(material)
        data["keys"][kid] = _entry(material)
        data["active"] = kid
        data["rotation_pending"] = True
        self._save(data)
        return kid, False

    def finish_rotation(self, still_in_use: set[str]) -> list[str]:
        """Drop every retired key no artifact uses any more; returns the ids dropped."""
        data = self._load()
        dropped = [k for k in data["keys"] if k != data["active"] and k not in still_in_use]
        for kid in dropped:
            del data["keys"][kid]
        data["rotation_pending"] = bool(still_in_use - {data["active"]})
        self._save(data)
        return dropped

    def key_ids(self) -> list[str]:
        return list(self._load()["keys"])

    # -- KeyProvider -----------------------------------------------------------------------
    def active_key(self) -> tuple[str, bytes]:
        data = self._load()
        return str(data["active"]), _material(data, str(data["active"]), self.path)

    def key(self, key_id: str) -> bytes:
        return _material(self._load(), key_id, self.path)

    # -- storage ---------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            raise KeyUnavailable(
                f"no keyring at {self.path}: run `secure-ml keys init` (or set SECURE_ML_KEK)"
            ) from None
        # A key file others can read is a leaked key: refuse it rather than use it.
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyUnavailable(
                f"keyring {self.path} is accessible to group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {self.path}"
            )
        if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
            raise KeyUnavailable(f"keyring {self.path} is not owned by the current user")
        try:
            data = json.loads(self.path.read_bytes())
            if not isinstance(data, dict) or data.get("version") != 1 or data["active"] not in data["keys"]:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise KeyUnavailable(f"keyring {self.path} is malformed") from None
        return data

    def _save(self, data: dict[str, Any]) -> None:
        atomic_write_bytes(self.path, json.dumps(data, indent=1).encode(), mode=0o600)


def _entry(material: bytes) -> dict[str, str]:
    return {"material": base64.b64encode(material).decode(), "created": datetime.now(UTC).isoformat()}


def _material(data: dict[str, Any], key_id: str, where: Path | str) -> bytes:
    entry = data["keys"].get(key_id)
    if entry is None:
        raise KeyUnavailable(f"key '{key_id}' is not in {where} (missing key, or the wrong keyring)")
    try:
        material = base64.b64decode(entry["material"], validate=True)
    except (binascii.Error, KeyError, TypeError):
        raise KeyUnavailable(f"key '{key_id}' in {where} is malformed") from None
    if len(material) != KEY_BYTES:
        raise KeyUnavailable(f"key '{key_id}' in {where} is not a 256-bit key")
    return material


class EnvKeyProvider:
    """Keys from environment variables: ``SECURE_ML_KEK`` (active, base64 of 32 bytes) and
    ``SECURE_ML_KEK_RETIRED`` (comma-separated older keys, still accepted for reading)."""

    def __init__(self, environ: dict[str, str] | None = None, *, variable: str = "SECURE_ML_KEK") -> None:
        env = os.environ if environ is None else environ
        self._variable = variable
        raw = env.get(variable, "")
        if not raw:
            raise KeyUnavailable(f"environment variable {variable} is not set")
        self._active = self._decode(raw, variable)
        self._keys = {key_id_for(self._active): self._active}
        retired = env.get(f"{variable}_RETIRED", "")
        for item in filter(None, (s.strip() for s in retired.split(","))):
            material = self._decode(item, f"{variable}_RETIRED")
            self._keys[key_id_for(material)] = material

    def __repr__(self) -> str:
        return f"EnvKeyProvider(variable={self._variable!r})"

    @staticmethod
    def _decode(raw: str, variable: str) -> bytes:
        try:
            material = base64.b64decode(raw, validate=True)
        except binascii.Error:
            raise KeyUnavailable(f"{variable} is not valid base64") from None
        if len(material) != KEY_BYTES:
            raise KeyUnavailable(f"{variable} must hold a base64-encoded 256-bit key")
        return material

    def active_key(self) -> tuple[str, bytes]:
        return key_id_for(self._active), self._active

    def key(self, key_id: str) -> bytes:
        try:
            return self._keys[key_id]
        except KeyError:
            raise KeyUnavailable(
                f"key '{key_id}' is not provided by {self._variable} (missing key, or the wrong key)"
            ) from None


# -- handing a KEK over to this process ----------------------------------------------------------
KEK_VARIABLES = ("SECURE_ML_KEK", "SECURE_ML_KEK_RETIRED")
_handed_over: dict[str, str] = {}  # variable -> value, taken out of the environment (never logged)


def take_kek_from_environment() -> bool:
    """Move ``SECURE_ML_KEK`` (and ``_RETIRED``) out of this process's environment into memory.

    After this no child can inherit it, and the process's original environment block (what
    ``/proc/<pid>/environ`` shows) has the values overwritten. Idempotent; True if a KEK was taken.
    Called before any child is started (the sandbox does) and whenever a key provider is built.
    """
    taken = False
    for variable in KEK_VARIABLES:
        value = os.environ.pop(variable, None)  # also unsetenv(3): children inherit nothing
        if value is not None:
            _handed_over[variable] = value
            taken = True
    if taken:
        _wipe_initial_environment(KEK_VARIABLES)
    return taken or bool(_handed_over)


def _wipe_initial_environment(variables: tuple[str, ...]) -> None:
    """Overwrite ``NAME=value`` in the environment block the kernel set up at exec (it is not
    changed by unsetenv, and /proc/<pid>/environ reads it)."""
    import ctypes

    try:
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end (fields 50 and 51 of stat)
        block = open("/proc/self/environ", "rb").read()
    except (OSError, IndexError, ValueError):
        return
    if not start or end - start < len(block):
        return
    offset = 0
    for entry in block.split(b"\0"):
        name, _, value = entry.partition(b"=")
        if name.decode("ascii", "replace") in variables and value:
            ctypes.memset(start + offset + len(name) + 1, ord("x"), len(value))
        offset += len(entry) + 1


def process_environment() -> dict[str, str]:
    """This process's environment with the handed-over KEK put back in (in memory only): what
    Settings.from_env() reads. Takes the KEK out of the real environment first."""
    take_kek_from_environment()
    return {**os.environ, **_handed_over}


def handed_over_provider(environ: Mapping[str, str]) -> EnvKeyProvider | None:
    """The KEK handed over in ``environ``: ``SECURE_ML_KEK`` (base64), else ``SECURE_ML_KEK_FILE``
    (a file of this user, mode 0600 or 0400, or a Kubernetes Secret volume's file: :func:`read_kek_file`;
    or ``-`` for one line on stdin), else None."""
    if environ.get("SECURE_ML_KEK"):
        return EnvKeyProvider(dict(environ))
    path = environ.get("SECURE_ML_KEK_FILE")
    if path:
        return EnvKeyProvider({"SECURE_ML_KEK": read_kek_file(path)})
    return None


_stdin_kek: list[str] = []


def read_kek_file(path: str) -> str:
    """The base64 KEK in ``path`` (``-``: one line on stdin, read once).

    A key file anyone else could read or change is a leaked key, so exactly two kinds are accepted:

    - a file of this user, mode 0600 or 0400, group and others without any bit (a local key file);
    - a file of root whose group is one of this process's groups, mode 0440 or 0400, on a read-only
      mount: what a Kubernetes Secret volume gives a non-root pod (``defaultMode: 0400`` and the pod's
      ``fsGroup``; the kubelet writes it root:fsGroup 0440 on a read-only tmpfs), reached through the
      volume's ``..data`` symlinks, which must stay inside the file's directory.

    Everything else is refused in one line: any bit for others (world-readable or -writable), group
    write or execute, group read on a file of this user, another owner, a group this process is not
    in, a file of root on a writable mount, a symlink leading out of its directory, a non-file.
    """
    if path == "-":
        if not _stdin_kek:
            import sys

            line = sys.stdin.readline().strip()
            if not line:
                raise KeyUnavailable("SECURE_ML_KEK_FILE is '-' but stdin gave no key")
            _stdin_kek.append(line)
        return _stdin_kek[0]
    where = f"SECURE_ML_KEK_FILE {path}"
    # A Secret volume's file is a symlink (key -> ..data/key -> ..<timestamp>/key): follow it only
    # within the file's own directory, then open the target itself without following anything.
    real = os.path.realpath(path)
    base = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    if os.path.commonpath([real, base]) != base:
        raise KeyUnavailable(f"{where} is a symlink leading out of its directory")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KeyUnavailable(f"{where} does not exist") from None
    except OSError as exc:
        raise KeyUnavailable(f"{where} cannot be opened ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        problem = kek_file_problem(os.fstat(fd), read_only=bool(os.fstatvfs(fd).f_flag & os.ST_RDONLY), path=path)
        if problem:
            raise KeyUnavailable(f"{where} {problem}")
        text = handle.read(4096).decode("ascii", "replace").strip()
    if not text:
        raise KeyUnavailable(f"{where} is empty")
    return text


def kek_file_problem(info: os.stat_result, *, read_only: bool, path: str = "FILE") -> str | None:
    """Why a KEK file with this status may not be used (the rule of :func:`read_kek_file`), or None."""
    mode = stat.S_IMODE(info.st_mode)
    loose = f"is accessible to group or others (mode {mode:04o}); run: chmod 600 {path}"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if mode & (stat.S_IRWXO | stat.S_IWGRP | stat.S_IXGRP):  # others at all, or a group that may change it
        return loose
    own = info.st_uid == os.geteuid()
    if own and mode in (0o600, 0o400):
        return None
    if info.st_uid != 0:
        return loose if own else "is not owned by the current user (nor root's, as a Kubernetes Secret volume's is)"
    # A file of root: only as a Kubernetes Secret volume gives it (root:fsGroup 0440 or 0400, read-only).
    if mode not in (0o440, 0o400):
        return loose if own else f"is root's with mode {mode:04o}, not a Secret volume's 0440 or 0400 (defaultMode: 0400)"
    if mode & stat.S_IRGRP and info.st_gid != os.getegid() and info.st_gid not in os.getgroups():
        return f"is readable by group {info.st_gid}, which this process is not in (the pod's fsGroup)"
    if not read_only:
        return "is root's on a writable mount (a Kubernetes Secret volume is mounted read-only)"
    return None
