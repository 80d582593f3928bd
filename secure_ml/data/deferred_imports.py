"""Third-party import costs paid only when used: call before importing great_expectations or cyclonedx.

    deferred_imports.defer_iri_grammar()   # then: import great_expectations (or jsonschema)
    deferred_imports.defer_modules(deferred_imports.GE_UNUSED)   # then: import great_expectations

jsonschema registers its ``iri`` / ``iri-reference`` format checks by importing ``rfc3987_syntax``
(pulled in by cyclonedx-python-lib's ``validation`` extra), which compiles an RFC 3987 grammar at
import: about 3.5 CPU-seconds, a third of importing Great Expectations, which never checks an IRI.
Here ``rfc3987_syntax`` is registered as a stand-in whose ``is_valid_syntax`` imports the real
module on its first call, so the checks stay exactly as they were (the SBOM validation still runs
them) and only a process that validates an IRI pays for the grammar.

``defer_modules`` does the same for whole top-level modules with the standard library's
``importlib.util.LazyLoader``: the first ``import NAME`` after it binds a module whose code runs
on its first attribute access. Great Expectations imports ``altair`` at module level (in
``expect_column_kl_divergence_to_be_less_than``) only to draw that expectation's charts, about
1 CPU-second of its import that a run of our suites never touches; any use of ``altair`` still
gets the real module, loaded at that moment. Only names not imported yet are deferred.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import types
from collections.abc import Iterable
from typing import Any

NAME = "rfc3987_syntax"
#: Top-level modules Great Expectations imports at module level but uses only to render charts.
GE_UNUSED = ("altair",)
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


class _LazyFinder(importlib.abc.MetaPathFinder):
    """Finds ``names`` on sys.path like the path finder does, with the loader wrapped in a LazyLoader.

    A finder (not a module put in sys.modules) because an ``import`` of a module already in
    sys.modules reads its ``__spec__``, which would run a lazy module's code there and then."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec


_FINDER = _LazyFinder()


def defer_modules(names: Iterable[str]) -> None:
    """The next ``import NAME`` (top-level names only) binds a module loaded on first attribute use."""
    with _LOCK:
        for name in names:
            if "." in name:
                raise ValueError(f"only top-level modules can be deferred, not {name!r}")
            if name not in sys.modules:
                _FINDER.names.add(name)
        if _FINDER.names and _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)


def deferred(name: str) -> bool:
    """Whether ``name`` is imported but its code has not run yet (a lazy module not yet touched)."""
    lazy = getattr(importlib.util, "_LazyModule", None)  # the class a lazy module has until first touched
    module = sys.modules.get(name)
    return module is not None and lazy is not None and type(module) is lazy
