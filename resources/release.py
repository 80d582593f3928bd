"""The release resource: the registry, policies, roles and trust behind registered_model and deployment.

Assets ask it for a :class:`secure_ml.release.deploy.Release` bound to the run's actor; every decision
(registration, promotion, deploy, rollback) is made and audited there, so the CLI and the assets
share one implementation.
"""

from __future__ import annotations

from typing import Any

import dagster as dg

from resources.custody import current_model
from secure_ml.release.deploy import Release
from secure_ml.settings import Settings


class ReleaseResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Model registry, promotion policy and deploy gate under ``home`` (``$SECURE_ML_HOME``)."""

    home: str
    env: str = "local"
    config_dir: str = ""

    def settings(self) -> Settings:
        """Acting for the model whose asset or check runs now (its registry rows, promotion parameters)."""
        return Settings.from_env(home=self.home, env=self.env, config_dir=self.config_dir).for_model(current_model())

    def release(self, actor: str) -> Release:
        return Release.from_settings(self.settings(), actor=actor)


def resources_for(settings: Settings, built: dict[str, Any]) -> dict[str, Any]:
    return {"release": ReleaseResource(home=str(settings.home), env=settings.env,
                                       config_dir=str(settings.environ.get("SECURE_ML_CONFIG", "")))}
