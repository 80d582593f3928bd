"""Schema files, the Great Expectations suite built from them, `secure-ml schema init`, the split.

Touches: real Great Expectations 1.x (one ephemeral context for the module; nothing on disk, no
analytics), the shipped german_credit schema and its digest-pinned reference sample, the real CLI
entry point, and pandas frames derived from data/sample/german_credit.csv. Does not touch Dagster
(tests/test_validated_dataset.py does).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from secure_ml.cli import main
from secure_ml.data import splitting
from secure_ml.data.schema import infer_schema, load_reference, load_schema, parse_schema, select_schema
from secure_ml.data import validation as gx_validation
from secure_ml.data.validation import build_suite, validate
from secure_ml.errors import BadInput, ConfigurationError, IntegrityError
from tests.conftest import SAMPLE_CSV

pytestmark = pytest.mark.slow  # runs Great Expectations suites

CONFIG = Path(__file__).resolve().parents[1] / "secure_ml" / "config"
SCHEMA = CONFIG / "schemas" / "german_credit.yaml"


@pytest.fixture(scope="module")
def schema():  # type: ignore[no-untyped-def]
    return load_schema(SCHEMA)


@pytest.fixture(scope="module")
def sample() -> pd.DataFrame:
    return pd.read_csv(SAMPLE_CSV)


@pytest.mark.slow
def test_the_shipped_schema_describes_the_sample(schema, sample: pd.DataFrame) -> None:  # type: ignore[no-untyped-def]
    assert schema.label == "risk" and schema.protected == ("sex", "age")
    assert schema.numeric == ["job", "credit_amount", "duration", "age"]
    assert schema.categorical == ["sex", "housing", "saving_accounts", "checking_account", "purpose"]
    result = validate(sample, schema)
    assert result.success, result.summary()
    assert os.environ["GX_ANALYTICS_ENABLED"] == "false"
    assert result.markdown().startswith(f"**{len(result.outcomes)} of {len(result.outcomes)} expectations passed**")
    assert load_reference(schema).equals(sample)


def test_each_kind_of_drift_fails_its_expectation(schema, sample: pd.DataFrame) -> None:  # type: ignore[no-untyped-def]
    drifted = sample.rename(columns={"age": "years"}).copy()
    drifted["credit_amount"] = drifted["credit_amount"].astype(str)       # type drift
    drifted.loc[3, "duration"] = 500                                     # out of range
    drifted.loc[4, "housing"] = "castle"                                 # unknown category
    drifted.loc[5, "sex"] = None                                         # a null where none is allowed
    result = validate(drifted, schema)
    assert not result.success
    failed = {(o.expectation, o.column) for o in result.failures}
    assert ("expect_table_columns_to_match_set", "") in failed
    assert ("expect_column_dtype_in_list", "credit_amount") in failed
    assert ("expect_column_values_to_be_between", "duration") in failed
    assert ("expect_column_values_to_be_in_set", "housing") in failed
    assert ("expect_column_values_to_not_be_null", "sex") in failed
    assert ("expect_column_dtype_in_list", "age") in failed
    table = result.markdown()
    assert "missing: age" in table and "unexpected: years" in table and "castle" in table
    assert "the column is missing" in table
    lines = [o.describe() for o in result.failures]
    assert any("duration" in line and "1 unexpected values" in line for line in lines)


def test_row_count_bounds_and_allowed_extra_columns(schema, sample: pd.DataFrame) -> None:  # type: ignore[no-untyped-def]
    few = validate(sample.iloc[:50], schema)
    assert [o.expectation for o in few.failures] == ["expect_table_row_count_to_be_between"]
    extra = sample.assign(contact="0" * 32)
    assert not validate(extra, schema).success
    assert validate(extra, schema, extra_columns=["contact"]).success


def test_examples_in_failures_are_redacted(schema, sample: pd.DataFrame) -> None:  # type: ignore[no-untyped-def]
    from secure_ml.data.pii import redact_text

    leaked = sample.copy()
    leaked.loc[0, "purpose"] = "mail jane@example.org"
    result = validate(leaked, schema, redact=redact_text)
    assert "jane@example.org" not in result.markdown() and "[EMAIL]" in result.markdown()


def _drifted_with_pii(sample: pd.DataFrame) -> pd.DataFrame:
    """Every kind of failure at once, and identifiers in the values GE quotes (one past the 40-character cut)."""
    drifted = sample.rename(columns={"age": "years"}).copy()
    drifted.loc[3, "duration"] = 500
    drifted.loc[4, "housing"] = "x" * 35 + " jane@example.org"   # the address straddles the cut
    drifted.loc[6, "purpose"] = "card 4111 1111 1111 1111"
    drifted.loc[5, "sex"] = None
    return drifted


def _worker_pids() -> list[int]:
    return [worker.pid for worker in gx_validation._WORKER]


def _warm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker, as a process that has not loaded GE yet starts one (warm() starts none where it has)."""
    monkeypatch.setattr(gx_validation, "_STATE", {})
    gx_validation.warm()
    assert len(_worker_pids()) == 1


