"""One verification chain: the four callers refuse a bad model for the same one-line reason.

Touches: secure_ml/security/verification.py through each of its callers, with real P-256 keys,
real model-signing bundles and DSSE attestations, the encrypted store, a SQLite registry and a real
Dagster instance: ``secure-ml model export`` (in process), the deploy gate (``Release.verify``),
the security asset checks (``model_signature_verifies``, ``attestation_verifies``) and the
server's loader (``serving.load_deployment``). Two faults: one model file changed after signing,
and a signature swapped for another model's (signed by the same trusted key).
Does not touch: Sigstore keyless (tests/test_signing.py), the HTTP server (tests/test_serving.py).
"""


import json
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from _release_fixtures import Keys, attest, make_keys, make_model_dir, publish, release_for, sign

import resources
from assets import security
from resources import CustodyResource
from secure_ml.cli import main as cli
from secure_ml.errors import Error, VerificationError
from secure_ml.release import serving
from secure_ml.release.evidence import model_digest
from secure_ml.security import verification
from secure_ml.settings import Settings

pytestmark = pytest.mark.slow  # signs models and runs every verifier


class Paths(dg.Config):
    path: str


@dg.asset(name="trained_model")
def stored_model(context: dg.AssetExecutionContext, config: Paths, custody: CustodyResource) -> dg.Output[Any]:
    return custody.output(context, Path(config.path))


@dg.asset(name="model_signature", deps=["trained_model"])
def stored_signature(context: dg.AssetExecutionContext, config: Paths, custody: CustodyResource) -> dg.Output[Any]:
    return custody.output(context, Path(config.path).read_bytes())


@dg.asset(name="attestation", deps=["model_signature"])
def stored_attestation(context: dg.AssetExecutionContext, config: Paths, custody: CustodyResource) -> dg.Output[Any]:
    return custody.output(context, Path(config.path).read_bytes())


def _fault(tmp_path: Path, keys: Keys, fault: str) -> tuple[Path, Path, bytes, bytes, str]:
    """(model dir as delivered, the signed model, bundle, envelope, the digest signed) for one fault."""
    signed = make_model_dir(tmp_path / "signed", seed=1)
    bundle = sign(signed, keys, tmp_path)
    envelope = attest(signed, bundle, keys)
    delivered = tmp_path / "delivered"
    shutil.copytree(signed, delivered)
    if fault == "tampered":  # one file changed after signing
        (delivered / "config.json").write_text(json.dumps({"architecture": "mlp", "threshold": 0.0}))
    else:  # the signature of another model, by the same trusted key
        bundle = sign(make_model_dir(tmp_path / "other", seed=2), keys, tmp_path)
    return delivered, signed, bundle, envelope, model_digest(signed)


