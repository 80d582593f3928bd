"""Shared fixtures: a fresh SECURE_ML_HOME and DAGSTER_HOME per test, real components only."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from secure_ml.settings import Settings, init_home

REPO = Path(__file__).resolve().parents[1]

# Tests build their own homes; nothing from the caller's shell (`make` exports SECURE_ML_HOME and
# DAGSTER_HOME for the demo) may point them at the developer's real home, keys or Dagster instance.
for _variable in ("SECURE_ML_HOME", "DAGSTER_HOME", "SECURE_ML_KEK", "SECURE_ML_KEK_RETIRED",
                  "SECURE_ML_CONFIG", "SECURE_ML_ENV", "SECURE_ML_ACTOR", "SECURE_ML_WEBHOOK_URL"):
    os.environ.pop(_variable, None)
SAMPLE_CSV = REPO / "data" / "sample" / "german_credit.csv"
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An initialised SECURE_ML_HOME (keyring 0600, Dagster home with telemetry off)."""
    root = tmp_path / "secure_ml_home"
    monkeypatch.setenv("SECURE_ML_HOME", str(root))
    monkeypatch.setenv("DAGSTER_HOME", str(root / "dagster"))
    monkeypatch.setenv("SECURE_ML_ACTOR", "test-engineer")
    monkeypatch.delenv("SECURE_ML_KEK", raising=False)
    monkeypatch.delenv("SECURE_ML_ENV", raising=False)
    init_home(Settings.from_env())
    return root


@pytest.fixture
def settings(home: Path) -> Settings:
    return Settings.from_env()


def land_file(settings: Settings, source: Path, name: str | None = None) -> str:
    """Put a drop into the landing area as a complete, settled file; returns its name."""
    name = name or source.name
    target = settings.landing_dir / name
    shutil.copyfile(source, target)
    old = time.time() - 3600
    os.utime(target, (old, old))
    return name


@pytest.fixture
def landed_sample(settings: Settings) -> str:
    return land_file(settings, SAMPLE_CSV)


@pytest.fixture
def artifacts_dir() -> Iterator[Path]:
    ARTIFACTS.mkdir(exist_ok=True)
    yield ARTIFACTS