def test_a_worker_that_died_waiting_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    _warm(monkeypatch)
    dead = gx_validation._WORKER[0]
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait(timeout=10)
    gx_validation.warm()
    [alive] = gx_validation._WORKER
    assert alive is not dead and alive.poll() is None
    gx_validation.discard_worker()


def test_a_warm_worker_gives_exactly_the_in_process_result(schema, sample: pd.DataFrame,  # type: ignore[no-untyped-def]
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker runs the same suite with the same code; quoted values are redacted here, before the cut,
    so an identifier that straddles the cut cannot leak in part."""
    from secure_ml.data.pii import redact_text

    for frame in (sample, _drifted_with_pii(sample)):
        _warm(monkeypatch)
        remote = validate(frame, schema, redact=redact_text)
        assert remote.ran == "worker" and not gx_validation._WORKER  # one job per worker, then it ends
        local = validate(frame, schema, redact=redact_text)
        assert local.ran == "in-process"
        assert remote.outcomes == local.outcomes and remote.rows == local.rows
        assert remote.markdown() == local.markdown()
    assert not remote.success
    table = remote.markdown()
    assert "jane" not in table and "example.org" not in table and "4111" not in table
    assert "[CARD]" in table and "x" * 35 + " [EMA" in table  # redacted, then cut


def test_submit_returns_while_the_worker_validates(schema, sample: pd.DataFrame,  # type: ignore[no-untyped-def]
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """validated_dataset screens for poisoning meanwhile: the job is handed over, not waited for."""
    _warm(monkeypatch)
    pending = gx_validation.submit(sample, schema)
    assert pending._thread is not None and pending._thread.is_alive()  # the worker is still importing GE
    result = pending.result()
    assert result.ran == "worker" and result.success and not pending._thread.is_alive()


def test_what_the_worker_cannot_take_is_validated_here(schema, sample: pd.DataFrame,  # type: ignore[no-untyped-def]
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    expected = validate(sample, schema)
    # a frame Arrow cannot carry (mixed types in one object column), one that would come back with
    # another dtype (plain Python strings become pandas' str), and one over the size limit
    mixed = sample.astype({"purpose": object})
    mixed.loc[2, "purpose"] = 7
    stringly = sample.astype({"housing": object})
    for frame in (mixed, stringly):
        _warm(monkeypatch)
        result = validate(frame, schema)
        assert result.ran == "in-process" and not gx_validation._WORKER
        assert result.outcomes == validate(frame, schema).outcomes
    monkeypatch.setattr(gx_validation, "WORKER_MAX_CELLS", 10)
    _warm(monkeypatch)
    pid = _worker_pids()[0]
    result = validate(sample, schema)
    assert result.ran == "in-process" and result.outcomes == expected.outcomes
    # GE is loaded here now: the worker would only hold memory, so it is ended
    assert not gx_validation._WORKER and not Path(f"/proc/{pid}").exists()


def test_a_dead_worker_changes_nothing_but_where_it_ran(schema, sample: pd.DataFrame,  # type: ignore[no-untyped-def]
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import signal
    import time

    drifted = _drifted_with_pii(sample)
    _warm(monkeypatch)
    os.kill(_worker_pids()[0], signal.SIGKILL)
    time.sleep(0.2)
    result = validate(drifted, schema)
    assert result.ran == "in-process" and result.outcomes == validate(drifted, schema).outcomes


def test_the_worker_holds_no_secret_of_its_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECURE_ML_KEK", "a" * 64)
    monkeypatch.setenv("SECURE_ML_SIGNING_PASSPHRASE", "hunter2")
    gx_validation.discard_worker()  # one started now, with these variables set
    _warm(monkeypatch)
    worker = gx_validation._WORKER[0]
    try:
        environ = dict(entry.split("=", 1) for entry in
                       Path(f"/proc/{worker.pid}/environ").read_bytes().decode().split("\0") if "=" in entry)
        assert worker.poll() is None, "the worker exited at once"
    finally:
        gx_validation.discard_worker()
    assert set(environ) <= {"PATH", "LANG", "LC_ALL", "TZ", "GX_ANALYTICS_ENABLED"}
    assert environ["GX_ANALYTICS_ENABLED"] == "false"
    assert "hunter2" not in str(environ) and "a" * 64 not in str(environ)


def test_validating_keeps_no_reference_to_the_frame(schema, sample: pd.DataFrame) -> None:  # type: ignore[no-untyped-def]
    """GE's engine caches the batches it loads: the step's frame (10M rows: gigabytes) must not outlive it."""
    import gc
    import weakref

    frame = sample.copy()
    alive = weakref.ref(frame)
    assert validate(frame, schema).ran == "in-process"
    del frame
    gc.collect()
    assert alive() is None


def test_suite_has_an_expectation_per_rule(schema) -> None:  # type: ignore[no-untyped-def]
    suite = build_suite(schema)
    kinds = [e.expectation_type for e in suite.expectations]
    assert kinds.count("expect_column_dtype_in_list") == len(schema.columns)
    assert kinds.count("expect_column_values_to_be_in_set") == 6   # risk + five categories


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.update(format="v0"), "format must be"),
    (lambda s: s.update(label="nope"), "'label' must name"),
    (lambda s: s["columns"]["age"].update(type="datetime"), "type must be one of"),
    (lambda s: s["columns"]["age"].update(minimum=3), "unknown keys"),
    (lambda s: s["columns"]["sex"].update(min=0), "must be a number on a numeric column"),
    (lambda s: s["columns"]["age"].update(min=90, max=20), "min > max"),
    (lambda s: s.update(protected=["religion"]), "'protected' must list"),
    (lambda s: s.update(rows={"min": 10, "max": 5}), "min <= max"),
    (lambda s: s.update(reference={"file": "../../etc/passwd", "sha256": "0"}), "beside the schema"),
    (lambda s: s.update(extra=1), "unknown keys"),
])
def test_malformed_schemas_are_refused_with_the_reason(edit, message: str) -> None:  # type: ignore[no-untyped-def]
    raw = yaml.safe_load(SCHEMA.read_text())
    edit(raw)
    with pytest.raises(ConfigurationError, match=message):
        parse_schema(raw, path=SCHEMA)


def test_unreadable_schema_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not found"):
        load_schema(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("columns: [unclosed")
    with pytest.raises(ConfigurationError, match="not valid YAML"):
        load_schema(bad)
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigurationError):
        load_schema(bad)


def test_a_swapped_reference_sample_is_refused(tmp_path: Path) -> None:
    shutil.copy(SCHEMA, tmp_path / SCHEMA.name)
    reference = tmp_path / "german_credit.reference.csv"
    reference.write_text(SAMPLE_CSV.read_text().replace("\n1,male,2,own", "\n0,male,2,own", 1))
    with pytest.raises(IntegrityError, match="not the sha256"):
        load_reference(load_schema(tmp_path / SCHEMA.name))


def test_schema_selection_by_source() -> None:
    schemas = {"default": "schemas/german_credit.yaml", "by_source": {"loans-*": "schemas/loans.yaml"}}
    assert select_schema("loans-2026.csv", schemas, CONFIG) == CONFIG / "schemas/loans.yaml"
    assert select_schema("german_credit-1.csv", schemas, CONFIG) == CONFIG / "schemas/german_credit.yaml"
    with pytest.raises(ConfigurationError, match="no schema"):
        select_schema("x.csv", {}, CONFIG)


def test_infer_schema_drafts_types_ranges_and_categories(sample: pd.DataFrame) -> None:
    frame = sample.assign(notes=[f"free text number {i}" for i in range(len(sample))],
                          score=sample["age"] / 7.0, flag=sample["risk"] == 1)
    frame.loc[0, "score"] = None
    draft = infer_schema(frame, name="credit", label="risk", protected=["sex"])
    columns = draft["columns"]
    assert columns["risk"] == {"type": "integer", "allowed": [0, 1]}
    assert columns["age"] == {"type": "integer", "min": 19, "max": 75}
    assert columns["sex"] == {"type": "category", "allowed": ["female", "male"]}
    assert columns["notes"] == {"type": "text", "role": "ignore"}
    assert columns["score"]["type"] == "number" and columns["score"]["nullable"] is True
    assert columns["flag"]["type"] == "boolean"
    parsed = parse_schema(draft)
    assert "notes" not in parsed.features and parsed.label == "risk"
    with pytest.raises(ConfigurationError, match="label column"):
        infer_schema(sample, name="x", label="target")
    with pytest.raises(ConfigurationError, match="no rows"):
        infer_schema(sample.iloc[:0], name="x")


def test_schema_init_cli_writes_a_reviewable_draft(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    schema) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "draft.yaml"
    assert main(["schema", "init", str(SAMPLE_CSV), "--out", str(out), "--label", "risk",
                 "--protected", "sex,age", "--name", "german_credit"]) == 0
    text = out.read_text()
    assert text.startswith("# DRAFT") and "Review before use" in text
    draft = load_schema(out)
    assert draft.columns.keys() == schema.columns.keys() and draft.label == "risk"
    assert validate(pd.read_csv(SAMPLE_CSV), draft).success
    assert main(["schema", "init", str(SAMPLE_CSV), "--out", str(out)]) == 2        # no overwrite
    assert "exists" in capsys.readouterr().err
    assert main(["schema", "init", str(SAMPLE_CSV), "--out", str(out), "--force"]) == 0
    assert "REVIEW: 'label' is not set" in out.read_text()
    with pytest.raises(ConfigurationError):
        load_schema(out)                      # a draft without a label cannot be used unreviewed
    assert main(["schema", "init", str(SAMPLE_CSV)]) == 0
    assert "format: secure-ml-schema/1" in capsys.readouterr().out


def test_schema_init_pins_its_sample_as_the_trusted_reference(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "schemas" / "loans.yaml"
    out.parent.mkdir()
    assert main(["schema", "init", str(SAMPLE_CSV), "--out", str(out), "--label", "risk", "--name", "loans"]) == 0
    assert "trusted reference loans.reference.csv pinned" in capsys.readouterr().err
    pinned = out.parent / "loans.reference.csv"
    assert pinned.read_bytes() == SAMPLE_CSV.read_bytes()
    schema = load_schema(out)
    assert schema.reference_file == pinned and len(load_reference(schema)) == 1000   # type: ignore[arg-type]
    # a swapped sample (here: flipped labels) is refused with one line naming it
    frame = pd.read_csv(pinned)
    frame.loc[:99, "risk"] = 1 - frame.loc[:99, "risk"]
    frame.to_csv(pinned, index=False)
    with pytest.raises(IntegrityError, match="loans.reference.csv hashes to") as raised:
        load_reference(schema)
    assert "\n" not in raised.value.explain()


def test_schema_init_no_reference_opts_out_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "loans.yaml"
    assert main(["schema", "init", str(SAMPLE_CSV), "--out", str(out), "--label", "risk", "--no-reference"]) == 0
    assert "warning: --no-reference" in capsys.readouterr().err
    assert load_schema(out).reference_file is None and not list(tmp_path.glob("*.reference.*"))


@pytest.mark.parametrize(("content", "message"), [
    (b"", "is empty"), (b"\xef\xbb\xbfrisk,sex\n1,male\n", "byte-order mark"),
    (b"risk,sex\n1,male,extra\n", "ragged"), (b"risk,risk\n1,2\n", "duplicate column"),
])
def test_schema_init_refuses_bad_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         content: bytes, message: str) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_bytes(content)
    assert main(["schema", "init", str(bad)]) == 2
    assert message in capsys.readouterr().err
    assert main(["schema", "init", str(tmp_path / "missing.csv")]) == 2


def test_split_is_stratified_deterministic_and_order_independent(sample: pd.DataFrame) -> None:
    train, test = splitting.split(sample, "risk", test_fraction=0.2, seed=7)
    assert len(test) == 200 and len(train) == 800
    assert test["risk"].mean() == pytest.approx(0.7) and train["risk"].mean() == pytest.approx(0.7)
    again_train, again_test = splitting.split(sample, "risk", test_fraction=0.2, seed=7)
    assert again_test.equals(test) and again_train.equals(train)
    shuffled = sample.sample(frac=1, random_state=3).reset_index(drop=True)
    _, shuffled_test = splitting.split(shuffled, "risk", test_fraction=0.2, seed=7)
    key = list(sample.columns)
    assert shuffled_test.sort_values(key).reset_index(drop=True).equals(test.sort_values(key).reset_index(drop=True))
    _, other = splitting.split(sample, "risk", test_fraction=0.2, seed=8)
    assert not other.equals(test)
    with pytest.raises(BadInput):
        splitting.split(sample, "target")
    with pytest.raises(BadInput):
        splitting.split(sample, "risk", test_fraction=1.0)
