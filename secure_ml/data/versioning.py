"""Dataset versions in DVC: each accepted drop's ciphertext, tracked and pushed to a remote.

    versions = DatasetVersions.from_settings(settings)       # $SECURE_ML_HOME/dvc, remote dvc-remote
    version = versions.track(source_sha256, store.path_for(dataset_sha256))   # dvc add + dvc push
    version.version                                          # "md5:…" (DVC's hash of the ciphertext)
    versions.annotate(source_sha256, {"dataset_sha256": …})  # meta: in the .dvc file
    versions.find(source_sha256)                             # the DvcVersion, or None
    versions.restore_into_store(source_sha256, store, dataset_sha256)   # dvc pull, then verified

Only encrypted bytes (the artifact store's ``.smle`` objects) ever enter the repository: DVC's
cache and remote hold ciphertext, so a copied remote reveals nothing without the key. The
repository is a plain DVC repository without git (``no_scm``); each drop is one file,
``drops/<source sha256>.smle``, and its ``.dvc`` file is the version record. From a shell::

    cd $SECURE_ML_HOME/dvc && dvc status && dvc status --cloud && dvc pull

DVC runs in-process through its Python API (about 0.1 s per drop once loaded, against about
1.6 s for spawning ``dvc add`` and ``dvc push``). Operations are serialised by a file lock, so two
runs ingesting at once do not trip over DVC's own repository lock. Analytics and update checks
are off in the repository's configuration, and DVC's site cache lives inside the repository
(not the world-writable ``/var/tmp/dvc``).

Key rotation re-wraps the store's objects, not the copies in DVC: keep retired keys in the keyring
for as long as DVC versions made under them must stay readable.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from secure_ml.custody.integrity import SHA256_HEX, atomic_write, atomic_write_bytes
from secure_ml.errors import BadInput, ConfigurationError, IntegrityError

_KEY = SHA256_HEX
REMOTE_NAME = "local"
DROPS = "drops"


class _HasConfig(Protocol):
    @property
    def home(self) -> Path: ...

    def load_config(self, name: str) -> dict[str, Any]: ...


class _Store(Protocol):
    def path_for(self, digest: str) -> Path: ...

    def verify(self, digest: str) -> int: ...


@dataclass(frozen=True)
class DvcVersion:
    """One tracked drop: where it is in the repository and DVC's hash of its ciphertext."""

    key: str
    path: str
    md5: str
    size: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return f"md5:{self.md5}"

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "path": self.path, "size": self.size}


