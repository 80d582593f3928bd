"""The model registry: versions addressed by their signed digest, stage aliases, and who did what.

    registry = Registry.from_settings(settings)                 # $SECURE_ML_HOME/registry/registry.db
    version = registry.register(evidence, actor="bob")          # -> ModelVersion "v1", stage candidate
    registry.set_stage("v1", "staging", actor="pipeline", reason="policy allows staging")
    registry.add_approval("v1", "carol", roles=["approver"])
    registry.get("v1").stage; registry.production(); registry.history("v1")
    registry.record_deployment(...); registry.deployments(target="local")
    Registry.from_settings(settings.for_model("breast_cancer"))  # one model's versions, production, deployments
    registry.live(target="local")              # what is live for every model: the server's list

Many models: each version belongs to one model (``model``). Versions are numbered across the
project (v1, v2, ... whatever the model), so a bare ``v3`` is never ambiguous; ``MODEL:VERSION``
(``breast_cancer:v3``) names it with its model and is refused when the version is another model's.
A registry opened for a model (``model=``) has that model's production version, its stage names
(``production``) and its deployments; one opened without a model lists everything.

A version is named ``v<N>`` for people and addressed by ``model_digest``: the digest over the
model's files (``integrity.tree_digest``) that the model signature covers. Registering the same
digest again returns the same version. The evidence the promotion policy reads (evaluation, scan,
provenance, training record, store digests of the model tree, signature bundle and attestation)
is stored with it; the bytes themselves stay in the encrypted artifact store.

Stages: ``candidate`` -> ``staging`` -> ``production`` -> ``archived``. At most one version is in
production: promoting another archives the previous one. Every change is an event in the
registry's own history (and in the audit log, written by the callers that make decisions).

Concurrency: SQLite in WAL mode; every write is one ``BEGIN IMMEDIATE`` transaction, so writers
from several processes are serialised by SQLite's lock and readers never see half a change.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from secure_ml.custody.integrity import SHA256_HEX
from secure_ml.errors import BadInput, ConfigurationError, PolicyDenied

STAGES = ("candidate", "staging", "production", "archived")
_VERSION = re.compile(r"^v[1-9][0-9]{0,8}$")
_DIGEST = SHA256_HEX
#: Rows written before models had names belong to the demo model.
LEGACY_MODEL = "german_credit"
_MIGRATIONS = {
    "versions": f"ALTER TABLE versions ADD COLUMN model TEXT NOT NULL DEFAULT '{LEGACY_MODEL}'",
    "deployments": f"ALTER TABLE deployments ADD COLUMN model TEXT NOT NULL DEFAULT '{LEGACY_MODEL}'",
}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    version TEXT PRIMARY KEY,
    number INTEGER UNIQUE NOT NULL,
    model_digest TEXT UNIQUE NOT NULL,
    stage TEXT NOT NULL,
    registered_by TEXT NOT NULL,
    registered_at TEXT NOT NULL,
    evidence TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS approvals (
    version TEXT NOT NULL REFERENCES versions(version),
    identity TEXT NOT NULL,
    roles TEXT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (version, identity)
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    version TEXT,
    details TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deployments (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    target TEXT NOT NULL,
    version TEXT NOT NULL,
    model_digest TEXT NOT NULL,
    status TEXT NOT NULL,
    location TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS statements (
    sha256 TEXT PRIMARY KEY,
    model_digest TEXT NOT NULL,
    kind TEXT NOT NULL,
    at TEXT NOT NULL
);
"""


class _HasHome(Protocol):
    @property
    def home(self) -> Path: ...


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class ModelVersion:
    """One registered model version and the evidence its promotion is judged on."""

    version: str
    model_digest: str
    stage: str
    registered_by: str
    registered_at: str
    evidence: dict[str, Any] = field(default_factory=dict)
    approvals: tuple[dict[str, Any], ...] = ()
    model: str = LEGACY_MODEL

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "approvals": list(self.approvals)}


