"""Where things live and which environment we are in: the one place that reads the environment.

    settings = Settings.from_env()          # SECURE_ML_HOME, SECURE_ML_ENV, DAGSTER_HOME, ...
    store = settings.artifact_store(actor=settings.actor())
    settings.config.training.training.epochs            # typed configuration (secure_ml.config)
    Settings.from_env(home=..., env=..., config_dir=...)  # what a Dagster resource was given
    settings.for_model("breast_cancer").load_config("training")   # training.yaml as that model's spec sees it

``Settings.from_env`` is the one factory: the CLI, the resources and the sensors all build their
settings with it, so one rule decides home, environment and configuration directory everywhere.

``SECURE_ML_HOME`` defaults to ``./.secure_ml``; ``SECURE_ML_ENV`` is ``local`` (default) or
``production``; ``DAGSTER_HOME`` defaults to ``$SECURE_ML_HOME/dagster``. The key provider is the
environment variable ``SECURE_ML_KEK`` when it is set (CI secrets), otherwise the local keyring.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from secure_ml.config import Config
from secure_ml.custody.audit import AuditLog
from secure_ml.custody.keys import KeyProvider, LocalKeyring, handed_over_provider, process_environment
from secure_ml.custody.store import ArtifactStore
from secure_ml.errors import ConfigurationError, KeyUnavailable

ENVIRONMENTS = ("local", "production")
ACTOR_TAG = "secure_ml/actor"


@dataclass(frozen=True)
class Settings:
    home: Path
    env: str = "local"
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: The model these settings act for (None: the default model); see :meth:`for_model`.
    model: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, home: str | Path | None = None,
                 env: str | None = None, config_dir: str | Path | None = None) -> Settings:
        """Settings from ``environ`` (default ``os.environ``); ``home``, ``env`` and ``config_dir``, when
        given (a resource's own fields), win over SECURE_ML_HOME, SECURE_ML_ENV and SECURE_ML_CONFIG
        and are written into ``environ`` so anything started from these settings sees the same."""
        # The process environment is read with any SECURE_ML_KEK taken out of it first (no child inherits it).
        env_vars = dict(process_environment() if environ is None else environ)
        for variable, value in (("SECURE_ML_HOME", home), ("SECURE_ML_ENV", env), ("SECURE_ML_CONFIG", config_dir)):
            if value:
                env_vars[variable] = str(value)
        home = Path(env_vars.get("SECURE_ML_HOME") or ".secure_ml").absolute()
        env = env_vars.get("SECURE_ML_ENV", "local")
        if env not in ENVIRONMENTS:
            raise ConfigurationError(f"SECURE_ML_ENV must be one of {', '.join(ENVIRONMENTS)}, not {env!r}")
        return cls(home=home, env=env, environ=env_vars)

    # -- paths -----------------------------------------------------------------------------
    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    @property
    def keyring_path(self) -> Path:
        return self.keys_dir / "keyring.json"

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "artifacts"

    @property
    def landing_dir(self) -> Path:
        return self.home / "landing"

    @property
    def audit_path(self) -> Path:
        return self.home / "audit" / "audit.jsonl"

    @property
    def config_dir(self) -> Path:
        """Pipeline configuration (YAML): ``$SECURE_ML_CONFIG`` or the defaults shipped in the package."""
        return Path(self.environ.get("SECURE_ML_CONFIG") or Path(__file__).parent / "config")

    @cached_property
    def config(self) -> Config:
        """The configuration files of :attr:`config_dir`, each parsed and validated once (typed)."""
        return Config(self.config_dir)

    @property
    def config_override(self) -> str:
        """``$SECURE_ML_CONFIG`` as given ("" for the shipped defaults): what resources carry."""
        return str(self.environ.get("SECURE_ML_CONFIG") or "")

    def load_config(self, name: str) -> dict[str, Any]:
        """``config_dir/NAME.yaml`` as a dict, validated by its model (once per Settings); a copy.

        For a model with a spec (models/NAME.yaml), the file as that model sees it: its training
        settings, evaluation thresholds, promotion parameters and schema laid over the shared file."""
        data = self.config.as_dict(name)
        specs = self.config.models()        # none in a directory without models/: the file as it is
        spec = specs.get(self.model_name) if specs else None
        return spec.overlay(name, data) if spec is not None else data

    @property
    def model_name(self) -> str:
        """The model these settings act for: :attr:`model`, else the default model."""
        return self.model or self.config.default_model

    def for_model(self, name: str | None) -> Settings:
        """The same settings acting for model ``name`` (None: the default model); an unknown name is refused."""
        if name is not None and name != self.config.default_model and name not in self.config.models():
            known = ", ".join(sorted(self.config.models())) or self.config.default_model
            raise ConfigurationError(f"no model named {name!r} (models: {known})")
        chosen = Settings(home=self.home, env=self.env, environ=self.environ, model=name)
        chosen.__dict__["config"] = self.config  # parsed once, shared
        return chosen

    @property
    def dagster_home(self) -> Path:
        return Path(self.environ.get("DAGSTER_HOME") or self.home / "dagster").absolute()

    # -- components ------------------------------------------------------------------------
    def key_provider(self) -> KeyProvider:
        handed = handed_over_provider(self.environ)  # SECURE_ML_KEK or SECURE_ML_KEK_FILE
        if handed is not None:
            return handed
        if self.env == "production":
            # A keyring file on a pod's disk is not a production key store.
            raise KeyUnavailable("production needs its key-encryption key from a secret: set SECURE_ML_KEK_FILE "
                                 "(a mounted Kubernetes Secret) or SECURE_ML_KEK (e.g. from KMS or Vault)")
        return LocalKeyring(self.keyring_path)

    def audit_log(self) -> AuditLog:
        return AuditLog(self.audit_path)

    def artifact_store(self, *, actor: str | None = None) -> ArtifactStore:
        return ArtifactStore(self.artifacts_dir, self.key_provider(), self.audit_log(),
                             actor=actor or self.actor())

    def actor(self, tags: Mapping[str, str] | None = None) -> str:
        return resolve_actor(tags, self.environ)


def resolve_actor(tags: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None) -> str:
    """Who is acting: a run tag, else a CI identity, else SECURE_ML_ACTOR, else the OS user.

    Run tags and environment variables are claims, not proof: in production the identity should
    come from the CI's OIDC token or the Dagster+ user, and policy treats it that way.
    """
    env = os.environ if environ is None else environ
    if tags and tags.get(ACTOR_TAG):
        return str(tags[ACTOR_TAG])
    if env.get("GITHUB_ACTIONS") == "true" and env.get("GITHUB_ACTOR"):
        return f"github:{env['GITHUB_ACTOR']}"
    if env.get("GITLAB_CI") == "true" and env.get("GITLAB_USER_LOGIN"):
        return f"gitlab:{env['GITLAB_USER_LOGIN']}"
    if env.get("SECURE_ML_ACTOR"):
        return str(env["SECURE_ML_ACTOR"])
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


_POSTGRES_STORAGE = """storage:
  postgres:
    postgres_db:
      # SQLAlchemy 2.1 defaults postgresql:// to psycopg 3, which Dagster's SQL does not support;
      # psycopg2 is the driver dagster-postgres declares.
      scheme: postgresql+psycopg2
      hostname: {env: DAGSTER_PG_HOST}
      port: {env: DAGSTER_PG_PORT}
      username: {env: DAGSTER_PG_USER}
      password: {env: DAGSTER_PG_PASSWORD}
      db_name: {env: DAGSTER_PG_DB}
"""


def dagster_instance_yaml(env: str) -> str:
    """dagster.yaml for an environment: SQLite locally, PostgreSQL in production; telemetry off.

    The database password is an environment reference, resolved by Dagster at start-up, so it
    is never written to disk.
    """
    text = ("# Written by `secure-ml init`. No telemetry: nothing leaves this machine.\n"
            "telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    return text + (_POSTGRES_STORAGE if env == "production" else "")


def init_home(settings: Settings) -> list[str]:
    """Create the home: keyring (0600), dirs, and a Dagster home with telemetry off. Idempotent."""
    done: list[str] = []
    settings.home.mkdir(parents=True, exist_ok=True)
    for directory in (settings.artifacts_dir, settings.landing_dir, settings.audit_path.parent):
        directory.mkdir(parents=True, exist_ok=True)
    handed = settings.environ.get("SECURE_ML_KEK") or settings.environ.get("SECURE_ML_KEK_FILE")
    if not handed and not settings.keyring_path.exists():
        LocalKeyring.create(settings.keyring_path)
        done.append(f"created keyring {settings.keyring_path}")
    dagster_yaml = settings.dagster_home / "dagster.yaml"
    if not dagster_yaml.exists():
        settings.dagster_home.mkdir(parents=True, exist_ok=True)
        dagster_yaml.write_text(dagster_instance_yaml(settings.env))
        done.append(f"created Dagster home {settings.dagster_home} ({settings.env})")
    if not settings.audit_path.exists():
        key_id = settings.key_provider().active_key()[0]
        settings.audit_log().record(settings.actor(), "home.init", subject=str(settings.home),
                                    details={"key_id": key_id})
        done.append(f"started audit log {settings.audit_path}")
    return done
