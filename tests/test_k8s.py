"""Kubernetes: the model server's rendered manifests, the admission policy, and the k8s/ directory.

Touches: secure_ml/release/k8s_render.py (render + validate), secure_ml/governance/policies/admission.rego through
the real regopy, kubernetes-validate's strict schemas, dagster-k8s's own config schemas and its
step-Job builder (construct_dagster_k8s_job) fed with k8s/job_executor.yaml.
Does not touch: a live cluster or Helm (neither is available here); the chart's rendering of
values.yaml is checked only for the hardening settings it passes on.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from secure_ml.errors import BadInput, ConfigurationError, PolicyDenied, VerificationError
from secure_ml.governance.policy import POLICY_DIR, PolicyEngine
from secure_ml.release import k8s_render

pytestmark = pytest.mark.slow  # validates manifests with kubernetes-validate and the Rego admission policy

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
RELEASE = yaml.safe_load((POLICY_DIR.parents[1] / "config" / "release.yaml").read_text())
DIGEST = "ab" * 32
OTHER = "cd" * 32


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    return k8s_render.render(RELEASE["kubernetes"], version="v7", model_digest=DIGEST)


@pytest.fixture(scope="module")
def admission() -> PolicyEngine:
    return PolicyEngine({"admission": {**RELEASE["admission"], "signed_model_digests": [f"sha256:{DIGEST}"]}})


def by_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return copy.deepcopy(next(m for m in manifests if m["kind"] == kind))


def test_rendered_manifests_are_valid_and_admitted(manifests: list[dict[str, Any]]) -> None:
    assert [m["kind"] for m in manifests] == ["Deployment", "Service", "NetworkPolicy", "NetworkPolicy",
                                              "PodDisruptionBudget"]
    k8s_render.validate(manifests, signed_digests=[DIGEST], kubernetes_version="1.33")
    text = k8s_render.to_yaml(manifests)
    assert list(yaml.safe_load_all(text)) == manifests


def test_the_deployment_is_hardened_and_pinned(manifests: list[dict[str, Any]]) -> None:
    deployment = by_kind(manifests, "Deployment")
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    assert pod["metadata"]["annotations"]["secure-ml.dev/model-digest"] == f"sha256:{DIGEST}"
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in spec["containers"] + spec["initContainers"]:
        ctx = container["securityContext"]
        assert ctx["runAsNonRoot"] and ctx["readOnlyRootFilesystem"] and not ctx["allowPrivilegeEscalation"]
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert container["resources"]["limits"]["memory"] and "@sha256:" in container["image"]
    init = spec["initContainers"][0]
    assert init["args"][0] == "verify-model" and init["args"][init["args"].index("--digest") + 1] == f"sha256:{DIGEST}"
    models = next(v for v in spec["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"]["readOnly"] is True
    deny_all = next(m for m in manifests if m["metadata"]["name"] == "default-deny-all")
    assert deny_all["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    allow = next(m for m in manifests if m["metadata"]["name"].endswith("allow-clients"))
    assert allow["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert by_kind(manifests, "Service")["spec"]["type"] == "ClusterIP"
    assert by_kind(manifests, "PodDisruptionBudget")["spec"]["minAvailable"] == 1


def _pod(d: dict[str, Any]) -> dict[str, Any]:
    return d["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _server(d: dict[str, Any]) -> dict[str, Any]:
    return _pod(d)["containers"][0]  # type: ignore[no-any-return]


def _set(path: Callable[[dict[str, Any]], dict[str, Any]], key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(d: dict[str, Any]) -> None:
        path(d)[key] = value
    return apply


VIOLATIONS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("root allowed", lambda d: (_server(d)["securityContext"].update(runAsNonRoot=False),
                                _pod(d)["securityContext"].update(runAsNonRoot=False)), "may run as root"),
    ("uid 0", lambda d: _server(d)["securityContext"].update(runAsUser=0), "runs as UID 0"),
    ("writable root fs", lambda d: _server(d)["securityContext"].update(readOnlyRootFilesystem=False),
     "writable root filesystem"),
    ("privilege escalation", lambda d: _server(d)["securityContext"].update(allowPrivilegeEscalation=True),
     "allows privilege escalation"),
    ("privileged", lambda d: _server(d)["securityContext"].update(privileged=True), "is privileged"),
    ("caps not dropped", lambda d: _server(d)["securityContext"].update(capabilities={"drop": ["NET_RAW"]}),
     "does not drop ALL capabilities"),
    ("caps added", lambda d: _server(d)["securityContext"].update(capabilities={"drop": ["ALL"], "add": ["NET_ADMIN"]}),
     "adds capabilities"),
    ("seccomp unconfined", lambda d: _server(d)["securityContext"].update(seccompProfile={"type": "Unconfined"}),
     "RuntimeDefault seccomp"),
    ("no memory limit", lambda d: _server(d)["resources"].update(limits={"cpu": "1"}), "has no memory limit"),
    ("image by tag", lambda d: _server(d).update(image="ghcr.io/secure-ml/secure-ml:latest"), "not pinned by digest"),
    ("host network", lambda d: _pod(d).update(hostNetwork=True), "uses hostNetwork"),
    ("host path", lambda d: _pod(d)["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
     "mounts a host path"),
    ("token mounted", lambda d: _pod(d).update(automountServiceAccountToken=True), "service account token"),
    ("unsigned model", lambda d: (d["spec"]["template"]["metadata"]["annotations"].update(
        {"secure-ml.dev/model-digest": f"sha256:{OTHER}"})), "is not a signed, verified model"),
    ("no digest pinned", lambda d: d["spec"]["template"]["metadata"].pop("annotations"), "no model digest pinned"),
    ("no verify init container", lambda d: _pod(d).pop("initContainers"), "no init container runs"),
    ("init checks another digest", lambda d: _pod(d)["initContainers"][0]["args"].__setitem__(-1, f"sha256:{OTHER}"),
     "no init container runs"),
]


@pytest.mark.parametrize(("name", "mutate", "reason"), VIOLATIONS, ids=[v[0] for v in VIOLATIONS])
def test_each_admission_rule_refuses_a_violating_deployment(manifests: list[dict[str, Any]], admission: PolicyEngine,
                                                            name: str, mutate: Callable[[dict[str, Any]], None],
                                                            reason: str) -> None:
    deployment = by_kind(manifests, "Deployment")
    assert admission.decide("admission", deployment).allowed
    mutate(deployment)
    decision = admission.decide("admission", deployment)
    assert not decision.allowed and any(reason in r for r in decision.reasons), decision.reasons
    # As a Gatekeeper-style AdmissionReview too.
    assert not admission.decide("admission", {"request": {"object": deployment}}).allowed
    with pytest.raises(PolicyDenied, match="admission policy refuses Deployment"):
        k8s_render.validate([deployment], signed_digests=[DIGEST])


def test_a_bare_pod_is_held_to_the_same_rules(manifests: list[dict[str, Any]], admission: PolicyEngine) -> None:
    deployment = by_kind(manifests, "Deployment")
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "p", "namespace": "secure-ml", **deployment["spec"]["template"]["metadata"]},
           "spec": deployment["spec"]["template"]["spec"]}
    assert admission.decide("admission", pod).allowed
    pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    assert not admission.decide("admission", pod).allowed


def test_an_exposed_service_is_refused(manifests: list[dict[str, Any]], admission: PolicyEngine) -> None:
    service = by_kind(manifests, "Service")
    service["spec"]["type"] = "NodePort"
    decision = admission.decide("admission", service)
    assert not decision.allowed and "exposes the model server" in decision.reasons[0]


def test_strict_schema_validation_catches_what_admission_does_not(manifests: list[dict[str, Any]]) -> None:
    deployment = by_kind(manifests, "Deployment")
    _server(deployment)["securityContext"]["runAsNonRot"] = True  # a typo a lax validator would ignore
    with pytest.raises(VerificationError, match="Additional properties are not allowed"):
        k8s_render.validate([deployment], signed_digests=[DIGEST])
    deployment = by_kind(manifests, "Deployment")
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(VerificationError, match="spec.replicas"):
        k8s_render.validate([deployment], signed_digests=[DIGEST])


def test_render_refuses_bad_inputs() -> None:
    with pytest.raises(BadInput, match="not a model digest"):
        k8s_render.render(RELEASE["kubernetes"], version="v1", model_digest="../../etc")
    with pytest.raises(ConfigurationError, match="pinned by digest"):
        k8s_render.render({**RELEASE["kubernetes"], "image": "secure-ml:latest"}, version="v1", model_digest=DIGEST)


def test_one_server_serves_every_deployed_model_each_pinned_by_digest() -> None:
    models = [k8s_render.PinnedModel("german_credit", "v7", DIGEST),
              k8s_render.PinnedModel("breast_cancer", "v2", OTHER)]
    manifests = k8s_render.render(RELEASE["kubernetes"], models=models)
    k8s_render.validate(manifests, signed_digests=[DIGEST, OTHER])
    deployment = by_kind(manifests, "Deployment")
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["annotations"]["secure-ml.dev/model-digest"] == f"sha256:{DIGEST},sha256:{OTHER}"
    checked = {c["args"][c["args"].index("--digest") + 1]: c["args"][1] for c in pod["spec"]["initContainers"]}
    assert checked == {f"sha256:{DIGEST}": f"/models/sha256-{DIGEST}/model",
                       f"sha256:{OTHER}": f"/models/sha256-{OTHER}/model"}
    args = _server(deployment)["args"]
    assert [args[i + 1:i + 4] for i, a in enumerate(args) if a == "--model"] == [
        ["german_credit", f"/models/sha256-{DIGEST}", f"sha256:{DIGEST}"],
        ["breast_cancer", f"/models/sha256-{OTHER}", f"sha256:{OTHER}"]]
    assert _server(deployment)["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # One digest that did not verify, or one model without its own init container, refuses the pod.
    with pytest.raises(PolicyDenied, match=f"model sha256:{OTHER} is not a signed"):
        k8s_render.validate(manifests, signed_digests=[DIGEST])
    _pod(deployment)["initContainers"].pop()
    missing = f"no init container runs `secure-ml verify-model --digest sha256:{OTHER}`"
    with pytest.raises(PolicyDenied, match=missing):
        k8s_render.validate([deployment], signed_digests=[DIGEST, OTHER])
    with pytest.raises(BadInput, match="served once"):
        k8s_render.render(RELEASE["kubernetes"], models=[models[0], models[0]])
    with pytest.raises(BadInput, match="lowercase"):
        k8s_render.render(RELEASE["kubernetes"], models=[k8s_render.PinnedModel("../x", "v1", DIGEST)])


# -- the k8s/ directory: running the Dagster code location with dagster-k8s --------------------------
def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", sorted((K8S / "manifests").glob("*.yaml")), ids=lambda p: p.name)
def test_k8s_manifests_are_strictly_valid(path: Path, admission: PolicyEngine) -> None:
    docs = _yaml_docs(path)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, "1.33", strict=True)
        assert admission.decide("admission", doc).allowed


def test_namespaces_enforce_the_restricted_pod_security_standard() -> None:
    for ns in _yaml_docs(K8S / "manifests" / "namespaces.yaml"):
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_pipeline_namespace_is_default_deny() -> None:
    from secure_ml.release.platform import objects

    policies = objects.network_policies(objects.RenderConfig.load(K8S))
    deny = next(p for p in policies if p["metadata"]["name"] == "default-deny-all")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


def test_launcher_and_executor_config_match_dagster_k8s_schemas() -> None:
    from dagster._config import process_config
    from dagster._config.field import resolve_to_config_type
    from dagster_k8s.executor import _K8S_EXECUTOR_CONFIG_SCHEMA
    from dagster_k8s.job import DagsterK8sJobConfig

    # The launcher's config comes from the Helm values (the chart writes the instance ConfigMap):
    # tests/test_k8s_render_all.py checks it against the launcher schema; there is no no-Helm path.
    assert not (K8S / "dagster.yaml").exists()
    assert DagsterK8sJobConfig.config_type_run_launcher()
    executor_config = yaml.safe_load((K8S / "job_executor.yaml").read_text())["execution"]["config"]
    executor = process_config(resolve_to_config_type(_K8S_EXECUTOR_CONFIG_SCHEMA), executor_config)
    assert executor.success, executor.errors
    broken = {**executor_config, "step_k8s_config": {"container_confg": {}}}
    assert not process_config(resolve_to_config_type(_K8S_EXECUTOR_CONFIG_SCHEMA), broken).success


def test_a_step_job_built_by_dagster_k8s_is_valid_and_hardened(admission: PolicyEngine) -> None:
    import kubernetes
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job

    config = yaml.safe_load((K8S / "job_executor.yaml").read_text())["execution"]["config"]
    job_config = DagsterK8sJobConfig(job_image=f"ghcr.io/secure-ml/secure-ml@sha256:{DIGEST}",
                                     dagster_home="/opt/dagster/dagster_home", image_pull_policy="IfNotPresent",
                                     env_secrets=config.get("env_secrets", []))
    for step in ("validated_dataset", "trained_model"):
        # Merged the way k8s_job_executor merges them (executor config, then the per-step override).
        context = K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(config["step_k8s_config"]))
        context = context.merge(K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(
            config["per_step_k8s_config"].get(step, {}))))
        user = context.run_k8s_config
        job = construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_step"], f"dagster-step-{step}",
                                        user, pod_name=f"dagster-step-{step}", component="step_worker")
        manifest = kubernetes.client.ApiClient().sanitize_for_serialization(job)
        manifest["metadata"]["namespace"] = "secure-ml-pipeline"
        kubernetes_validate.validate(manifest, "1.33", strict=True)
        decision = admission.decide("admission", manifest)
        assert decision.allowed, decision.reasons
        # The same Job with the hardening stripped is refused: the policy really looks at step pods.
        manifest["spec"]["template"]["spec"]["containers"][0]["securityContext"] = {}
        assert not admission.decide("admission", manifest).allowed
    # Steps mount no token; the code location's context (volumes, /tmp) is merged in by
    # tests/test_k8s_render_all.py, which builds every step as the step handler does.
    assert config["step_k8s_config"]["pod_spec_config"]["automount_service_account_token"] is False


def test_helm_values_harden_every_pod() -> None:
    values = yaml.safe_load((K8S / "values.yaml").read_text())
    assert values["telemetry"]["enabled"] is False
    code = values["dagster-user-deployments"]["deployments"][0]
    assert code["dagsterApiGrpcArgs"][:2] == ["--module-name", "secure_ml.definitions"]
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    contexts = [code["securityContext"], values["dagsterWebserver"]["securityContext"],
                values["dagsterDaemon"]["securityContext"], launcher["containerConfig"]["securityContext"]]
    for ctx in contexts:
        assert ctx["runAsNonRoot"] and ctx["readOnlyRootFilesystem"] and ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"]["drop"] == ["ALL"]
    for pod in (code["podSecurityContext"], values["dagsterWebserver"]["podSecurityContext"],
                values["dagsterDaemon"]["podSecurityContext"], launcher["podSpecConfig"]["securityContext"]):
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"} and pod["runAsNonRoot"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert all("limits" in r for r in (code["resources"], launcher["containerConfig"]["resources"]))

    def secrets_in(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [k for k, v in node.items() if "password" in str(k).lower() and isinstance(v, str) and v]
            return found + [f for v in node.values() for f in secrets_in(v)]
        return [f for v in node for f in secrets_in(v)] if isinstance(node, list) else []

    assert secrets_in(values) == []  # credentials come from Secrets, never from the values file
