"""The pipeline's configuration: each YAML file here parsed once into a typed, validated model.

    settings.config.training.training.epochs          # typed (Settings.config is a Config)
    settings.load_config("training")                   # the same file as a validated dict
    settings.config.models()                           # {name: ModelSpec}: models/NAME.yaml (model_spec.py)
    Config(directory).check_all()                      # every file, e.g. before a deploy

The YAML files in this directory are the shipped defaults; ``$SECURE_ML_CONFIG`` names a copy
to use instead. Each file is read and validated the first time it is asked for, then kept for
the life of the Config (nothing is read at import time). Unknown keys, wrong types, missing
required keys and malformed YAML are each one :class:`~secure_ml.errors.ConfigurationError`
line naming the file and the key path, e.g.
``config/training.yaml: training.epochs: expected an integer, got 'ten'``.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

from secure_ml.config.loader import load_file
from secure_ml.config.model_spec import DEFAULT_MODEL, ModelSpec, load_spec, model_names
from secure_ml.config.models import (
    FILES,
    AutomationFile,
    PipelineFile,
    ReleaseFile,
    RolesFile,
    SecurityFile,
    SourcesFile,
    Strict,
    TrainingFile,
    ValidationFile,
)
from secure_ml.errors import ConfigurationError

#: The defaults shipped with the package.
SHIPPED_DIR = Path(__file__).resolve().parent


class Config:
    """The configuration files of one directory, each validated once, on first use."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self._models: dict[str, Strict] = {}
        self._dicts: dict[str, dict[str, Any]] = {}
        self._specs: dict[str, ModelSpec] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Config({str(self.directory)!r})"

    def shown(self, name: str) -> str:
        """How errors name a file: ``config/NAME.yaml`` for the shipped defaults, else its path."""
        try:
            shipped = self.directory.resolve() == SHIPPED_DIR
        except OSError:
            shipped = False
        return f"config/{name}.yaml" if shipped else str(self.directory / f"{name}.yaml")

    def file(self, name: str) -> Strict:
        """The validated model of ``NAME.yaml``."""
        if name not in FILES:
            raise ConfigurationError(f"no configuration file named {name!r} (known: {', '.join(sorted(FILES))})")
        with self._lock:
            if name not in self._models:
                self._models[name] = load_file(self.directory / f"{name}.yaml", FILES[name], shown=self.shown(name))
            return self._models[name]

    def as_dict(self, name: str) -> dict[str, Any]:
        """``NAME.yaml`` as validated data: the keys the file sets (defaults are the readers'), a private copy."""
        model = self.file(name)
        with self._lock:
            if name not in self._dicts:
                self._dicts[name] = model.model_dump(mode="python", exclude_unset=True)
            return copy.deepcopy(self._dicts[name])

    def check_all(self) -> None:
        """Validate every file and every model spec (the first problem raises)."""
        for name in FILES:
            self.file(name)
        self.models()

    # -- models (models/NAME.yaml) ---------------------------------------------------------
    def models(self) -> dict[str, ModelSpec]:
        """Every model spec, validated against sources.yaml and its schema; {} before specs existed."""
        if self._specs is None:
            names = model_names(self.directory)
            known = {source.name for source in self.sources.sources} if names else set()
            specs = {name: load_spec(self.directory, name, shown=self.shown(f"models/{name}"), known_sources=known)
                     for name in names}
            claimed: dict[str, str] = {}
            for spec in specs.values():
                for source in spec.sources:
                    if source in claimed:
                        raise ConfigurationError(f"{self.shown(f'models/{spec.name}')}: sources: {source!r} is "
                                                 f"already the source of model {claimed[source]!r}")
                    claimed[source] = spec.name
            with self._lock:
                self._specs = specs
        return dict(self._specs)

    @property
    def default_model(self) -> str:
        """The model whose assets keep the unprefixed keys (pipeline.yaml ``default_model``)."""
        return self.pipeline.default_model

    def model_of_source(self, source: str) -> str:
        """The model an approved source feeds (the default model when no spec claims it)."""
        for spec in self.models().values():
            if source in spec.sources:
                return spec.name
        return self.default_model

    # -- typed access, one property per file ---------------------------------------------------
    @property
    def automation(self) -> AutomationFile:
        return self._typed("automation", AutomationFile)

    @property
    def pipeline(self) -> PipelineFile:
        return self._typed("pipeline", PipelineFile)

    @property
    def release(self) -> ReleaseFile:
        return self._typed("release", ReleaseFile)

    @property
    def roles(self) -> RolesFile:
        return self._typed("roles", RolesFile)

    @property
    def security(self) -> SecurityFile:
        return self._typed("security", SecurityFile)

    @property
    def sources(self) -> SourcesFile:
        return self._typed("sources", SourcesFile)

    @property
    def training(self) -> TrainingFile:
        return self._typed("training", TrainingFile)

    @property
    def validation(self) -> ValidationFile:
        return self._typed("validation", ValidationFile)

    def _typed(self, name: str, model: type[Strict]) -> Any:
        loaded = self.file(name)
        assert isinstance(loaded, model)
        return loaded


__all__ = ["DEFAULT_MODEL", "FILES", "SHIPPED_DIR", "Config", "ModelSpec"]
