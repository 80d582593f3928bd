"""The training sandbox pod on Kubernetes (k8s/training-pod.yaml), as far as a machine without a cluster allows.

Touches: kubernetes-validate's strict schemas, the real admission policy through regopy, and
dagster-k8s's own construct_dagster_k8s_job building the pod's Job from the file. Does not touch:
a cluster (NetworkPolicy enforcement, a pod starting, the split and weights crossing over).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from secure_ml.governance.policy import POLICY_DIR, PolicyEngine

pytestmark = pytest.mark.slow  # builds the training pod Job with dagster-k8s and validates it

REPO = Path(__file__).resolve().parents[1]
DOCS = [d for d in yaml.safe_load_all((REPO / "k8s" / "training-pod.yaml").read_text()) if d]
RELEASE = yaml.safe_load((POLICY_DIR.parents[1] / "config" / "release.yaml").read_text())
DIGEST = "cd" * 32


@pytest.fixture(scope="module")
def admission() -> PolicyEngine:
    return PolicyEngine({"admission": {**RELEASE["admission"], "signed_model_digests": [f"sha256:{DIGEST}"]}})


def _job(env_secrets: list[str]) -> dict[str, Any]:
    import kubernetes
    from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job

    job_config = DagsterK8sJobConfig(job_image=f"ghcr.io/secure-ml/secure-ml@sha256:{DIGEST}",
                                     dagster_home="/opt/dagster/dagster_home", image_pull_policy="IfNotPresent",
                                     env_secrets=env_secrets)
    user = UserDefinedDagsterK8sConfig.from_dict(DOCS[0]["training_sandbox_k8s_config"])
    job = construct_dagster_k8s_job(job_config, ["python", "-I", "-m", "secure_ml.training.child"],
                                    "secure-ml-training-sandbox-run1", user, pod_name="secure-ml-training-sandbox-run1",
                                    component="training_sandbox")
    manifest: dict[str, Any] = kubernetes.client.ApiClient().sanitize_for_serialization(job)
    manifest["metadata"]["namespace"] = "secure-ml-training"
    return manifest


def test_the_training_pod_job_is_valid_admitted_and_holds_no_secret(admission: PolicyEngine) -> None:
    manifest = _job([])
    kubernetes_validate.validate(manifest, "1.33", strict=True)
    decision = admission.decide("admission", manifest)
    assert decision.allowed, decision.reasons
    pod = manifest["spec"]["template"]
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False and spec["serviceAccountName"] == "secure-ml-training-sandbox"
    (container,) = spec["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # No KEK, no signing key, no Secret of any kind: not as env, not as envFrom, not as a volume.
    assert not container.get("envFrom")
    assert not any("valueFrom" in e for e in container.get("env") or [])
    assert not any("secret" in v or "projected" in v for v in spec.get("volumes") or [])
    # The control: the same construction given the pipeline's secrets would carry them (so the test can fail).
    leaky = _job(["secure-ml-kek"])["spec"]["template"]["spec"]["containers"][0]
    assert any(e.get("secretRef", {}).get("name") == "secure-ml-kek" for e in leaky.get("envFrom") or [])
    # The NetworkPolicy selects every pod of the training namespace and allows no traffic at all.
    policy = next(d for d in DOCS if d.get("kind") == "NetworkPolicy")
    assert policy["metadata"]["namespace"] == manifest["metadata"]["namespace"]
    assert policy["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


def test_the_other_documents_are_strictly_valid_and_admitted(admission: PolicyEngine) -> None:
    for doc in DOCS[1:]:
        kubernetes_validate.validate(doc, "1.33", strict=True)
        assert admission.decide("admission", doc).allowed
    accounts = {d["metadata"]["name"]: d for d in DOCS if d.get("kind") == "ServiceAccount"}
    assert all(a["automountServiceAccountToken"] is False for a in accounts.values())  # pods opt in, or not
    assert accounts["secure-ml-training-sandbox"]["metadata"]["namespace"] == "secure-ml-training"
    # Everything here passes the render checks too (RBAC rules included).
    from secure_ml.release.platform.checks import check_objects

    assert check_objects([*DOCS[1:], _job([])], kubernetes_version="1.33", signed_model_digests=[],
                         api_server_endpoints=[], pipeline_namespace="secure-ml-pipeline") == []
    manifest = _job([])
    manifest["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    assert not admission.decide("admission", manifest).allowed  # the policy really looks at this pod
