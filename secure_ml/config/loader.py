"""Reading one configuration file into its model; every problem is one line naming file and key.

    model = load_file(Path("config/training.yaml"), TrainingFile, shown="config/training.yaml")

Errors (all :class:`secure_ml.errors.ConfigurationError`)::

    config/training.yaml: training.epochs: expected an integer, got 'ten'
    config/training.yaml: training.epoch: unknown key
    config/sources.yaml: sources[0].owner: required key is missing
    config/training.yaml: not valid YAML (line 4)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pydantic
import yaml

from secure_ml.config.models import Strict
from secure_ml.errors import ConfigurationError

#: What a person is told for pydantic's error types (the rest use pydantic's own message).
_EXPECTED = {
    "int_type": "expected an integer", "int_from_float": "expected an integer",
    "float_type": "expected a number", "string_type": "expected a string", "bool_type": "expected true or false",
    "list_type": "expected a list", "dict_type": "expected a mapping", "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
}
# Values that may hold a credential (a webhook URL usually carries a token) are never echoed.
_SECRET_KEY = re.compile(r"url|token|secret|password|credential|key$", re.IGNORECASE)


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` through libyaml when PyYAML has it (the same safe constructor, ~10x faster:
    a project with many model specs and schemas parses them all when the definitions load)."""
    if yaml.__with_libyaml__:
        return yaml.load(text, Loader=yaml.CSafeLoader)
    return yaml.safe_load(text)


def load_file(path: Path, model: type[Strict], *, shown: str) -> Strict:
    """``path`` parsed with yaml.safe_load and validated by ``model``; ConfigurationError otherwise."""
    try:
        data = safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigurationError(f"{shown}: configuration file not found") from None
    except UnicodeDecodeError:
        raise ConfigurationError(f"{shown}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigurationError(f"{shown}: not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigurationError(f"{shown}: must hold a mapping, not a {type(data).__name__}")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ConfigurationError(f"{shown}: {describe(exc)}") from None


def describe(exc: pydantic.ValidationError) -> str:
    """The first problem as ``key.path: what is wrong``, with a count of any others."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    path = key_path(first["loc"])
    message = f"{path}: {_message(first, path)}" if path else _message(first, path)
    return message + (f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else "")


def key_path(loc: tuple[Any, ...]) -> str:
    """``("sources", 0, "owner")`` -> ``sources[0].owner``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _message(error: Any, path: str) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind in _EXPECTED:
        return f"{_EXPECTED[kind]}, got {_shown_value(error.get('input'), path)}"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"expected one of {expected}, got {_shown_value(error.get('input'), path)}"
    text = str(error["msg"]).removeprefix("Value error, ")
    text = text[:1].lower() + text[1:]
    value = error.get("input")
    return text if isinstance(value, dict | list) else f"{text}, got {_shown_value(value, path)}"


def _shown_value(value: Any, path: str) -> str:
    if _SECRET_KEY.search(path.rsplit(".", 1)[-1]) and isinstance(value, str):
        return "a string (not shown)"
    if isinstance(value, dict | list):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
