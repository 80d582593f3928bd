"""The release resource: the registry, policies, roles and verifiers behind registered_model and deployment.

Assets ask it for a :class:`secure_ml.deploy.Release` bound to the run's actor; every decision
(registration, promotion, deploy, rollback) is made and audited there, so the CLI and the assets
share one implementation.
"""

from __future__ import annotations

from typing import Any

import dagster as dg

from secure_ml.release.deploy import Release
from secure_ml.settings import Settings


class ReleaseResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Model registry, promotion policy and deploy gate under ``home`` (``$SECURE_ML_HOME``)."""

    home: str
    env: str = "local"
    config_dir: str = ""

    def settings(self) -> Settings:
        from secure_ml.custody.keys import process_environment

        environ = process_environment()  # with SECURE_ML_KEK, which no longer is in os.environ
        environ["SECURE_ML_HOME"] = self.home
        environ["SECURE_ML_ENV"] = self.env
        if self.config_dir:
            environ["SECURE_ML_CONFIG"] = self.config_dir
        return Settings.from_env(environ)

    def release(self, actor: str) -> Release:
        return Release.from_settings(self.settings(), actor=actor)


def resources_for(settings: Settings, built: dict[str, Any]) -> dict[str, Any]:
    return {"release": ReleaseResource(home=str(settings.home), env=settings.env,
                                       config_dir=str(settings.environ.get("SECURE_ML_CONFIG", "")))}
