"""Which step's pod can reach which secret and which account, in what `secure-ml k8s render` writes
(one step Job per asset, and per asset check whose pod differs).

Touches: the real renderer over the real k8s/ files, dagster-k8s's own Job construction and
container-context merge, including each op's ``dagster-k8s/config`` tags as the step handler merges
them (taken from the code location's definitions), and the real training-pod Job (resources/training_pod.py).
Does not touch: a cluster.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from resources.security import SIGNING_KEY_ENV, SIGNING_KEY_SECRET, SIGNING_STEPS, signing_op_tags
from resources.training_pod import launcher_op_tags
from secure_ml.cli import _k8s_jobs, cmd_k8s
from secure_ml.release.platform import checks, objects
from secure_ml.training.handover import LAUNCHER_ACCOUNT, LAUNCHER_STEPS

pytestmark = pytest.mark.slow  # renders every Kubernetes object with dagster-k8s

K8S = Path(__file__).resolve().parents[1] / "k8s"


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return cmd_k8s.render_all(K8S, "sha256:" + "ab" * 32, "cd" * 32)[1]


@pytest.fixture(scope="module")
def step_pods(rendered: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["spec"]["template"]["metadata"]["labels"]["dagster/op"]: o["spec"]["template"]["spec"]
            for o in rendered if o["kind"] == "Job" and "dagster/op" in o["spec"]["template"]["metadata"]["labels"]}


def step_jobs(rendered: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["spec"]["template"]["metadata"]["labels"].get("dagster/op", "run"): o
            for o in rendered if o["kind"] == "Job"}


def problems(objs: list[dict[str, Any]]) -> list[str]:
    cfg = objects.RenderConfig.load(K8S)
    return checks.check_objects(objs, kubernetes_version="1.33", signed_model_digests=[],
                                api_server_endpoints=cfg.api_server_endpoints, pipeline_namespace=cfg.namespace)


def secrets_of(spec: dict[str, Any]) -> dict[str, str]:
    """Secret name -> how the pod gets it (env, volume)."""
    out: dict[str, str] = {}
    for container in spec["containers"]:
        for src in container.get("envFrom") or []:
            if "secretRef" in src:
                out[src["secretRef"]["name"]] = "env"
        for env in container.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                out[ref["name"]] = "env"
    for volume in spec.get("volumes") or []:
        if "secret" in volume:
            out[volume["secret"]["secretName"]] = "volume"
    return out


def test_only_the_signing_steps_mount_the_signing_key(step_pods: dict[str, dict[str, Any]]) -> None:
    cfg = objects.RenderConfig.load(K8S)
    assert set(step_pods) == set(cfg.steps) | {"trained_model_reproducible"}
    for step, spec in step_pods.items():
        secrets = secrets_of(spec)
        (container,) = spec["containers"]
        env = {e["name"] for e in container.get("env") or []}
        if step in SIGNING_STEPS:
            assert secrets[SIGNING_KEY_SECRET] == "volume", step  # a file, never an environment variable
            mount = next(m for m in container["volumeMounts"] if m["name"] == "signing-key")
            assert mount["readOnly"] is True and SIGNING_KEY_ENV in env
        else:
            assert SIGNING_KEY_SECRET not in secrets and SIGNING_KEY_ENV not in env, step
        # The KEK: every step reads or writes the encrypted store, so every step pod has it, as a file
        # (root:fsGroup 0440 on a read-only mount, what read_kek_file accepts), never an environment variable.
        assert secrets["secure-ml-kek"] == "volume", step
        kek = next(v for v in spec["volumes"] if v["name"] == "kek")["secret"]
        assert kek["defaultMode"] == 0o400 and spec["securityContext"]["fsGroup"] == 10001
        mount = next(m for m in container["volumeMounts"] if m["name"] == "kek")
        assert mount["readOnly"] is True
        assert {e["name"]: e.get("value") for e in container["env"]}["SECURE_ML_KEK_FILE"] == \
            f"{mount['mountPath']}/{kek['items'][0]['path']}"
        assert "SECURE_ML_KEK" not in env, step
    assert {s for s, spec in step_pods.items() if SIGNING_KEY_SECRET in secrets_of(spec)} == set(SIGNING_STEPS)


def test_the_op_tags_come_from_the_assets_and_reach_only_their_step() -> None:
    tags = _k8s_jobs.op_tags()
    assert {op for op, t in tags.items() if "dagster-k8s/config" in t} == set(SIGNING_STEPS) | set(LAUNCHER_STEPS)
    assert all(tags[op] == launcher_op_tags() for op in LAUNCHER_STEPS)
    assert json.loads(tags["model_signature"]["dagster-k8s/config"]) == json.loads(signing_op_tags()["dagster-k8s/config"])
    # The control: the same render with the tag moved onto trained_model mounts the key there instead.
    values, _ = cmd_k8s.render_all(K8S, "sha256:" + "ab" * 32, "cd" * 32)
    import yaml

    executor = yaml.safe_load((K8S / "job_executor.yaml").read_text())["execution"]["config"]
    jobs = _k8s_jobs.run_and_step_jobs(values, executor, image="r@sha256:" + "ab" * 32, namespace="secure-ml-pipeline",
                                       steps=["trained_model", "model_signature"],
                                       tags={"trained_model": signing_op_tags()})
    by_op = {j["spec"]["template"]["metadata"]["labels"].get("dagster/op", "run"): j["spec"]["template"]["spec"]
             for j in jobs}
    assert SIGNING_KEY_SECRET in secrets_of(by_op["trained_model"])
    assert SIGNING_KEY_SECRET not in secrets_of(by_op["model_signature"])


def test_the_training_pod_holds_no_secret_but_its_run_key() -> None:
    from resources.training_pod import run_name, training_pod_objects
    from secure_ml.training.handover import new_run_key
    from secure_ml.training.policy import TrainingPod

    _, job = training_pod_objects(run_id="r", image="r@sha256:" + "ab" * 32, key=new_run_key(), pod=TrainingPod())
    assert secrets_of(job["spec"]["template"]["spec"]) == {run_name("r"): "volume"}


def test_only_the_training_launchers_hold_a_token_and_only_their_role(rendered: list[dict[str, Any]]) -> None:
    """Which step pod runs as which service account, and what each account may do."""
    accounts = {op: (job["spec"]["template"]["spec"]["serviceAccountName"],
                     job["spec"]["template"]["spec"]["automountServiceAccountToken"])
                for op, job in step_jobs(rendered).items()}
    assert accounts.pop("run") == ("dagster", True)  # the run worker creates the step Jobs (the chart's Role)
    assert {op: a for op, a in accounts.items() if a[1]} == {op: (LAUNCHER_ACCOUNT, True) for op in LAUNCHER_STEPS}
    assert {a for op, a in accounts.items() if op not in LAUNCHER_STEPS} == {("dagster-step", False)}
    # The launcher's one Role: in the training namespace, Secrets by name, Jobs; bound to its account alone.
    rbac = [o for o in rendered if o["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")]
    assert [(o["kind"], o["metadata"]["namespace"]) for o in rbac] == [("Role", "secure-ml-training"),
                                                                     ("RoleBinding", "secure-ml-training")]
    role, binding = rbac
    assert {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]} == {
        (("",), ("secrets",)): {"create", "get", "delete"}, (("batch",), ("jobs",)): {"create", "get", "watch", "delete"}}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": LAUNCHER_ACCOUNT, "namespace": "secure-ml-pipeline"}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    # The training namespace: nothing runs there but per-run training pods, and no traffic reaches them.
    (deny,) = [o for o in rendered if o["kind"] == "NetworkPolicy" and o["metadata"]["namespace"] == "secure-ml-training"]
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    assert any(o["kind"] == "Namespace" and o["metadata"]["name"] == "secure-ml-training" for o in rendered)


def test_the_checks_refuse_a_token_elsewhere_and_a_role_that_reads_every_secret(rendered: list[dict[str, Any]]) -> None:
    import copy

    jobs = step_jobs(rendered)
    assert problems([jobs["trained_model"], jobs["scan_report"]]) == []
    # The launcher's tag on another step: its pod would hold the token; refused.
    values, _ = cmd_k8s.render_all(K8S, "sha256:" + "ab" * 32, "cd" * 32)
    import yaml

    executor = yaml.safe_load((K8S / "job_executor.yaml").read_text())["execution"]["config"]
    leaky = _k8s_jobs.step_job(values, _k8s_jobs.processed_executor_config(executor), "scan_report",
                               image="r@sha256:" + "ab" * 32, namespace="secure-ml-pipeline", tags=launcher_op_tags())
    assert leaky["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    assert any("a step pod mounts a service-account token" in p for p in problems([leaky]))
    # The trained_model step with the chart's account instead of the launcher's: refused.
    other = copy.deepcopy(jobs["trained_model"])
    other["spec"]["template"]["spec"]["serviceAccountName"] = "dagster"
    assert any("does not run as secure-ml-training-launcher" in p for p in problems([other]))
    role = next(o for o in rendered if o["kind"] == "Role")
    for rule, says in (({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}, "list or watch Secrets"),
                       ({"apiGroups": [""], "resources": ["secrets"], "verbs": ["watch"]}, "list or watch Secrets"),
                       ({"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["*"]}, "wildcard"),
                       ({"apiGroups": ["*"], "resources": ["pods"], "verbs": ["get"]}, "wildcard")):
        bad = copy.deepcopy(role)
        bad["rules"].append(rule)
        assert any(says in p for p in problems([bad])), rule
    cluster = {**copy.deepcopy(role), "kind": "ClusterRole"}
    del cluster["metadata"]["namespace"]
    assert any("nothing cluster-wide" in p for p in problems([cluster]))
    binding = copy.deepcopy(next(o for o in rendered if o["kind"] == "RoleBinding"))
    binding["roleRef"] = {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"}
    assert any("binds the ClusterRole edit" in p for p in problems([binding]))
