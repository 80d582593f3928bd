"""SLSA provenance in a DSSE envelope: build, sign, verify, match subjects (secure_ml.attestation).

Touches: real ECDSA keys, the DSSE PAE checked against the spec's example and sigstore-python's
own implementation, real model-signing bundles over model directories made here, and the
``secure-ml verify-attestation`` command.
Does not touch: Dagster (the asset and its blocking check are in test_security_stage.py).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from secure_ml.cli import main as cli
from secure_ml.custody.integrity import sha256_file, sha256_tree
from secure_ml.errors import VerificationError
from secure_ml.security import attestation, signing


def write_model(directory: Path, *, seed: int = 0) -> Path:
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b'{"__metadata__":{}}'[:8] + bytes([seed]))
    (directory / "config.json").write_text(json.dumps({"seed": seed}))
    return directory


def build(**overrides: object) -> attestation.BuildInfo:
    values: dict[str, object] = dict(
        builder_id="https://secure-ml.local/dagster/local", invocation_id="run-123",
        started_on="2026-11-23T12:00:00+00:00", finished_on="2026-11-23T12:05:00+00:00",
        code_commit="a" * 40, code_repository="secure-ml", lock_sha256="b" * 64,
        config={"security": {"scan": {"blocking_severity": "high"}}}, hyperparameters={"lr": 0.01},
        dependencies=[{"name": "dataset", "digest": {"sha256": "c" * 64}, "annotations": {"dvc_version": "md5:1"}},
                      {"name": "validated_dataset", "digest": {"sha256": "d" * 64},
                       "annotations": {"dvc_version": "md5:2"}}],
    )
    values.update(overrides)
    return attestation.BuildInfo(**values)  # type: ignore[arg-type]


@pytest.fixture
def signed_model(tmp_path: Path) -> dict[str, Path]:
    key = tmp_path / "keys" / "model-signing.pem"
    public = signing.ensure_signing_key(key)
    other_key = tmp_path / "other" / "model-signing.pem"
    other_public = signing.ensure_signing_key(other_key)
    model = write_model(tmp_path / "model")
    bundle = tmp_path / "model.sig"
    signing.sign_model(model, bundle, private_key=key)
    statement = attestation.provenance_statement(sha256_tree(model), sha256_file(bundle), build=build())
    envelope = tmp_path / "attestation.dsse.json"
    envelope.write_bytes(attestation.sign_envelope(statement, private_key=key))
    return {"key": key, "public": public, "other_key": other_key, "other_public": other_public,
            "model": model, "bundle": bundle, "envelope": envelope}


def test_pae_matches_the_dsse_spec_and_sigstore() -> None:
    from sigstore.dsse import _pae

    assert attestation.pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    payload = b'{"_type": "x"}'
    assert attestation.pae(attestation.PAYLOAD_TYPE, payload) == _pae(attestation.PAYLOAD_TYPE, payload)


def test_statement_is_slsa_provenance_v1(signed_model: dict[str, Path]) -> None:
    statement = attestation.verify_envelope(signed_model["envelope"].read_bytes(), [signed_model["public"]])
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    names = {s["name"] for s in statement["subject"]}
    assert names == {"model/model.safetensors", "model/config.json", "model.sig"}
    definition = statement["predicate"]["buildDefinition"]
    assert definition["externalParameters"]["source"]["commit"] == "a" * 40
    assert definition["externalParameters"]["lockFile"]["sha256"] == "b" * 64
    assert definition["externalParameters"]["hyperparameters"] == {"lr": 0.01}
    resolved = {d["name"]: d for d in definition["resolvedDependencies"]}
    assert resolved["validated_dataset"]["annotations"]["dvc_version"] == "md5:2"
    assert resolved["pipeline-code"]["digest"]["gitCommit"] == "a" * 40
    run = statement["predicate"]["runDetails"]
    assert run["builder"]["id"].startswith("https://") and run["metadata"]["invocationId"] == "run-123"
    attestation.check_subjects(statement, sha256_tree(signed_model["model"]), sha256_file(signed_model["bundle"]))


def test_untrusted_key_is_refused(signed_model: dict[str, Path]) -> None:
    with pytest.raises(VerificationError, match="not signed by a trusted key"):
        attestation.verify_envelope(signed_model["envelope"].read_bytes(), [signed_model["other_public"]])
    forged = attestation.sign_envelope({"_type": attestation.STATEMENT_TYPE}, private_key=signed_model["other_key"])
    with pytest.raises(VerificationError, match="not signed by a trusted key"):
        attestation.verify_envelope(forged, [signed_model["public"]])


def test_altered_payload_is_refused(signed_model: dict[str, Path]) -> None:
    envelope = json.loads(signed_model["envelope"].read_bytes())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["predicate"]["runDetails"]["metadata"]["invocationId"] = "another-run"
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    with pytest.raises(VerificationError, match="altered"):
        attestation.verify_envelope(json.dumps(envelope).encode(), [signed_model["public"]])
    envelope = json.loads(signed_model["envelope"].read_bytes())
    envelope["payloadType"] = "text/plain"
    with pytest.raises(VerificationError, match="payload type"):
        attestation.verify_envelope(json.dumps(envelope).encode(), [signed_model["public"]])


@pytest.mark.parametrize("mangle", [lambda raw: raw[: len(raw) // 2], lambda raw: b"", lambda raw: b"{}",
                                    lambda raw: raw.replace(b'"sig"', b'"signature"')])
def test_truncated_or_malformed_envelope(signed_model: dict[str, Path], mangle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(VerificationError, match="not a DSSE envelope"):
        attestation.verify_envelope(mangle(signed_model["envelope"].read_bytes()), [signed_model["public"]])


def test_subject_digest_that_does_not_match_is_refused(tmp_path: Path, signed_model: dict[str, Path]) -> None:
    files = sha256_tree(signed_model["model"])
    bundle_digest = sha256_file(signed_model["bundle"])
    wrong = dict(files, **{"config.json": "0" * 64})
    statement = attestation.provenance_statement(wrong, bundle_digest, build=build())
    with pytest.raises(VerificationError, match="model/config.json: attested sha256:0000"):
        attestation.check_subjects(statement, files, bundle_digest)
    statement = attestation.provenance_statement(files, "1" * 64, build=build())
    with pytest.raises(VerificationError, match="model.sig"):
        attestation.check_subjects(statement, files, bundle_digest)
    statement = attestation.provenance_statement({**files, "extra.bin": "2" * 64}, bundle_digest, build=build())
    with pytest.raises(VerificationError, match="not part of the signed model"):
        attestation.check_subjects(statement, files, bundle_digest)


def test_cli_verify_attestation(tmp_path: Path, signed_model: dict[str, Path], home: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    args = ["verify-attestation", str(signed_model["envelope"]), "--model", str(signed_model["model"]),
            "--signature", str(signed_model["bundle"]), "--public-key", str(signed_model["public"])]
    assert cli(args) == 0
    assert "SLSA provenance signed by model-signing.pub; 3 subjects match" in capsys.readouterr().out
    # An attestation for another (validly signed) model: the subjects do not match this one.
    other = write_model(tmp_path / "other-model", seed=7)
    other_bundle = tmp_path / "other.sig"
    signing.sign_model(other, other_bundle, private_key=signed_model["key"])
    assert cli([*args[:3], str(other), "--signature", str(other_bundle), *args[6:]]) == 1
    assert "attestation subjects do not match" in capsys.readouterr().err