def _export_reason(settings: Settings, keys: Keys, tmp_path: Path, delivered: Path, bundle: bytes, envelope: bytes,
                   capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """Register the delivered model, then `secure-ml model export v1` and `Release.verify` (the deploy gate)."""
    release = release_for(settings, keys)
    published = publish(settings, delivered, keys, tmp_path, bundle=bundle, envelope=envelope)
    version, staging, _ = release.register(published.digest, published.evidence, actor="bob")
    assert not staging.allowed
    capsys.readouterr()
    assert cli(["model", "export", version.version, str(tmp_path / "export")]) == 1
    assert not (tmp_path / "export").exists()
    err = capsys.readouterr().err.strip()
    assert err.startswith("secure-ml: ") and "\n" not in err
    with pytest.raises(VerificationError) as gate:
        release.verify(version, actor="dave")
    return err.removeprefix("secure-ml: "), gate.value.explain()


def _check_reasons(settings: Settings, tmp_path: Path, delivered: Path, bundle: bytes,
                   envelope: bytes) -> tuple[str, str]:
    """Materialise the delivered model, bundle and attestation, then run the real blocking checks."""
    (tmp_path / "bundle.sig").write_bytes(bundle)
    (tmp_path / "envelope.json").write_bytes(envelope)
    stage = [stored_model, stored_signature, stored_attestation, security.model_signature_verifies,
             security.attestation_verifies]
    with dg.DagsterInstance.get() as instance:
        # The blocking signature check would stop the attestation: materialise first, then run the checks.
        dg.materialize(stage[:3], instance=instance, resources=resources.build_resources(settings), run_config={
            "ops": {"trained_model": {"config": {"path": str(delivered)}},
                    "model_signature": {"config": {"path": str(tmp_path / "bundle.sig")}},
                    "attestation": {"config": {"path": str(tmp_path / "envelope.json")}}}})
        result = dg.materialize(stage, instance=instance, resources=resources.build_resources(settings),
                                raise_on_error=False, selection=dg.AssetSelection.checks(*stage[3:]))
    outcome = {e.check_name: (e.passed, str(e.metadata["reason"].value)) for e in result.get_asset_check_evaluations()}
    assert not outcome["model_signature_verifies"][0] and not outcome["attestation_verifies"][0], outcome
    return outcome["model_signature_verifies"][1], outcome["attestation_verifies"][1]


def _server_reason(tmp_path: Path, keys: Keys, delivered: Path, bundle: bytes, envelope: bytes, digest: str) -> str:
    """A deployed directory as the deploy targets write it, holding the delivered model; the server's loader."""
    location = tmp_path / "deployed"
    shutil.copytree(delivered, location / "model")
    (location / "model.sig").write_bytes(bundle)
    (location / "attestation.dsse.json").write_bytes(envelope)
    (location / "DEPLOYMENT.json").write_text(json.dumps({
        "version": "v1", "model_digest": digest, "signature_file": "model.sig",
        "attestation_file": "attestation.dsse.json"}))
    with pytest.raises(VerificationError) as refused:
        serving.load_deployment(location, trust=verification.TrustPolicy.of(public_keys=[keys.public]))
    return refused.value.explain()


@pytest.mark.parametrize(("fault", "expected"), [
    ("tampered", "verification failed: the model does not match its signature: config.json changed after signing"),
    ("swapped", "verification failed: the model does not match its signature: "),
])
def test_every_caller_refuses_with_the_same_reason(settings: Settings, tmp_path: Path, fault: str, expected: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # The home's own key is the trusted signer (security.yaml: keys/model-signing.pub).
    keys = make_keys(settings.home / "keys", "model-signing")
    delivered, _, bundle, envelope, signed_digest = _fault(tmp_path, keys, fault)
    export, gate = _export_reason(settings, keys, tmp_path, delivered, bundle, envelope, capsys)
    signature_check, attestation_check = _check_reasons(settings, tmp_path, delivered, bundle, envelope)
    server = _server_reason(tmp_path, keys, delivered, bundle, envelope, signed_digest)
    reasons = {"export": export, "deploy gate": gate, "model_signature check": signature_check,
               "attestation check": attestation_check, "server": server}
    assert len(set(reasons.values())) == 1, reasons
    assert export.startswith(expected) and "\n" not in export, export


def test_the_chain_names_each_step(tmp_path: Path) -> None:
    """Each link on its own: the pin, the attestation and its subjects, a malformed pin, no trust."""
    keys = make_keys(tmp_path / "keys")
    trust = verification.TrustPolicy.of(public_keys=[keys.public])
    model = make_model_dir(tmp_path / "m", seed=3)
    bundle = sign(model, keys, tmp_path)
    envelope = attest(model, bundle, keys)
    verified = verification.verify_model(model, bundle, envelope, trust=trust, expected_digest=model_digest(model))
    assert verified.model_digest == model_digest(model) and verified.attestation["subjects"] == "6"
    assert verified.signer.startswith("key signer.pub")
    with pytest.raises(VerificationError, match="not the pinned sha256:0000000000000000"):
        verification.verify_model(model, bundle, None, trust=trust, expected_digest="0" * 64)
    with pytest.raises(verification.AttestationError, match="subjects do not match"):
        verification.verify_model(model, bundle, attest(model, bundle, keys, files={"model.safetensors": "0" * 64}),
                                  trust=trust)
    stranger = make_keys(tmp_path / "stranger", "stranger")
    with pytest.raises(verification.AttestationError, match="not signed by a trusted key"):
        verification.verify_model(model, bundle, attest(model, bundle, stranger), trust=trust)
    with pytest.raises(Error, match="64 lowercase hex"):
        verification.verify_model(model, bundle, None, trust=trust, expected_digest="sha256:abc")
    with pytest.raises(Error, match="no trusted signing keys"):
        verification.verify_model(model, bundle, None, trust=verification.TrustPolicy.of())
