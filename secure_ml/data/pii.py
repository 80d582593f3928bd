"""Personal data in a drop: find it, then drop, pseudonymise (keyed HMAC) or redact it by rule.

    findings = detect(frame)                                  # [Finding(column="email", kind="email", ...)]
    rules = parse_rules(config["pii"]["rules"])               # from validation.yaml
    plan = plan_handling(findings, rules)                     # plan.unhandled: PII no rule covers
    key_id, key = pseudonym_key(settings)                    # its own key (data.pseudonym); never logged
    clean = apply(frame, plan, key)                           # handled columns dropped / hashed / redacted

Kinds found: ``email``, ``phone``, ``ssn`` (US social security numbers), ``iban`` (mod-97 checked),
``card`` (13-19 digits passing the Luhn check), ``name`` (personal names in free text: a title
such as "Mrs Smith", or a common given name followed by a capitalised surname). A column is also
flagged by its name (``email``, ``phone``, ``ssn``, ``iban``, ``card_number``, ``first_name`` ...),
whatever its values look like, because a column called ``email`` holding odd values is still
someone's e-mail column.

Low-cardinality text columns are scanned completely (every distinct value); high-cardinality ones
on a deterministic sample of ``max_values`` distinct values. Rules (``column`` glob, optional
``kind``, ``action``: drop | hash | redact) say how a finding is handled; a finding no rule covers
is *unhandled* and blocks the drop. Hashes are HMAC-SHA256 under the pseudonym key, a key of
its own (secure_ml.data.pseudonym: KEK rotation leaves pseudonyms unchanged), so they are stable
join keys that cannot be reversed by hashing guesses without the key.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from secure_ml.errors import ConfigurationError

KINDS = ("email", "phone", "ssn", "iban", "card", "name")
ACTIONS = ("drop", "hash", "redact")
MAX_VALUES = 20_000

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]\d{2,8}){1,4}(?!\w)"
                    r"|(?<![\w+])\+\d{8,14}(?!\w)")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}|\d{2}[./]\d{2}[./]\d{4}")
_SSN_SHAPE = re.compile(r"\d{3}-\d{2}-\d{4}")
_SSN = re.compile(r"(?<!\d)(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?!\d)")
_IBAN = re.compile(r"(?<![A-Z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![A-Z0-9])")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_TITLE_NAME = re.compile(r"\b(?:Mr|Mrs|Ms|Miss|Dr|Prof|Herr|Frau|Mme|Sr|Sra)\.?\s+[A-Z][a-z'-]{1,}")
_FULL_NAME = re.compile(r"\b([A-Z][a-z]{1,15})\s+(?:[A-Z]\.\s+)?[A-Z][a-z'-]{1,20}\b")

#: Common given names (several languages); a first token from here followed by a capitalised
#: word is read as a personal name.
FIRST_NAMES = frozenset("""
aaron adam adrian agnes ahmed ahmet aisha alan albert alejandro alex alexander alexandra ali alice amanda amelia
amy ana andrea andreas andrew angela anna anne anthony antonio arjun ashley barbara ben benjamin bernd betty
brian carlos carmen carol caroline catherine charles charlotte chen chris christian christina christine
christopher claire claudia daniel david deborah dennis diana diego dimitri donald donna dorothy edward elena
elizabeth emily emma eric erik eva fatima felix fernando florian francesco francisco frank franz gabriel
gary george gerhard giovanni giuseppe grace hannah hans hao harry heinz helen helmut henry hiroshi ibrahim
isabel isabella jack jacob james jan jane janet jason javier jean jennifer jessica jin joan joe johann
johannes john jonas jorge jose joseph joshua juan julia julian jurgen karen karin karl kate katharina
kathleen kenji kevin klaus kumar laura lea lena leon li linda lisa liu lucas lucia luis luka lukas maria
marie mario mark martin mary matteo matthew maximilian mehmet melissa michael michelle mohammed monika
muhammad nancy nicholas nicole olga oliver omar pablo patricia paul peter petra pierre priya rachel rahul
raj ralf rebecca richard robert ronald rosa ryan sabine samuel sandra sara sarah sebastian sergei sharon
simon sofia sophie stefan stephanie steven susan sven thomas timothy tom ursula valentina victoria
vladimir wang wei william wolfgang yuki yusuf zhang
""".split())

_NAME_HINTS: dict[str, re.Pattern[str]] = {
    "email": re.compile(r"(^|_)(e_?mail|mail_?address)($|_)"),
    "phone": re.compile(r"(^|_)(phone|telephone|mobile|cell|tel|fax|msisdn)($|_)"),
    "ssn": re.compile(r"(^|_)(ssn|social_security(_number)?|national_id|nino|tax_id|passport(_number)?)($|_)"),
    "iban": re.compile(r"(^|_)(iban|bank_account(_number)?|account_number)($|_)"),
    "card": re.compile(r"(^|_)(card_?number|credit_card|ccn|pan)($|_)"),
    "name": re.compile(r"(^|_)(first_?name|last_?name|full_?name|given_?name|surname|family_?name|"
                       r"customer_?name|person_?name|name)($|_)"),
}


@dataclass(frozen=True)
class Finding:
    column: str
    kind: str
    matches: int          # values (among those scanned) holding this kind of identifier
    scanned: int          # distinct values scanned
    by: str               # "values" or "column name"

    def describe(self) -> str:
        how = f"{self.matches} of {self.scanned} distinct values" if self.by == "values" else "its column name"
        return f"column {self.column!r} holds {self.kind} ({how})"


@dataclass(frozen=True)
class Rule:
    column: str
    kind: str
    action: str

    def covers(self, finding: Finding) -> bool:
        return fnmatch.fnmatchcase(finding.column, self.column) and self.kind in ("*", finding.kind)


@dataclass
class Plan:
    handled: list[tuple[Finding, Rule]] = field(default_factory=list)
    unhandled: list[Finding] = field(default_factory=list)

    def actions(self) -> dict[str, str]:
        """column -> the strongest action that applies (drop > hash > redact)."""
        order = {a: i for i, a in enumerate(ACTIONS)}
        out: dict[str, str] = {}
        for finding, rule in self.handled:
            current = out.get(finding.column)
            if current is None or order[rule.action] < order[current]:
                out[finding.column] = rule.action
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "found": [{"column": f.column, "kind": f.kind, "matches": f.matches, "scanned": f.scanned, "by": f.by}
                      for f in [*(h[0] for h in self.handled), *self.unhandled]],
            "handled": [{"column": f.column, "kind": f.kind, "action": r.action} for f, r in self.handled],
            "unhandled": [{"column": f.column, "kind": f.kind, "by": f.by} for f in self.unhandled],
            "actions": self.actions(),
        }


# -- checks on single values ---------------------------------------------------------------------
def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(text: str) -> bool:
    code = text.replace(" ", "")
    if not 15 <= len(code) <= 34:
        return False
    moved = code[4:] + code[:4]
    number = "".join(str(int(ch, 36)) for ch in moved)
    return int(number) % 97 == 1


def _cards(text: str) -> list[str]:
    found = []
    for match in _CARD.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_valid(digits):
            found.append(match.group())
    return found


def _phones(text: str) -> list[str]:
    found = []
    for match in _PHONE.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if 9 <= len(digits) <= 15 and not _SSN_SHAPE.fullmatch(match.group()) and not _DATE.search(match.group()):
            found.append(match.group())
    return found


def _names(text: str) -> list[str]:
    found = [m.group() for m in _TITLE_NAME.finditer(text)]
    found += [m.group() for m in _FULL_NAME.finditer(text) if m.group(1).lower() in FIRST_NAMES]
    return found


def find_in_text(text: str) -> dict[str, list[str]]:
    """Every identifier in one value, by kind (only kinds that occur)."""
    found: dict[str, list[str]] = {}
    emails = _EMAIL.findall(text)
    if emails:
        found["email"] = emails
    rest = _EMAIL.sub(" ", text)
    ssns = _SSN.findall(rest)
    if ssns:
        found["ssn"] = ssns
    ibans = [m.group() for m in _IBAN.finditer(rest) if iban_valid(m.group())]
    if ibans:
        found["iban"] = ibans
    cards = _cards(rest)
    if cards:
        found["card"] = cards
    phones = [p for p in _phones(rest) if not any(p in c or c in p for c in cards + ibans)]
    if phones:
        found["phone"] = phones
    names = _names(rest)
    if names:
        found["name"] = names
    return found


def redact_text(text: str, kinds: Iterable[str] = KINDS) -> str:
    """``text`` with identifiers of ``kinds`` replaced by ``[KIND]``."""
    for kind, values in find_in_text(text).items():
        if kind in kinds:
            for value in sorted(set(values), key=len, reverse=True):
                text = text.replace(value, f"[{kind.upper()}]")
    return text


# -- scanning a frame ----------------------------------------------------------------------------
def _normal_name(column: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", re.sub(r"([a-z])([A-Z])", r"\1_\2", column).lower()).strip("_")


def _distinct_sample(series: pd.Series, max_values: int) -> list[str]:
    # unique() before any conversion: never a Python object per row, only per distinct value
    distinct = np.asarray(series.dropna().unique(), dtype=object)
    if len(distinct) > max_values:
        picks = np.sort(np.random.default_rng(0).choice(len(distinct), size=max_values, replace=False))
        distinct = distinct[picks]
    return [str(v) for v in distinct]


def detect(frame: pd.DataFrame, *, max_values: int = MAX_VALUES) -> list[Finding]:
    """Columns that hold personal identifiers, by name or by value."""
    findings: list[Finding] = []
    for column in frame.columns:
        name = str(column)
        normal = _normal_name(name)
        kinds_by_name = [k for k, pattern in _NAME_HINTS.items() if pattern.search(normal)]
        series = frame[column]
        counts: dict[str, int] = {}
        scanned = 0
        if pd.api.types.is_integer_dtype(series) or pd.api.types.is_float_dtype(series):
            # Card numbers stored as numbers: long, Luhn-valid integers (a random id passes 1 in 10).
            big = series.dropna()
            big = big[(big >= 10**12) & (big < 10**19)]
            if len(big):
                sample = _distinct_sample(big.astype("int64"), max_values)
                scanned = len(sample)
                valid = sum(luhn_valid(v) for v in sample)
                if valid >= max(1, 0.5 * scanned):
                    counts["card"] = valid
        elif not pd.api.types.is_bool_dtype(series):
            sample = _distinct_sample(series, max_values)
            scanned = len(sample)
            for value in sample:
                for kind in find_in_text(value):
                    counts[kind] = counts.get(kind, 0) + 1
            if scanned:  # single given names as whole values ("Anna") in a column of mostly names
                given = sum(v.strip().lower() in FIRST_NAMES for v in sample)
                if given >= 0.5 * scanned and given >= 3:
                    counts["name"] = counts.get("name", 0) + given
        for kind in KINDS:
            if counts.get(kind):
                findings.append(Finding(name, kind, counts[kind], scanned, "values"))
            elif kind in kinds_by_name:
                findings.append(Finding(name, kind, 0, scanned, "column name"))
    return findings


# -- rules and handling --------------------------------------------------------------------------
def parse_rules(raw: Any) -> list[Rule]:
    """Rules from validation.yaml's ``pii.rules``; a malformed rule is a configuration error."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigurationError("validation.yaml pii.rules must be a list")
    rules = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or set(item) - {"column", "kind", "action"} or "column" not in item:
            raise ConfigurationError(f"validation.yaml pii.rules[{i}] needs column and action (and optional kind)")
        kind = str(item.get("kind", "*"))
        action = str(item.get("action", ""))
        if kind != "*" and kind not in KINDS:
            raise ConfigurationError(f"validation.yaml pii.rules[{i}]: kind must be one of {', '.join(KINDS)} or *")
        if action not in ACTIONS:
            raise ConfigurationError(f"validation.yaml pii.rules[{i}]: action must be one of {', '.join(ACTIONS)}")
        rules.append(Rule(str(item["column"]), kind, action))
    return rules