def _md5_file(path: Path) -> str:
    """DVC's content id for a file (not a security digest: the store's SHA-256 and GCM tags are)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class DatasetVersions:
    """A DVC repository of dataset ciphertexts, with a default remote."""

    def __init__(self, root: Path | str, remote: str | Path) -> None:
        self.root = Path(root).absolute()
        remote = str(remote)
        self.remote = remote if "://" in remote else str(Path(remote).absolute())

    @classmethod
    def from_settings(cls, settings: _HasConfig) -> DatasetVersions:
        dvc = (settings.load_config("pipeline").get("dataset") or {}).get("dvc") or {}
        if not isinstance(dvc, Mapping):
            raise ConfigurationError("pipeline.yaml dataset.dvc must be a mapping")
        home = Path(settings.home)
        remote = str(dvc.get("remote") or "dvc-remote")
        return cls(home / str(dvc.get("repo") or "dvc"), remote if "://" in remote else home / remote)

    def __repr__(self) -> str:
        return f"DatasetVersions({str(self.root)!r})"

    # -- layout -----------------------------------------------------------------------------
    def workspace_path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise BadInput(f"not a SHA-256 digest: {key[:80]!r}")
        return self.root / DROPS / f"{key}.smle"

    def dvcfile(self, key: str) -> Path:
        return self.workspace_path(key).with_name(f"{key}.smle.dvc")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.parent.mkdir(parents=True, exist_ok=True)
        with open(self.root.with_name(self.root.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _config_text(self) -> tuple[str, str]:
        url = self.remote
        if "://" not in url:
            # Relative to .dvc/, so the home can move as a whole and `dvc pull` still finds it.
            url = os.path.relpath(url, self.root / ".dvc")
        shared = ("# Written by secure-ml (secure_ml/data/versioning.py). Nothing phones home.\n"
                  "[core]\n    no_scm = True\n    analytics = False\n    check_update = False\n"
                  f"    remote = {REMOTE_NAME}\n"
                  f"['remote \"{REMOTE_NAME}\"']\n    url = {url}\n")
        local = f"[core]\n    site_cache_dir = {self.root / '.dvc' / 'tmp' / 'site-cache'}\n"
        return shared, local

    def _ensure(self) -> None:
        """Create the repository and (re)write its configuration; call with the lock held."""
        if not (self.root / ".dvc").is_dir():
            from dvc.repo import Repo

            self.root.mkdir(parents=True, exist_ok=True)
            dvc_logger = logging.getLogger("dvc")
            level = dvc_logger.level
            dvc_logger.setLevel(logging.WARNING)  # "Initialized DVC repository." is not news here
            try:
                Repo.init(str(self.root), no_scm=True).close()
            finally:
                dvc_logger.setLevel(level)
        shared, local = self._config_text()
        for name, text in (("config", shared), ("config.local", local)):
            path = self.root / ".dvc" / name
            if not path.exists() or path.read_text() != text:
                atomic_write_bytes(path, text.encode(), mode=0o644)
        if "://" not in self.remote:
            try:
                Path(self.remote).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigurationError(f"DVC remote {self.remote} cannot be created ({exc.strerror})") from None

    def _repo(self) -> Any:
        from dvc.repo import Repo

        return Repo(str(self.root))

    # -- versions ---------------------------------------------------------------------------
    def find(self, key: str) -> DvcVersion | None:
        """The tracked version for ``key`` from its .dvc file (no DVC import), or None."""
        dvcfile = self.dvcfile(key)
        try:
            data = yaml.safe_load(dvcfile.read_text())
            out = data["outs"][0]
            return DvcVersion(key, str(Path(DROPS) / f"{key}.smle"), str(out["md5"]), int(out.get("size", 0)),
                              dict(data.get("meta") or {}))
        except FileNotFoundError:
            return None
        except (yaml.YAMLError, KeyError, IndexError, TypeError, ValueError):
            raise IntegrityError(f"DVC file {dvcfile.name} is malformed; restore it or remove the version") from None

    def track(self, key: str, ciphertext: Path | str) -> DvcVersion:
        """Copy ``ciphertext`` into the repository as the version for ``key``, add it, push it.

        All or nothing: if add or push fails, the workspace file and .dvc file are removed again.
        """
        target = self.workspace_path(key)
        with self._locked():
            self._ensure()
            with open(ciphertext, "rb") as src, atomic_write(target, mode=0o640) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            try:
                with self._repo() as repo:
                    repo.add([str(target)])
                    repo.push(targets=[str(self.dvcfile(key))])
            except Exception as exc:
                self._remove(key)
                raise ConfigurationError(f"DVC could not version the drop ({type(exc).__name__}: "
                                         f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
            version = self.find(key)
        if version is None:  # pragma: no cover - add always writes the .dvc file
            raise IntegrityError("DVC did not write a .dvc file")
        if version.md5 != _md5_file(target):
            raise IntegrityError(f"DVC recorded md5:{version.md5} for {version.path}, which is not its content")
        return version

    def annotate(self, key: str, meta: Mapping[str, Any]) -> DvcVersion:
        """Record ``meta`` (digests, source, who) in the version's .dvc file; DVC keeps it as is."""
        with self._locked():
            dvcfile = self.dvcfile(key)
            data = yaml.safe_load(dvcfile.read_text())
            data["meta"] = dict(meta)
            atomic_write_bytes(dvcfile, yaml.safe_dump(data, sort_keys=False).encode(), mode=0o644)
        version = self.find(key)
        if version is None:  # pragma: no cover - removed between the write and the read
            raise IntegrityError(f"DVC file {dvcfile.name} disappeared while it was annotated")
        return version

    def forget(self, key: str) -> None:
        """Remove a version from the workspace (its .dvc and file); cache and remote keep the bytes."""
        with self._locked():
            self._remove(key)

    def _remove(self, key: str) -> None:
        for path in (self.dvcfile(key), self.workspace_path(key)):
            with contextlib.suppress(FileNotFoundError):
                path.chmod(0o600)
                path.unlink()

    def restore(self, key: str) -> Path:
        """Make the workspace copy of ``key`` match its .dvc file again (``dvc pull``); its path."""
        version = self.find(key)
        if version is None:
            raise IntegrityError(f"no DVC version for source sha256:{key[:16]}…")
        target = self.workspace_path(key)
        with self._locked():
            self._ensure()
            try:
                with self._repo() as repo:
                    repo.pull(targets=[str(self.dvcfile(key))], force=True)
            except Exception as exc:
                raise IntegrityError(f"DVC could not restore {version.path} ({type(exc).__name__})") from None
        if not target.exists() or _md5_file(target) != version.md5:
            raise IntegrityError(f"DVC restored {version.path}, but its content is not {version.version}")
        return target

    def restore_into_store(self, key: str, store: _Store, digest: str) -> int:
        """Put the versioned ciphertext back into the artifact store (if its copy there is missing or
        does not verify) and verify it there; returns the plaintext size."""
        with contextlib.suppress(IntegrityError):
            return store.verify(digest)
        source = self.restore(key)
        destination = store.path_for(digest)
        with open(source, "rb") as src, atomic_write(destination) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return store.verify(digest)
