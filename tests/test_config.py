"""Typed configuration (secure_ml/config): every shipped YAML file validates, and every bad file
is refused with one line naming the file and the key path.

Touches: the real shipped files under secure_ml/config, copies of them edited on disk, Settings
(``load_config``, ``config``, ``from_env``) and the import-time behaviour of sensors/ and
secure_ml.definitions. Does not touch: what each stage does with its settings (its own tests).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from secure_ml.config import FILES, SHIPPED_DIR, Config
from secure_ml.errors import ConfigurationError
from secure_ml.settings import Settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    target = tmp_path / "config"
    shutil.copytree(SHIPPED_DIR, target, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return target


def edit(directory: Path, name: str, change: object) -> None:
    """Load NAME.yaml, let ``change`` mutate it, write it back."""
    data = yaml.safe_load((directory / f"{name}.yaml").read_text())
    change(data)  # type: ignore[operator]
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(data))


def refusal(directory: Path, name: str) -> str:
    with pytest.raises(ConfigurationError) as caught:
        Config(directory).file(name)
    line = caught.value.explain()
    assert "\n" not in line and "Traceback" not in line
    return line


@pytest.mark.parametrize("name", sorted(FILES))
def test_every_shipped_file_validates_and_load_config_gives_exactly_its_data(name: str) -> None:
    settings = Settings.from_env({})
    assert settings.config_dir.resolve() == SHIPPED_DIR
    assert isinstance(settings.config.file(name), FILES[name])
    raw = yaml.safe_load((SHIPPED_DIR / f"{name}.yaml").read_text())
    assert settings.load_config(name) == raw      # validated, and nothing added or dropped


def test_every_shipped_yaml_file_has_a_model() -> None:
    assert {p.stem for p in SHIPPED_DIR.glob("*.yaml")} == set(FILES)


def test_typed_access_reads_the_shipped_values() -> None:
    config = Settings.from_env({}).config
    assert config.training.training.epochs == 20 and config.training.training.hidden == [32, 16]
    assert config.automation.landing.interval_seconds == 5
    assert config.automation.executor.production == "k8s"
    assert config.release.promotion.min_metrics["accuracy"] == 0.65
    assert config.security.signing.method == "key"
    assert config.sources.sources[0].classification == "confidential"
    assert config.training.evaluation.robustness.model_extra["fgsm_drop"].max == 0.10
    assert config.validation.poisoning.detectors.label_neighbours.k == 15


def test_an_unknown_key_is_refused_naming_file_and_key_path(config_dir: Path) -> None:
    edit(config_dir, "training", lambda d: d["training"].update({"epoch": 3}))
    line = refusal(config_dir, "training")
    assert line == f"configuration error: {config_dir / 'training.yaml'}: training.epoch: unknown key"
    edit(config_dir, "security", lambda d: d["signing"]["trusted_identities"].append(
        {"identity": "x", "issuer": "y", "subject": "z"}))
    assert "security.yaml: signing.trusted_identities[0].subject: unknown key" in refusal(config_dir, "security")


def test_a_wrong_type_is_refused_naming_file_key_and_value(config_dir: Path) -> None:
    edit(config_dir, "training", lambda d: d["training"].update({"epochs": "ten"}))
    assert refusal(config_dir, "training").endswith("training.yaml: training.epochs: expected an integer, got 'ten'")
    edit(config_dir, "training", lambda d: d["training"].update({"epochs": "10"}))  # strict: a string is no number
    assert "training.epochs: expected an integer, got '10'" in refusal(config_dir, "training")
    edit(config_dir, "training", lambda d: d["training"].update({"epochs": 20, "cuda_fallback": 1}))
    assert "training.cuda_fallback: expected true or false, got 1" in refusal(config_dir, "training")
    edit(config_dir, "automation", lambda d: d["executor"].update({"local": "threads"}))
    assert "automation.yaml: executor.local: expected one of" in refusal(config_dir, "automation")


def test_a_missing_required_key_is_refused(config_dir: Path) -> None:
    edit(config_dir, "validation", lambda d: d["pii"].update({"rules": [{"column": "email", "kind": "email"}]}))
    assert refusal(config_dir, "validation").endswith("validation.yaml: pii.rules[0].action: required key is missing")
    edit(config_dir, "sources", lambda d: d["sources"][0].pop("owner"))
    assert "sources.yaml: sources[0].owner: required key is missing" in refusal(config_dir, "sources")
    edit(config_dir, "training", lambda d: d["evaluation"]["metrics"].update({"f1": {"on_breach": "warn"}}))
    assert "evaluation.metrics.f1: needs exactly one of min or max" in refusal(config_dir, "training")


def test_malformed_yaml_and_a_non_mapping_are_refused_with_the_line(config_dir: Path) -> None:
    (config_dir / "release.yaml").write_text("promotion:\n  min_metrics: {accuracy: 0.6\n")
    line = refusal(config_dir, "release")
    assert "release.yaml: not valid YAML (line" in line
    (config_dir / "roles.yaml").write_text("- alice\n- bob\n")
    assert refusal(config_dir, "roles").endswith("roles.yaml: must hold a mapping, not a list")
    (config_dir / "pipeline.yaml").unlink()
    assert refusal(config_dir, "pipeline").endswith("pipeline.yaml: configuration file not found")


def test_a_webhook_url_is_never_echoed_in_an_error(config_dir: Path) -> None:
    edit(config_dir, "automation", lambda d: d["webhook"].update({"url": ["https://h/hook/token-xyz"]}))
    assert "token-xyz" not in refusal(config_dir, "automation")


def test_shipped_files_are_named_as_config_paths() -> None:
    assert Config(SHIPPED_DIR).shown("training") == "config/training.yaml"


def test_each_file_is_parsed_once_per_settings_and_readers_get_a_private_copy(config_dir: Path) -> None:
    settings = Settings.from_env({"SECURE_ML_CONFIG": str(config_dir)})
    first = settings.load_config("training")
    first["training"]["epochs"] = 999                      # a reader's mutation stays its own
    (config_dir / "training.yaml").write_text("not: [valid")  # not read again by this Settings
    assert settings.load_config("training")["training"]["epochs"] == 20
    assert settings.config.training is settings.config.training
    with pytest.raises(ConfigurationError, match="training.yaml: not valid YAML"):
        Settings.from_env({"SECURE_ML_CONFIG": str(config_dir)}).load_config("training")
    with pytest.raises(ConfigurationError, match="no configuration file named 'partners'"):
        settings.load_config("partners")


def test_from_env_is_the_one_factory_and_overrides_win(tmp_path: Path, config_dir: Path) -> None:
    environ = {"SECURE_ML_HOME": str(tmp_path / "a"), "SECURE_ML_ENV": "local", "OTHER": "kept"}
    built = Settings.from_env(environ, home=tmp_path / "b", env="production", config_dir=config_dir)
    assert built.home == tmp_path / "b" and built.env == "production" and built.config_dir == config_dir
    assert built.environ["SECURE_ML_HOME"] == str(tmp_path / "b") and built.environ["OTHER"] == "kept"
    assert built.config_override == str(config_dir)
    plain = Settings.from_env(environ, config_dir="")
    assert plain.home == tmp_path / "a" and plain.config_override == "" and plain.config_dir.resolve() == SHIPPED_DIR
    with pytest.raises(ConfigurationError, match="SECURE_ML_ENV"):
        Settings.from_env(environ, env="staging")


@pytest.mark.slow
def test_nothing_reads_configuration_at_import_time(tmp_path: Path) -> None:
    """With a broken configuration directory, every Dagster-layer module still imports; building
    the definitions is what reads (and refuses) it."""
    broken = tmp_path / "config"
    broken.mkdir()
    (broken / "automation.yaml").write_text("landing: {interval_seconds: soon}\n")
    probe = ("import assets, resources, sensors, sensors.landing, sensors.failures, sensors.conditions, "
             "secure_ml.definitions as d\n"
             "from secure_ml.errors import ConfigurationError\n"
             "try:\n    d.build_definitions()\nexcept ConfigurationError as exc:\n    print(exc.explain())\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "SECURE_ML_CONFIG": str(broken),
           "SECURE_ML_HOME": str(tmp_path / "home"), "DAGSTER_HOME": str(tmp_path / "dagster")}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "automation.yaml: landing.interval_seconds: expected an integer, got 'soon'" in result.stdout
