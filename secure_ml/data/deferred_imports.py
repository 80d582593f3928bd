"""Third-party import costs paid only when used: call before importing great_expectations or cyclonedx.

    deferred_imports.defer_iri_grammar()   # then: import great_expectations (or jsonschema)

jsonschema registers its ``iri`` / ``iri-reference`` format checks by importing ``rfc3987_syntax``
(pulled in by cyclonedx-python-lib's ``validation`` extra), which compiles an RFC 3987 grammar at
import: about 3.5 CPU-seconds, a third of importing Great Expectations, which never checks an IRI.
Here ``rfc3987_syntax`` is registered as a stand-in whose ``is_valid_syntax`` imports the real
module on its first call, so the checks stay exactly as they were (the SBOM validation still runs
them) and only a process that validates an IRI pays for the grammar.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

NAME = "rfc3987_syntax"
_LOCK = threading.Lock()


def defer_iri_grammar() -> None:
    """Register the stand-in unless the module (or jsonschema, which already bound it) is loaded."""
    with _LOCK:
        if NAME in sys.modules or "jsonschema" in sys.modules or importlib.util.find_spec(NAME) is None:
            return
        stand_in = types.ModuleType(NAME, "deferred: the real module is imported on first use")
        stand_in.is_valid_syntax = _is_valid_syntax  # type: ignore[attr-defined]
        sys.modules[NAME] = stand_in


def _real() -> Any:
    with _LOCK:
        module = sys.modules.get(NAME)
        if module is None or getattr(module, "is_valid_syntax", None) is _is_valid_syntax:
            sys.modules.pop(NAME, None)
            module = importlib.import_module(NAME)
        return module


def _is_valid_syntax(rule: str, value: str) -> bool:
    return bool(_real().is_valid_syntax(rule, value))