@dataclass(frozen=True)
class Deployment:
    seq: int
    at: str
    actor: str
    target: str
    version: str
    model_digest: str
    status: str       # deployed | failed | rolled_back | rollback
    location: str
    reason: str
    model: str = LEGACY_MODEL

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_version(version: str) -> str:
    if not isinstance(version, str) or not _VERSION.match(version):
        raise BadInput(f"not a model version: {str(version)[:40]!r} (expected v1, v2, ...)")
    return version


class Registry:
    """Model versions, their stages, approvals, history and deployments in one SQLite file."""

    def __init__(self, path: Path | str, *, model: str | None = None) -> None:
        self.path = Path(path)
        self.model = model
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fresh = not self.path.exists()
        with self._connect() as db:
            db.executescript(_SCHEMA)
            for table, alter in _MIGRATIONS.items():  # registries from before models had names
                if "model" not in {r["name"] for r in db.execute("SELECT name FROM pragma_table_info(?)", (table,))}:
                    db.execute(alter)
        if fresh:
            os.chmod(self.path, 0o600)

    @classmethod
    def from_settings(cls, settings: _HasHome) -> Registry:
        """The registry acting for the settings' model (``settings.model_name``)."""
        return cls(settings.home / "registry" / "registry.db", model=getattr(settings, "model_name", None))

    def for_model(self, model: str | None) -> Registry:
        """The same registry (file, class, trust), acting for ``model`` (None: every model)."""
        other = copy.copy(self)
        other.model = model
        return other

    def _model_args(self) -> tuple[str | None, str | None]:
        """The parameters of a query's ``(? IS NULL OR model = ?)``: every model's rows when the registry has none."""
        return (self.model, self.model)

    def model_of(self, ref: str) -> str:
        """The model a version belongs to (``MODEL:VERSION`` or any ref :meth:`resolve` takes)."""
        version = self.resolve(ref)
        with self._connect() as db:
            row = db.execute("SELECT model FROM versions WHERE version = ?", (version,)).fetchone()
        if row is None:
            raise BadInput(f"no model version {version} in the registry")
        return str(row["model"])

    def __repr__(self) -> str:
        return f"Registry({str(self.path)!r})"

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        except sqlite3.Error as exc:
            raise ConfigurationError(f"registry {self.path} cannot be opened: {exc}") from None
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA synchronous=FULL")
            yield db
        except sqlite3.DatabaseError as exc:
            if "malformed" in str(exc) or "not a database" in str(exc):
                raise ConfigurationError(f"registry {self.path} is damaged: {exc}") from None
            raise
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One all-or-nothing write transaction, serialised across processes."""
        with self._connect() as db:
            for attempt in range(50):
                try:
                    db.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as exc:  # locked past the timeout: back off
                    if "locked" not in str(exc) or attempt == 49:
                        raise
                    time.sleep(0.05 * (attempt + 1))
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @staticmethod
    def _event(db: sqlite3.Connection, actor: str, action: str, version: str | None,
               details: Mapping[str, Any]) -> None:
        db.execute("INSERT INTO events (at, actor, action, version, details) VALUES (?, ?, ?, ?, ?)",
                   (_now(), actor, action, version, json.dumps(dict(details), sort_keys=True, default=str)))

    # -- versions ---------------------------------------------------------------------------
    def register(self, model_digest: str, evidence: Mapping[str, Any], *, actor: str) -> tuple[ModelVersion, bool]:
        """Register ``model_digest`` as a candidate; returns (version, created). Idempotent per digest."""
        if not isinstance(model_digest, str) or not _DIGEST.match(model_digest):
            raise BadInput(f"not a model digest: {str(model_digest)[:80]!r}")
        payload = json.dumps(dict(evidence), sort_keys=True, default=str)
        with self._write() as db:
            row = db.execute("SELECT version FROM versions WHERE model_digest = ?", (model_digest,)).fetchone()
            if row is not None:
                existing = row["version"]
                created = False
            else:
                number = db.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM versions").fetchone()[0]
                existing = f"v{number}"
                model = self.model or LEGACY_MODEL
                db.execute("INSERT INTO versions (version, number, model_digest, stage, registered_by, registered_at, "
                           "evidence, model) VALUES (?, ?, ?, 'candidate', ?, ?, ?, ?)",
                           (existing, number, model_digest, actor, _now(), payload, model))
                self._event(db, actor, "register", existing, {"model_digest": model_digest, "stage": "candidate",
                                                              "model": model})
                created = True
        return self.get(existing), created

    def resolve(self, ref: str) -> str:
        """A version name from ``v3``, ``sha256:<digest or unique prefix>`` or ``production``, each
        optionally as ``MODEL:REF`` (refused when the version is another model's)."""
        ref = (ref or "").strip()
        if ":" in ref and not ref.startswith("sha256:"):
            model, _, rest = ref.partition(":")
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,39}", model):
                raise BadInput(f"not a model name in {ref[:60]!r} (expected MODEL:VERSION, e.g. german_credit:v1)")
            version = self.for_model(model).resolve(rest)  # refused when it is another model's
            return self._own(version)
        if ref in STAGES:
            with self._connect() as db:
                rows = db.execute("SELECT version FROM versions WHERE stage = ? AND (? IS NULL OR model = ?) "
                                  "ORDER BY number DESC", (ref, *self._model_args())).fetchall()
            if not rows:
                raise BadInput(f"no model version is in {ref}")
            return str(rows[0]["version"])
        if ref.startswith("sha256:"):
            prefix = ref[len("sha256:"):]
            if not re.fullmatch(r"[0-9a-f]{8,64}", prefix):
                raise BadInput(f"not a digest prefix: {ref[:80]!r}")
            with self._connect() as db:
                rows = db.execute("SELECT version FROM versions WHERE model_digest LIKE ?",
                                  (prefix + "%",)).fetchall()
            if len(rows) != 1:
                raise BadInput(f"{ref[:24]}… names {len(rows)} model versions, not one")
            return self._own(str(rows[0]["version"]))
        return self._own(check_version(ref))

    def _own(self, version: str) -> str:
        """``version``, refused when this registry acts for another model than the version's (before any write)."""
        if self.model is None:
            return version
        with self._connect() as db:
            row = db.execute("SELECT model FROM versions WHERE version = ?", (version,)).fetchone()
        if row is not None and row["model"] != self.model:
            raise BadInput(f"{version} is a version of model {row['model']!r}, not of {self.model!r} "
                           f"(name it {row['model']}:{version})")
        return version

    def get(self, ref: str) -> ModelVersion:
        version = self.resolve(ref)
        with self._connect() as db:
            row = db.execute("SELECT * FROM versions WHERE version = ?", (version,)).fetchone()
            if row is None:
                raise BadInput(f"no model version {version} in the registry")
            approvals = db.execute("SELECT identity, roles, at FROM approvals WHERE version = ? ORDER BY at",
                                   (version,)).fetchall()
        return ModelVersion(
            version=row["version"], model_digest=row["model_digest"], stage=row["stage"], model=row["model"],
            registered_by=row["registered_by"], registered_at=row["registered_at"],
            evidence=json.loads(row["evidence"]),
            approvals=tuple({"identity": a["identity"], "roles": json.loads(a["roles"]), "at": a["at"]}
                            for a in approvals),
        )

    def versions(self) -> list[ModelVersion]:
        with self._connect() as db:
            names = [r["version"] for r in db.execute("SELECT version FROM versions WHERE (? IS NULL OR model = ?) "
                                                      "ORDER BY number", self._model_args())]
        return [self.get(name) for name in names]

    def production(self) -> ModelVersion | None:
        with self._connect() as db:
            row = db.execute("SELECT version FROM versions WHERE stage = 'production' AND (? IS NULL OR model = ?)",
                             self._model_args()).fetchone()
        return self.get(row["version"]) if row else None

    def set_stage(self, ref: str, stage: str, *, actor: str, action: str = "promote",
                  reason: str = "", expect: tuple[str, ...] | None = None) -> ModelVersion:
        """Move a version to ``stage`` (production archives the previous production version)."""
        if stage not in STAGES:
            raise BadInput(f"unknown stage {stage!r} (one of {', '.join(STAGES)})")
        version = self.resolve(ref)
        with self._write() as db:
            row = db.execute("SELECT stage FROM versions WHERE version = ?", (version,)).fetchone()
            if row is None:
                raise BadInput(f"no model version {version} in the registry")
            before = row["stage"]
            if expect is not None and before not in expect:
                # Another writer moved it since the caller decided: refuse rather than act on stale state.
                raise PolicyDenied(f"{version} is {before} now, not {' or '.join(expect)}; decide again")
            if stage == "production":
                # At most one production version per model: another model's production is not touched.
                for old in db.execute("SELECT version FROM versions WHERE stage = 'production' AND version != ? "
                                      "AND model = (SELECT model FROM versions WHERE version = ?)",
                                      (version, version)).fetchall():
                    db.execute("UPDATE versions SET stage = 'archived' WHERE version = ?", (old["version"],))
                    self._event(db, actor, "archive", old["version"],
                                {"from": "production", "to": "archived", "replaced_by": version})
            db.execute("UPDATE versions SET stage = ? WHERE version = ?", (stage, version))
            self._event(db, actor, action, version, {"from": before, "to": stage, "reason": reason})
        return self.get(version)

    # -- approvals ---------------------------------------------------------------------------
    def add_approval(self, ref: str, identity: str, *, roles: list[str] | tuple[str, ...]) -> ModelVersion:
        version = self.resolve(ref)
        with self._write() as db:
            try:
                db.execute("INSERT INTO approvals VALUES (?, ?, ?, ?)", (version, identity, json.dumps(list(roles)), _now()))
            except sqlite3.IntegrityError:
                raise PolicyDenied(f"{identity} has already approved {version}") from None
            self._event(db, identity, "approve", version, {"roles": list(roles)})
        return self.get(version)

    # -- the index of signed statements (secure_ml.governance.ledger.StatementIndex) ----------
    def index_statement(self, model_digest: str, sha256: str, kind: str) -> None:
        """Remember that a signed ``kind`` statement about the model is stored (its envelope's SHA-256)."""
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO statements (sha256, model_digest, kind, at) VALUES (?, ?, ?, ?)",
                       (sha256, model_digest, kind, _now()))

    def indexed_statements(self, model_digest: str) -> list[tuple[str, str]]:
        """(envelope sha256, kind) of every statement indexed about the model, oldest first."""
        with self._connect() as db:
            rows = db.execute("SELECT sha256, kind FROM statements WHERE model_digest = ? ORDER BY at, sha256",
                              (model_digest,)).fetchall()
        return [(str(r["sha256"]), str(r["kind"])) for r in rows]

    def record_event(self, actor: str, action: str, version: str | None, details: Mapping[str, Any]) -> None:
        """A decision that changed nothing (a denial) still belongs in the version's history."""
        with self._write() as db:
            self._event(db, actor, action, version, details)

    def history(self, ref: str | None = None) -> list[dict[str, Any]]:
        with self._connect() as db:
            if ref is None:
                rows = db.execute("SELECT * FROM events ORDER BY seq").fetchall()
            else:
                rows = db.execute("SELECT * FROM events WHERE version = ? ORDER BY seq", (self.resolve(ref),)).fetchall()
        return [{**dict(r), "details": json.loads(r["details"])} for r in rows]

    # -- deployments ---------------------------------------------------------------------------
    def record_deployment(self, *, actor: str, target: str, version: str, model_digest: str, status: str,
                          location: str = "", reason: str = "") -> Deployment:
        with self._write() as db:
            row = db.execute("SELECT model FROM versions WHERE version = ?", (version,)).fetchone()
            model = str(row["model"]) if row is not None else (self.model or LEGACY_MODEL)
            cursor = db.execute(
                "INSERT INTO deployments (at, actor, target, version, model_digest, status, location, reason, model) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (_now(), actor, target, version, model_digest, status, location, reason, model))
            self._event(db, actor, f"deploy.{status}", version,
                        {"target": target, "model_digest": model_digest, "location": location, "reason": reason})
            seq = cursor.lastrowid
        return next(d for d in self.for_model(model).deployments(target) if d.seq == seq)

    def deployments(self, target: str | None = None) -> list[Deployment]:
        """This model's deployments (every model's for a registry opened without one), oldest first."""
        with self._connect() as db:
            if target is None:
                rows = db.execute("SELECT * FROM deployments WHERE (? IS NULL OR model = ?) ORDER BY seq",
                                  self._model_args()).fetchall()
            else:
                rows = db.execute("SELECT * FROM deployments WHERE target = ? AND (? IS NULL OR model = ?) ORDER BY seq",
                                  (target, *self._model_args())).fetchall()
        return [Deployment(**dict(r)) for r in rows]

    def models(self) -> list[str]:
        """Every model with a registered version, sorted."""
        with self._connect() as db:
            return sorted(str(r["model"]) for r in db.execute("SELECT DISTINCT model FROM versions"))

    def live(self, target: str = "local") -> list[Deployment]:
        """What is live on ``target`` for every model (one per model, by model name): what a server serves."""
        live = (self.for_model(model).current_deployment(target) for model in self.models())
        return [d for d in live if d is not None]

    def current_deployment(self, target: str) -> Deployment | None:
        """What is live on ``target`` now: the latest successful deploy or rollback."""
        live = [d for d in self.deployments(target) if d.status in ("deployed", "rollback")]
        return live[-1] if live else None

    def previous_deployment(self, target: str) -> Deployment | None:
        """The version live before the current one (a different version), for rollback."""
        live = [d for d in self.deployments(target) if d.status in ("deployed", "rollback")]
        if not live:
            return None
        current = live[-1]
        # Walk back past the current version and past versions later rolled back from.
        failed = {d.version for d in self.deployments(target) if d.status == "rolled_back"}
        for earlier in reversed(live[:-1]):
            if earlier.version != current.version and earlier.version not in failed and self._restorable(earlier):
                return earlier
        return None

    def _restorable(self, deployment: Deployment) -> bool:
        """Whether rollback may restore ``deployment`` (the trusted registry refuses revoked versions)."""
        return True

    def _last_decision(self, version: str) -> dict[str, Any]:
        with self._connect() as db:
            row = db.execute("SELECT details FROM events WHERE version = ? AND action = 'policy.decision' "
                             "ORDER BY seq DESC LIMIT 1", (version,)).fetchone()
        return json.loads(row["details"]) if row else {}

    def status(self) -> dict[str, Any]:
        """Everything `secure-ml status` shows: versions, stages, approvals, what is deployed."""
        targets = sorted({d.target for d in self.deployments()})
        everything = self.for_model(None)
        return {
            "registry": str(self.path),
            "versions": [
                {"model": v.model, "version": v.version, "name": f"{v.model}:{v.version}",
                 "model_digest": v.model_digest, "stage": v.stage,
                 "registered_by": v.registered_by, "registered_at": v.registered_at,
                 "approvals": list(v.approvals),
                 "policy": self._last_decision(v.version)}
                for v in everything.versions()
            ],
            "deployed": {t: (d.as_dict() if (d := self.current_deployment(t)) else None) for t in targets},
            "deployed_by_model": {model: {t: d.as_dict() for t in sorted({x.target for x in everything.deployments()})
                                          if (d := everything.for_model(model).current_deployment(t))}
                                  for model in everything.models()},
        }
