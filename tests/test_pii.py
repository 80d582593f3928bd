"""PII detection and handling (secure_ml.pii).

Touches: the real detectors on synthetic identifiers (valid and invalid checksums), the real
German Credit sample (no false positives), rules from YAML-shaped config, and keyed hashing with a
key derived from a real local keyring. Does not touch Dagster (tests/test_validated_dataset.py
proves the blocking check end to end).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from secure_ml.custody.keys import LocalKeyring
from secure_ml.data import pii
from secure_ml.errors import ConfigurationError
from secure_ml.settings import Settings
from tests.conftest import SAMPLE_CSV


@pytest.mark.parametrize(("text", "kind"), [
    ("write to jane.doe+loans@bank.example.com", "email"),
    ("call +49 30 1234567 after 5", "phone"),
    ("(555) 123-4567", "phone"),
    ("SSN 123-45-6789", "ssn"),
    ("pay to DE89 3704 0044 0532 0130 00", "iban"),
    ("GB82WEST12345698765432", "iban"),
    ("card 4111 1111 1111 1111 exp 12/29", "card"),
    ("5500-0000-0000-0004", "card"),
    ("spoke with Mrs Miller about it", "name"),
    ("applicant Maria Schmidt, 34", "name"),
])
def test_identifiers_are_found(text: str, kind: str) -> None:
    assert kind in pii.find_in_text(text)


@pytest.mark.parametrize("text", [
    "radio/TV", "furniture/equipment", "quite rich", "4111 1111 1111 1112",   # fails Luhn
    "DE00 3704 0044 0532 0130 00",                                          # fails mod-97
    "000-12-3456", "meeting 2024-01-15 10:30", "invoice 1234567", "The Bank", "Paris France", "v1.2.3",
])
def test_look_alikes_are_not_identifiers(text: str) -> None:
    assert pii.find_in_text(text) == {}


def test_checksums() -> None:
    assert pii.luhn_valid("4111111111111111") and not pii.luhn_valid("4111111111111112")
    assert pii.iban_valid("DE89370400440532013000") and not pii.iban_valid("DE88370400440532013000")


def test_the_sample_has_no_pii() -> None:
    assert pii.detect(pd.read_csv(SAMPLE_CSV)) == []


def test_columns_are_flagged_by_value_and_by_name() -> None:
    frame = pd.DataFrame({
        "contact": [f"user{i}@example.org" for i in range(20)],
        "notes": ["fine"] * 19 + ["customer Peter Meyer called"],
        "card": [4111111111111111, 5500000000000004] * 10,
        "Phone_Number": ["withheld"] * 20,
        "first": ["Anna", "John", "Maria", "Peter", "Olga"] * 4,
        "amount": list(range(20)),
    })
    found = {(f.column, f.kind): f for f in pii.detect(frame)}
    assert found[("contact", "email")].matches == 20 and found[("contact", "email")].by == "values"
    assert ("notes", "name") in found  # one name in free text is enough
    assert ("card", "card") in found
    assert found[("Phone_Number", "phone")].by == "column name"
    assert ("first", "name") in found
    assert not any(column == "amount" for column, _ in found)
    assert "column 'contact' holds email (20 of 20 distinct values)" == found[("contact", "email")].describe()


def test_rules_decide_what_is_handled_and_what_blocks() -> None:
    findings = [pii.Finding("contact", "email", 5, 5, "values"), pii.Finding("notes", "name", 1, 9, "values"),
                pii.Finding("notes", "phone", 1, 9, "values")]
    rules = pii.parse_rules([{"column": "cont*", "kind": "email", "action": "hash"},
                             {"column": "notes", "kind": "name", "action": "redact"}])
    plan = pii.plan_handling(findings, rules)
    assert [f.kind for f in plan.unhandled] == ["phone"]
    assert plan.actions() == {"contact": "hash", "notes": "redact"}
    summary = plan.summary()
    assert summary["unhandled"] == [{"column": "notes", "kind": "phone", "by": "values"}]


@pytest.mark.parametrize("raw", [
    {"rules": "drop everything"}, [{"column": "x", "action": "encrypt"}], [{"column": "x", "kind": "dna", "action": "drop"}],
    [{"action": "drop"}], [{"column": "x", "action": "drop", "extra": 1}],
])
def test_malformed_rules_are_configuration_errors(raw: object) -> None:
    with pytest.raises(ConfigurationError):
        pii.parse_rules(raw.get("rules") if isinstance(raw, dict) else raw)


def test_handling_drops_hashes_with_the_pseudonym_key_and_redacts(settings: Settings) -> None:
    key_id, key = pii.pseudonym_key(settings)
    _, kek = LocalKeyring(settings.keyring_path).active_key()
    assert key != kek and len(key) == 32 and key_id.startswith("psk-")
    frame = pd.DataFrame({"contact": ["a@x.org", "b@x.org", "a@x.org"], "ssn": ["123-45-6789"] * 3,
                          "notes": ["call Mrs Miller on +49 30 1234567", None, "ok"], "risk": [1, 0, 1]})
    rules = pii.parse_rules([{"column": "contact", "action": "hash"}, {"column": "ssn", "action": "drop"},
                             {"column": "notes", "action": "redact"}])
    plan = pii.plan_handling(pii.detect(frame), rules)
    assert not plan.unhandled
    out = pii.apply(frame, plan, key)
    assert list(out.columns) == ["contact", "notes", "risk"]
    assert out["contact"][0] == out["contact"][2] != out["contact"][1]     # a stable pseudonym
    assert not out["contact"].str.contains("@").any()
    assert out["notes"][0] == "call [NAME] on [PHONE]" and pd.isna(out["notes"][1])
    assert pii.handled_columns(plan) == ["contact", "notes"]
    other = pii.apply(frame, plan, b"\x01" * 32)
    assert other["contact"][0] != out["contact"][0]                       # keyed: no key, no match
    assert frame["contact"][0] == "a@x.org"                                # the input is untouched
    with pytest.raises(ConfigurationError):
        pii.apply(frame, plan, None)


def test_the_pseudonym_key_is_its_own_kek_rotation_keeps_pseudonyms_and_its_own_rotation_changes_them(
        settings: Settings) -> None:
    from secure_ml.custody.store import rotate_keys
    from secure_ml.data.pseudonym import rotate_pseudonym_key

    values = pd.Series(["a@x.org", "b@x.org"])
    key_id, key = pii.pseudonym_key(settings)
    before = pii.pseudonymise(values, key).tolist()
    assert pii.pseudonym_key(settings) == (key_id, key)  # created once, then read back from the store
    pointer = (settings.keys_dir / "pseudonym.json").read_text()
    assert key.hex() not in pointer and settings.keys_dir.joinpath("pseudonym.json").stat().st_mode & 0o077 == 0
    for reencrypt in (False, True):  # KEK rotation, plain and with new data keys: pseudonyms unchanged
        rotate_keys(settings.artifact_store(), LocalKeyring(settings.keyring_path), reencrypt=reencrypt)
        assert pii.pseudonymise(values, pii.pseudonym_key(settings)[1]).tolist() == before
    new_id, new_key = rotate_pseudonym_key(settings)  # its own schedule: every pseudonym changes
    assert new_id != key_id and pii.pseudonymise(values, new_key).tolist() != before
    assert pii.pseudonym_key(settings) == (new_id, new_key)
    actions = [e["action"] for e in settings.audit_log().entries()]
    assert actions.count("pii.pseudonym_key.create") == 2
