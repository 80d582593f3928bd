"""Deferring the RFC 3987 grammar keeps jsonschema's IRI checks exact (secure_ml.data.deferred_imports).

Touches: a fresh interpreter (the deferral is per process) importing jsonschema after
``defer_iri_grammar()``, then the real ``iri`` format check on a good and a bad IRI. Does not import
Great Expectations (tests/test_validation*.py do, through the same call).
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