def plan_handling(findings: Sequence[Finding], rules: Sequence[Rule]) -> Plan:
    """Which rule handles each finding; what is left is unhandled."""
    plan = Plan()
    for finding in findings:
        rule = next((r for r in rules if r.covers(finding)), None)
        if rule is None:
            plan.unhandled.append(finding)
        else:
            plan.handled.append((finding, rule))
    return plan


def pseudonym_key(settings: Any) -> tuple[str, bytes]:
    """(key id, HMAC key): the pseudonym key, a key of its own (secure_ml.data.pseudonym), not the KEK's."""
    from secure_ml.data.pseudonym import pseudonym_key as active

    return active(settings)


def pseudonymise(values: pd.Series, key: bytes) -> pd.Series:
    """HMAC-SHA256 (hex, 32 characters) of each value's text; nulls stay null."""
    def one(value: Any) -> str:
        return hmac.new(key, str(value).encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    present = values.notna()
    out = pd.Series(pd.NA, index=values.index, dtype="object")
    if present.any():
        uniques = pd.unique(values[present].to_numpy())
        mapping = {u: one(u) for u in uniques}
        out[present] = values[present].map(mapping)
    return out.astype("str") if present.all() else out


def apply(frame: pd.DataFrame, plan: Plan, key: bytes | None) -> pd.DataFrame:
    """A copy of ``frame`` with each handled column dropped, hashed or redacted."""
    actions = plan.actions()
    if not actions:
        return frame
    out = frame.drop(columns=[c for c, a in actions.items() if a == "drop"])
    for column, action in actions.items():
        if action == "hash":
            if key is None:
                raise ConfigurationError("hashing PII needs a pseudonymisation key")
            out[column] = pseudonymise(out[column], key)
        elif action == "redact":
            kinds = {f.kind for f, r in plan.handled if f.column == column}
            out[column] = out[column].map(lambda v: v if pd.isna(v) else redact_text(str(v), kinds))
    return out


def handled_columns(plan: Plan) -> list[str]:
    """Columns that stay in the data after handling (hashed or redacted), beside the schema's."""
    return [c for c, a in plan.actions().items() if a != "drop"]


def rules_from_config(config: Mapping[str, Any]) -> tuple[list[Rule], int]:
    section = dict(config.get("pii") or {})
    return parse_rules(section.get("rules")), int(section.get("max_values", MAX_VALUES))
