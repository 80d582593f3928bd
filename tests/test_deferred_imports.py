"""Deferred imports keep behaviour exact (secure_ml.data.deferred_imports): the RFC 3987 grammar
for jsonschema's IRI checks, and altair under Great Expectations.

Touches: fresh interpreters (a deferral is per process) importing jsonschema after
``defer_iri_grammar()``, then the real ``iri`` format check on a good and a bad IRI; real Great
Expectations validating the sample with one planted failure while altair stays unexecuted.
"""

import subprocess
import sys

SCRIPT = """
import sys
from secure_ml.data.deferred_imports import defer_iri_grammar
defer_iri_grammar()
import jsonschema
checker = jsonschema.FormatChecker()
before = hasattr(sys.modules["rfc3987_syntax"], "__file__")
print(before, checker.conforms("https://example.org/a\\u00e4", "iri"), checker.conforms("no iri <>", "iri"),
      hasattr(sys.modules["rfc3987_syntax"], "__file__"))
"""


def test_the_grammar_loads_only_when_an_iri_is_checked_and_checks_stay_exact() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["False", "True", "False", "True"], out.stderr


VALIDATE = """
import sys
import pandas as pd
from secure_ml.data import deferred_imports
from secure_ml.data.schema import load_schema
from secure_ml.data.validation import validate
schema = load_schema("secure_ml/config/schemas/german_credit.yaml")
frame = pd.read_csv("data/sample/german_credit.csv")
frame.loc[3, "duration"] = 500
result = validate(frame, schema)
errors = [o.error for o in result.outcomes if o.error]
print(len(result.outcomes), [o.column for o in result.failures], errors, deferred_imports.deferred("altair"))
import altair
print(hasattr(altair, "Chart"), deferred_imports.deferred("altair"), hasattr(sys.modules["altair"], "__file__"))
"""


def test_ge_runs_every_expectation_while_altair_stays_unloaded_until_touched() -> None:
    """The whole suite is evaluated (32 expectations, the planted range failure found, no errors) with
    altair never executed; importing it afterwards gives the real module, loaded there and then."""
    out = subprocess.run([sys.executable, "-c", VALIDATE], capture_output=True, text=True, timeout=300, check=True)
    first, second = out.stdout.strip().splitlines()[-2:]
    assert first == "32 ['duration'] [] True", out.stderr[-2000:]
    assert second == "True False True", out.stderr[-2000:]


def test_only_top_level_modules_can_be_deferred() -> None:
    import pytest

    from secure_ml.data.deferred_imports import defer_modules

    with pytest.raises(ValueError, match="only top-level modules"):
        defer_modules(["altair.vegalite"])
