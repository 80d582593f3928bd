"""Approved data sources: which drops may be ingested, who owns them, and how sensitive they are.

    sources = ApprovedSources.from_settings(settings)      # pipeline.yaml dataset.sources_file
    source = sources.require("german_credit-0123456789ab.csv")   # PolicyDenied if no source matches
    source.classification, source.owner                     # "confidential", "team:data-stewards"

A source is a named set of file-name patterns (``fnmatch``, matched case-sensitively against the
drop's name in the landing area), the formats it may arrive in, an owner, and a classification
(``public``, ``internal``, ``confidential``, ``restricted`` by default, the list in roles.yaml).
A drop that matches no source is refused; a drop that matches two is a configuration error
(overlapping patterns could quietly give a drop the weaker classification of the two).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from secure_ml.errors import ConfigurationError, PolicyDenied
from secure_ml.governance.access import DEFAULT_CLASSIFICATIONS

FORMATS = ("csv", "parquet")


class _HasConfig(Protocol):
    @property
    def config_dir(self) -> Path: ...

    def load_config(self, name: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ApprovedSource:
    """One approved source of data drops."""

    name: str
    patterns: tuple[str, ...]
    owner: str
    classification: str
    formats: tuple[str, ...] = FORMATS
    description: str = ""

    def matches(self, drop_name: str) -> bool:
        fmt = drop_name.rsplit(".", 1)[-1].lower() if "." in drop_name else ""
        return fmt in self.formats and any(fnmatch.fnmatchcase(drop_name, p) for p in self.patterns)

    def summary(self) -> dict[str, str]:
        """What provenance and metadata record about the source."""
        return {"name": self.name, "owner": self.owner, "classification": self.classification}


class ApprovedSources:
    """The approved sources from configuration, in order."""

    def __init__(self, config: Mapping[str, Any], *, classifications: Sequence[str] = DEFAULT_CLASSIFICATIONS,
                 origin: str = "sources configuration", model_of: Mapping[str, str] | None = None,
                 model: str | None = None) -> None:
        self.origin = origin
        # Many models: which model each source feeds (models/NAME.yaml `sources`), and the model acting.
        self.model_of = dict(model_of or {})
        self.model = model
        self.classifications = tuple(classifications)
        entries = config.get("sources") if isinstance(config, Mapping) else None
        if not isinstance(entries, list):
            raise ConfigurationError(f"{origin} must hold a list under 'sources'")
        self.sources = tuple(self._parse(entry, i) for i, entry in enumerate(entries))
        names = [s.name for s in self.sources]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigurationError(f"{origin} names source {repeated[0]!r} twice")

    def _parse(self, entry: Any, index: int) -> ApprovedSource:
        where = f"{self.origin}, source #{index + 1}"
        if not isinstance(entry, Mapping):
            raise ConfigurationError(f"{where} must be a mapping")
        name = str(entry.get("name") or "").strip()
        if not name:
            raise ConfigurationError(f"{where} has no name")
        patterns = entry.get("patterns", entry.get("pattern"))
        patterns = [patterns] if isinstance(patterns, str) else patterns
        if not patterns or not all(isinstance(p, str) and p.strip() for p in patterns):
            raise ConfigurationError(f"source {name!r} in {self.origin} needs one or more file-name patterns")
        if any("/" in p or "\\" in p for p in patterns):
            raise ConfigurationError(f"source {name!r}: patterns match file names in the landing area, "
                                     "not paths")
        owner = str(entry.get("owner") or "").strip()
        if not owner:
            raise ConfigurationError(f"source {name!r} in {self.origin} has no owner")
        classification = str(entry.get("classification") or "")
        if classification not in self.classifications:
            raise ConfigurationError(f"source {name!r} has classification {classification!r}; "
                                     f"use one of {', '.join(self.classifications)}")
        formats = tuple(str(f).lower() for f in (entry.get("formats") or FORMATS))
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise ConfigurationError(f"source {name!r} names unknown formats: {', '.join(unknown)}")
        return ApprovedSource(name, tuple(patterns), owner, classification, formats,
                              str(entry.get("description") or ""))

    @classmethod
    def from_settings(cls, settings: _HasConfig) -> ApprovedSources:
        """Sources from the file pipeline.yaml's ``dataset.sources_file`` names (in the config dir)."""
        dataset = settings.load_config("pipeline").get("dataset") or {}
        file_name = str(dataset.get("sources_file") or "sources.yaml")
        path = Path(file_name) if Path(file_name).is_absolute() else Path(settings.config_dir) / file_name
        try:
            config = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigurationError(f"approved sources file not found: {path}") from None
        except yaml.YAMLError:
            raise ConfigurationError(f"approved sources file {path} is not valid YAML") from None
        roles = settings.load_config("roles")
        classifications = roles.get("classifications") or DEFAULT_CLASSIFICATIONS
        sources = cls(config or {}, classifications=classifications, origin=path.name)
        chosen = getattr(settings, "config", None)
        if chosen is not None and hasattr(chosen, "model_of_source"):
            sources.model_of = {s.name: chosen.model_of_source(s.name) for s in sources.sources}
            sources.model = getattr(settings, "model_name", None)
        return sources

    def route(self, drop_name: str) -> str | None:
        """The model a drop feeds (by the source its name matches), None when no source matches.
        A drop matching the sources of two models is refused, naming both."""
        found = [s for s in self.sources if s.matches(drop_name)]
        models = sorted({self.model_of.get(s.name, "") for s in found})
        if len(models) > 1:
            named = " and ".join(f"{self.model_of.get(s.name)!r} (source {s.name!r})" for s in found[:2])
            raise ConfigurationError(f"drop {drop_name!r} matches the sources of models {named}; refused: "
                                     "make their patterns disjoint")
        return self.model_of.get(found[0].name) if len(found) == 1 else None

    def match(self, drop_name: str) -> ApprovedSource | None:
        """The source a drop belongs to, or None; ConfigurationError if two sources claim it."""
        found = [s for s in self.sources if s.matches(drop_name)]
        if len({self.model_of.get(s.name) for s in found}) > 1:
            self.route(drop_name)  # names the two models
        if len(found) > 1:
            raise ConfigurationError(f"drop {drop_name!r} matches sources {found[0].name!r} and "
                                     f"{found[1].name!r} in {self.origin}; make their patterns disjoint")
        return found[0] if found else None

    def require(self, drop_name: str) -> ApprovedSource:
        """The source a drop belongs to; PolicyDenied (one line, with the reason) if none does."""
        source = self.match(drop_name)
        if source is None:
            raise PolicyDenied(f"drop {drop_name!r} is not from an approved source: no source in "
                               f"{self.origin} matches its name (approved: {self.describe()})")
        owner = self.model_of.get(source.name)
        if self.model is not None and owner is not None and owner != self.model:
            # A drop is one model's data: another model's pipeline never ingests it.
            raise PolicyDenied(f"drop {drop_name!r} is from source {source.name!r} of model {owner!r}, "
                               f"not of model {self.model!r}")
        return source

    def describe(self) -> str:
        return "; ".join(f"{s.name} = {' | '.join(s.patterns)}" for s in self.sources) or "none"
