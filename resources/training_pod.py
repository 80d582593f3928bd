"""The training pod on Kubernetes: the per-run Secret and Job, and the thin layer that runs them.

    secret, job = training_pod_objects(run_id="…", image="repo@sha256:…", key=key, pod=policy.kubernetes)
    launch = KubernetesLauncher(policy.kubernetes, image="repo@sha256:…", run_id="…")
    runner = pod_runner(settings.home / pod.exchange / run_name(run_id), launch)   # secure_ml.training.handover

The Job is built by dagster-k8s's own ``construct_dagster_k8s_job`` from k8s/training-pod.yaml
(``training_sandbox_k8s_config``: no token, read-only root, every capability dropped, the
no-traffic NetworkPolicy's label), plus the two things this run gives it: the per-run key Secret,
mounted as a file (never an environment variable), and the artifacts volume mounted at its
``subPath`` for this run only (the pod sees ``split.smle`` and ``out/``, never the store, the keys
or other runs). Nothing else: no KEK, no signing key, no other Secret.

:class:`KubernetesLauncher` is the only part that talks to a cluster (create the Secret and the Job,
wait for the Job, delete both whatever happened), through the kubernetes client. It cannot run
without a cluster; everything it sends is built and checked by :func:`training_pod_objects`.
"""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path
from typing import Any

import yaml

from secure_ml.errors import ConfigurationError
from secure_ml.training.policy import TrainingPod
from secure_ml.training.sandbox import SandboxError

TRAINING_POD_FILE = Path(__file__).resolve().parents[1] / "k8s" / "training-pod.yaml"
KEY_DIR = "/var/run/secrets/secure-ml-run"   # the per-run key Secret, one file: key
EXCHANGE = "/var/lib/secure-ml-run"          # this run's directory of the artifacts volume
RUN_LABEL = "secure-ml.dev/training-run"
KEY_FILE_MODE = 0o440                        # root-owned, group fsGroup 10001: readable by the pod's user only


def run_name(run_id: str) -> str:
    """A Kubernetes name for this run's Secret, Job and directory (63 characters at most)."""
    return "secure-ml-train-" + hashlib.sha256(run_id.encode()).hexdigest()[:16]


def sandbox_config() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(TRAINING_POD_FILE.read_text()) if d]
    return dict(docs[0]["training_sandbox_k8s_config"])


def pod_command(*, no_guard: bool = False) -> list[str]:
    return ["python", "-I", "-m", "secure_ml.training.pod", "--key-file", f"{KEY_DIR}/key", "--run-dir", EXCHANGE,
            *(["--no-guard"] if no_guard else [])]


def training_pod_objects(*, run_id: str, image: str, key: str, pod: TrainingPod) -> tuple[dict[str, Any],
                                                                                           dict[str, Any]]:
    """(the per-run Secret, the Job): what :class:`KubernetesLauncher` creates for one training run."""
    import kubernetes
    from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job

    if "@sha256:" not in image:
        raise ConfigurationError(f"the training pod's image must be pinned by digest, not {image!r}")
    name = run_name(run_id)
    config = sandbox_config()
    spec = dict(config.get("pod_spec_config") or {})
    spec["volumes"] = [*(spec.get("volumes") or []),
                       {"name": "run-key", "secret": {"secretName": name, "defaultMode": KEY_FILE_MODE,
                                                       "items": [{"key": "key", "path": "key"}]}},
                       {"name": "run-exchange", "persistentVolumeClaim": {"claimName": pod.volume_claim}}]
    container = dict(config.get("container_config") or {})
    container["volumeMounts"] = [*(container.get("volumeMounts") or []),
                                 {"name": "run-key", "mountPath": KEY_DIR, "readOnly": True},
                                 {"name": "run-exchange", "mountPath": EXCHANGE,
                                  "subPath": f"{pod.exchange.strip('/')}/{name}"}]
    metadata = dict(config.get("pod_template_spec_metadata") or {})
    metadata["labels"] = {**(metadata.get("labels") or {}), RUN_LABEL: name}
    user = UserDefinedDagsterK8sConfig.from_dict({**config, "pod_spec_config": spec, "container_config": container,
                                                  "pod_template_spec_metadata": metadata,
                                                  "job_spec_config": {"backoffLimit": 0,
                                                                      "ttlSecondsAfterFinished": 600}})
    job_config = DagsterK8sJobConfig(job_image=image, dagster_home="/opt/dagster/dagster_home",
                                     image_pull_policy="IfNotPresent")
    job = construct_dagster_k8s_job(job_config, pod_command(), name, user, pod_name=name,
                                    component="training_sandbox", labels={RUN_LABEL: name})
    manifest: dict[str, Any] = kubernetes.client.ApiClient().sanitize_for_serialization(job)
    manifest["metadata"]["namespace"] = pod.namespace
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "immutable": True,
              "metadata": {"name": name, "namespace": pod.namespace,
                           "labels": {"app.kubernetes.io/part-of": "secure-ml", RUN_LABEL: name}},
              "data": {"key": base64.b64encode(key.encode("ascii")).decode("ascii")}}
    return secret, manifest


class KubernetesLauncher:
    """Create the per-run Secret and Job, wait for the Job, delete both (the cluster calls, kept thin)."""

    def __init__(self, pod: TrainingPod, *, image: str, run_id: str, poll_s: float = 2.0) -> None:
        self.pod, self.image, self.run_id, self.poll_s = pod, image, run_id, poll_s

    def __call__(self, run_dir: Path, key: str) -> None:
        import kubernetes

        secret, job = training_pod_objects(run_id=self.run_id, image=self.image, key=key, pod=self.pod)
        name, namespace = job["metadata"]["name"], self.pod.namespace
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            try:
                kubernetes.config.load_kube_config()
            except (kubernetes.config.ConfigException, OSError) as exc:
                raise SandboxError(f"isolation.backend kubernetes, but no cluster is configured here ({exc})") from None
        core, batch = kubernetes.client.CoreV1Api(), kubernetes.client.BatchV1Api()
        try:
            core.create_namespaced_secret(namespace, secret)
            batch.create_namespaced_job(namespace, job)
            deadline = time.monotonic() + self.pod.wait_s
            while True:
                status = batch.read_namespaced_job_status(name, namespace).status
                if status.succeeded:
                    return
                if status.failed:
                    raise SandboxError(f"the training pod {name} failed (kubectl -n {namespace} logs job/{name})")
                if time.monotonic() > deadline:
                    raise SandboxError(f"the training pod {name} ran past isolation.kubernetes.wait_s "
                                       f"({self.pod.wait_s:g} s)")
                time.sleep(self.poll_s)
        except kubernetes.client.ApiException as exc:
            raise SandboxError(f"the cluster refused the training pod {name} ({exc.status} {exc.reason})") from None
        finally:  # the per-run key never outlives its run
            for delete in (lambda: batch.delete_namespaced_job(name, namespace, propagation_policy="Background"),
                           lambda: core.delete_namespaced_secret(name, namespace)):
                try:
                    delete()
                except kubernetes.client.ApiException:
                    pass
