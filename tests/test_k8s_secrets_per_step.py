"""Which step's pod can reach which secret, in what `secure-ml k8s render` writes (one step Job per asset).

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
from secure_ml.cli import _k8s_jobs, cmd_k8s
from secure_ml.release.platform import objects

pytestmark = pytest.mark.slow  # renders every Kubernetes object with dagster-k8s

K8S = Path(__file__).resolve().parents[1] / "k8s"


@pytest.fixture(scope="module")
def step_pods() -> dict[str, dict[str, Any]]:
    _, objs = cmd_k8s.render_all(K8S, "sha256:" + "ab" * 32, "cd" * 32)
    return {o["spec"]["template"]["metadata"]["labels"]["dagster/op"]: o["spec"]["template"]["spec"]
            for o in objs if o["kind"] == "Job" and "dagster/op" in o["spec"]["template"]["metadata"]["labels"]}


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
    assert set(step_pods) == set(cfg.steps)
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
        # The KEK: every step reads or writes the encrypted store, so every step pod has it (env: see k8s/README.md).
        assert secrets["secure-ml-kek"] == "env", step
    assert {s for s, spec in step_pods.items() if SIGNING_KEY_SECRET in secrets_of(spec)} == set(SIGNING_STEPS)


def test_the_op_tags_come_from_the_assets_and_reach_only_their_step() -> None:
    tags = _k8s_jobs.op_tags()
    assert {op for op, t in tags.items() if "dagster-k8s/config" in t} == set(SIGNING_STEPS)
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
