"""Least privilege, locally: neither the training child nor the scan step's scanners can reach the KEK or a key.

Touches: a fresh SECURE_ML_HOME with its real keyring and a real signing key (model-signing), a KEK
handed over in SECURE_ML_KEK as CI does, and the two sandboxed processes exactly as the pipeline starts
them (secure_ml.training.sandbox): the training child (its own probe entry point, the same start) and
the scan step's model-file scanners (resources/scan_sandbox.py, the entry point the scan_report asset
runs). Each reports from inside: its environment names, and whether it could read or list the keyring,
the signing key, the keys directory and its parent's /proc/<pid>/environ. Does not touch: Kubernetes
(tests/test_training_pod.py, tests/test_k8s_render_all.py), Dagster (the asset calls the same class).
"""

from __future__ import annotations

import base64
import os
import pickle
from pathlib import Path

import pytest

from resources.scan_sandbox import sandboxed_model_scan
from secure_ml.custody import keys
from secure_ml.security import scanning
from secure_ml.security.signing import ensure_signing_key
from secure_ml.settings import Settings
from secure_ml.training import sandbox
from secure_ml.training.sandbox import IsolationPolicy, SandboxError, probe_isolation
from tests.test_scanning import write_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]  # starts real sandboxes
needs_namespaces = pytest.mark.skipif(sandbox.namespace_prefix() is None, reason="this host cannot create namespaces")


@pytest.fixture
def secrets(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The KEK handed over in the environment, the keyring and the signing key on disk: what the step holds."""
    monkeypatch.setattr(keys, "_handed_over", {})  # the sandbox takes the KEK out of the environment: forget it after
    monkeypatch.setenv("SECURE_ML_KEK", base64.b64encode(os.urandom(32)).decode())
    ensure_signing_key(settings.keys_dir / "model-signing.pem")
    assert settings.keyring_path.exists()
    return [str(settings.keyring_path), str(settings.keys_dir / "model-signing.pem"), str(settings.keys_dir),
            f"/proc/{os.getpid()}/environ"]


@needs_namespaces
def test_the_scanners_run_sandboxed_and_cannot_reach_the_kek_or_a_key(settings: Settings, secrets: list[str],
                                                                      tmp_path: Path) -> None:
    model = write_model(tmp_path / "m")
    (model / "MODEL_CARD.md").write_bytes(pickle.dumps({"a": 1}, protocol=4))  # a hostile file to scan
    scan = sandboxed_model_scan(IsolationPolicy(), must_not_reach=secrets)
    report, _ = scanning.release_scan(model, {}, code=False, model_scan=scan)
    # The same verdict as the scanners in this process would give, from the sandbox.
    assert [f.to_dict() for f in scan(model, allowed_types=(".safetensors", ".json", ".md"),
                                      limits=scanning.SafetensorsLimits())] == \
        [f.to_dict() for f in scanning.scan_model_dir(model)]
    assert report["blocking"] and any(f["rule"] == "pickle-in-model-dir" for f in report["findings"])
    # From inside the scanners' process: no KEK in its environment, nothing of the keys within reach.
    assert "SECURE_ML_KEK" not in scan.seen["env"] and not any(sandbox.SECRET_ENV.search(n) for n in scan.seen["env"])
    assert set(scan.seen["reach"]) == set(secrets)
    for path, outcome in scan.seen["reach"].items():
        assert outcome.startswith("blocked") or outcome == "empty", (path, outcome)
    assert scan.isolation["level_met"] and scan.isolation["namespaces"]["net"]
    if os.getuid() == 0:
        assert scan.seen["uid"] == sandbox.NOBODY
    # The control: with the socket guard alone nothing is hidden, the scanners read the keyring, and the
    # verdict is refused (fail closed), so the assertions above can fail.
    with pytest.raises(SandboxError, match="could reach"):
        sandboxed_model_scan(IsolationPolicy(network_namespace="off"), must_not_reach=secrets)(
            model, allowed_types=(".md",), limits=scanning.SafetensorsLimits())


@needs_namespaces
def test_the_training_child_cannot_reach_the_kek_or_a_key(settings: Settings, secrets: list[str]) -> None:
    report = probe_isolation(IsolationPolicy(), read=secrets[:2] + [secrets[3]])
    assert "SECURE_ML_KEK" not in report["env"]
    for path, outcome in report["probe"]["read"].items():
        assert outcome.startswith("blocked"), (path, outcome)
    assert "SECURE_ML_KEK" not in os.environ  # taken out of the step's own environment before any child started
