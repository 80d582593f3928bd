"""One typed spec per model: ``models/NAME.yaml`` in the configuration directory, in version control.

    specs = load_specs(config_dir)                 # {"german_credit": ModelSpec, "breast_cancer": ...}
    spec = specs["breast_cancer"]; spec.label, spec.protected_attributes, spec.no_protected_reason
    spec.overlay("training", training_yaml_dict)   # training.yaml as this model sees it
    model, version = split_ref("breast_cancer:v3")  # how a version is named unambiguously

A spec holds what differs between models: its approved sources (names in sources.yaml), its
schema file, the label, the protected attributes (or ``protected: {none: "why"}``), training
settings and evaluation thresholds (overrides of training.yaml), promotion policy parameters
(overrides of release.yaml ``promotion``; the signed trust policy must carry the same, see
secure_ml/governance/trust.py) and the deploy target. Sections a spec leaves out are the shared
files' values, so the German-credit spec, which overrides nothing, behaves as before.

Every problem is one :class:`~secure_ml.errors.ConfigurationError` line naming the file and the key,
e.g. ``config/models/loans.yaml: protected: 'gender' is not a column of schemas/loans.yaml``.
The default model (``pipeline.yaml`` ``default_model``) keeps the unprefixed asset keys; every other
model's assets are prefixed with its name.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from secure_ml.config.loader import load_file, safe_load
from secure_ml.config.models import Strict
from secure_ml.errors import BadInput, ConfigurationError

#: A model name: a Dagster asset-key prefix, a file stem and a registry key at once.
NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
MODELS_DIR = "models"
DEFAULT_MODEL = "german_credit"


class NoProtected(Strict):
    """``protected: {none: "why"}``: the model has no protected attributes, and says why."""

    none: str = Field(min_length=8)


class DeployTarget(Strict):
    #: None: release.yaml ``deploy.default_target``.
    target: Literal["local", "kubernetes"] | None = None


class ModelSpec(Strict):
    """One model: what it is trained on and what its gates decide."""

    name: str
    description: str = ""
    owner: str = Field(min_length=1)
    sources: list[str] = Field(min_length=1)
    schema_file: str = Field(alias="schema", min_length=1)
    label: str = Field(min_length=1)
    protected: list[str] | NoProtected
    training: dict[str, Any] = {}
    evaluation: dict[str, Any] = {}
    promotion: dict[str, Any] = {}
    deploy: DeployTarget = DeployTarget()

    @model_validator(mode="after")
    def _shape(self) -> ModelSpec:
        if not NAME.match(self.name):
            raise ValueError(f"name must be lower-case letters, digits and _ (at most 40), not {self.name!r}")
        if isinstance(self.protected, list) and not self.protected:
            raise ValueError("protected must list attributes or say {none: \"why\"}")
        return self

    @property
    def protected_attributes(self) -> tuple[str, ...]:
        return tuple(self.protected) if isinstance(self.protected, list) else ()

    @property
    def no_protected_reason(self) -> str | None:
        return None if isinstance(self.protected, list) else self.protected.none

    def promotion_overrides(self) -> dict[str, Any]:
        """What this model changes in the promotion policy's data (the trust policy must say the same)."""
        overrides = copy.deepcopy(self.promotion)
        if self.no_protected_reason is not None:
            # Bias cannot be measured without protected attributes: the policy stops demanding it,
            # and the reason is part of the signed policy data (and so of every decision's input).
            overrides["max_fairness_gap"] = {}
            overrides["no_protected_attributes"] = self.no_protected_reason
        return overrides

    def overlay(self, file: str, data: dict[str, Any]) -> dict[str, Any]:
        """``data`` (a shared file as validated data) as this model sees it."""
        out = copy.deepcopy(data)
        if file == "training":
            out["training"] = {**(out.get("training") or {}), **self.training}
            out["evaluation"] = _merge(out.get("evaluation") or {}, self.evaluation)
            if self.no_protected_reason is not None:
                out["evaluation"]["fairness"] = {}
        elif file == "release":
            out["promotion"] = {**(out.get("promotion") or {}), **self.promotion_overrides()}
            if self.deploy.target is not None:
                out["deploy"] = {**(out.get("deploy") or {}), "default_target": self.deploy.target}
        elif file == "validation":
            out["schemas"] = {"default": self.schema_file, "by_source": {}}
        return out


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def spec_path(config_dir: Path, name: str) -> Path:
    return Path(config_dir) / MODELS_DIR / f"{name}.yaml"


def load_spec(config_dir: Path, name: str, *, shown: str | None = None,
              known_sources: set[str] | None = None) -> ModelSpec:
    """``models/NAME.yaml`` validated, and checked against its schema file (label, protected attributes)."""
    path = spec_path(config_dir, name)
    shown = shown or str(path)
    spec = load_file(path, ModelSpec, shown=shown)
    if not isinstance(spec, ModelSpec):  # load_file returns the model it was given
        raise ConfigurationError(f"{shown}: not a model spec")
    if spec.name != name:
        raise ConfigurationError(f"{shown}: name: must be the file's name {name!r}, not {spec.name!r}")
    if known_sources is not None:
        unknown = [s for s in spec.sources if s not in known_sources]
        if unknown:
            raise ConfigurationError(f"{shown}: sources: {unknown[0]!r} is not a source in sources.yaml")
    columns, label = _schema_columns(Path(config_dir) / spec.schema_file, spec.schema_file, shown)
    if spec.label not in columns:
        raise ConfigurationError(f"{shown}: label: {spec.label!r} is not a column of {spec.schema_file}")
    if label and label != spec.label:
        raise ConfigurationError(f"{shown}: label: {spec.label!r} differs from the label {label!r} of {spec.schema_file}")
    for attribute in spec.protected_attributes:
        if attribute not in columns:
            raise ConfigurationError(f"{shown}: protected: {attribute!r} is not a column of {spec.schema_file}")
    return spec


def _schema_columns(path: Path, named: str, shown: str) -> tuple[set[str], str]:
    try:
        raw = safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigurationError(f"{shown}: schema: {named} not found") from None
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ConfigurationError(f"{shown}: schema: {named} is not valid YAML") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("columns"), dict):
        raise ConfigurationError(f"{shown}: schema: {named} has no columns")
    return {str(c) for c in raw["columns"]}, str(raw.get("label") or "")


def model_names(config_dir: Path) -> list[str]:
    """The models that have a spec, sorted (none: the configuration predates specs)."""
    directory = Path(config_dir) / MODELS_DIR
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.yaml"))


def split_ref(ref: str) -> tuple[str | None, str]:
    """``MODEL:VERSION`` -> (MODEL, VERSION); a bare ``VERSION`` -> (None, VERSION)."""
    if ":" not in ref:
        return None, ref
    model, _, version = ref.partition(":")
    if not NAME.match(model):
        raise BadInput(f"not a model name in {ref[:60]!r} (expected MODEL:VERSION, e.g. german_credit:v1)")
    return model, version
