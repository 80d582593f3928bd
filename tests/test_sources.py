"""Approved sources (secure_ml/governance/sources.py): which drops are accepted, and bad configurations.

Touches: the shipped config/sources.yaml and roles.yaml through Settings (SECURE_ML_CONFIG for a
copy), and ApprovedSources built from mappings. Does not touch Dagster, the store or the landing
area: test_data_stage.py proves a refused drop is never read, stored or versioned.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from secure_ml.cli.cmd_pipeline import land
from secure_ml.errors import ConfigurationError, PolicyDenied
from secure_ml.governance.sources import ApprovedSources
from secure_ml.settings import Settings
from tests.conftest import SAMPLE_CSV

SHIPPED = Path(__file__).resolve().parents[1] / "secure_ml" / "config"


def source(**overrides: object) -> dict[str, object]:
    return {"name": "partner", "patterns": ["partner-*.csv"], "owner": "team:partner",
            "classification": "internal", **overrides}


def test_default_config_approves_the_sample_as_the_cli_lands_it(settings: Settings) -> None:
    sources = ApprovedSources.from_settings(settings)
    landed = land(settings, SAMPLE_CSV)
    assert landed.startswith("german_credit-") and len(landed) == len("german_credit-") + 12 + 4
    for name in (landed, "german_credit.csv", "german_credit_drifted.csv", "german_credit-q3.parquet"):
        approved = sources.require(name)
        assert (approved.name, approved.owner, approved.classification) == (
            "german_credit", "team:data-stewards", "confidential"), name


@pytest.mark.parametrize("name", ["partner_x.csv", "German_credit.csv", "german_credit-1.txt",
                                  "xgerman_credit.csv", "german_credit-1.json"])
def test_default_config_refuses_other_drops_with_a_reason(settings: Settings, name: str) -> None:
    with pytest.raises(PolicyDenied) as caught:
        ApprovedSources.from_settings(settings).require(name)
    line = caught.value.explain()
    assert line.startswith(f"denied: drop {name!r} is not from an approved source")
    assert "german_credit = " in line and "\n" not in line


def test_formats_restrict_what_a_source_may_send() -> None:
    sources = ApprovedSources({"sources": [source(patterns=["partner-*"], formats=["parquet"])]})
    assert sources.match("partner-1.parquet") is not None
    assert sources.match("partner-1.csv") is None


def test_overlapping_sources_are_a_configuration_error() -> None:
    sources = ApprovedSources({"sources": [source(), source(name="broad", patterns=["*.csv"],
                                                            classification="public")]})
    with pytest.raises(ConfigurationError, match="matches sources 'partner' and 'broad'"):
        sources.match("partner-1.csv")
    assert sources.require("other.csv").name == "broad"


@pytest.mark.parametrize("config, message", [
    ({}, "must hold a list under 'sources'"),
    ({"sources": "partner"}, "must hold a list under 'sources'"),
    ({"sources": ["partner"]}, "must be a mapping"),
    ({"sources": [source(name="")]}, "has no name"),
    ({"sources": [source(patterns=[])]}, "needs one or more file-name patterns"),
    ({"sources": [source(patterns=["../landing/*.csv"])]}, "not paths"),
    ({"sources": [source(owner="")]}, "has no owner"),
    ({"sources": [source(classification="secret")]}, "has classification 'secret'"),
    ({"sources": [source(formats=["xlsx"])]}, "unknown formats: xlsx"),
    ({"sources": [source(), source()]}, "names source 'partner' twice"),
])
def test_malformed_configuration_is_refused(config: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ApprovedSources(config)


def test_sources_file_comes_from_the_active_config_dir(settings: Settings, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config"
    shutil.copytree(SHIPPED, config)
    (config / "partners.yaml").write_text(
        "sources:\n  - {name: partner, patterns: ['partner-*.csv'], owner: team:p, classification: restricted}\n")
    (config / "pipeline.yaml").write_text((config / "pipeline.yaml").read_text().replace(
        "sources_file: sources.yaml", "sources_file: partners.yaml"))
    monkeypatch.setenv("SECURE_ML_CONFIG", str(config))
    sources = ApprovedSources.from_settings(Settings.from_env())
    assert sources.require("partner-7.csv").classification == "restricted"
    assert sources.match("german_credit.csv") is None
    (config / "partners.yaml").write_text("sources: [")
    with pytest.raises(ConfigurationError, match="partners.yaml is not valid YAML"):
        ApprovedSources.from_settings(Settings.from_env())
    (config / "partners.yaml").unlink()
    with pytest.raises(ConfigurationError, match="approved sources file not found"):
        ApprovedSources.from_settings(Settings.from_env())
