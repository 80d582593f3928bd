"""The training pod on Kubernetes: the per-run Secret and Job, and the thin layer that runs them.

    runner = pod_runner_for(context, policy, settings.home)               # None: isolation.backend local
    runner = pod_runner_for(context, policy, settings.home, replay=True)  # the reproducible check's replay
    @dg.asset(op_tags=launcher_op_tags())                                 # a step that starts training pods
    secret, job = training_pod_objects(run_id="…", image="repo@sha256:…", key=key, pod=policy.kubernetes)

:func:`pod_runner_for` is the one way an op gets a training pod: with ``isolation.backend:
kubernetes`` a runner with run_isolated's keywords (secure_ml.training.handover.pod_runner) that
hands this run's split over under a per-run key and starts a Job through :class:`KubernetesLauncher`;
``replay=True`` gives the ``reproducible`` check's replay of chain segments its own Job and per-run
key, started by the check, never by the trainer.

The Job is built by dagster-k8s's own ``construct_dagster_k8s_job`` from k8s/training-pod.yaml
(``training_sandbox_k8s_config``: no token, read-only root, every capability dropped), plus the
two things this run gives it: the per-run key Secret, mounted as a file (never an environment
variable), and the exchange volume (``isolation.kubernetes.volume_claim``: the artifacts volume's
``training-runs/`` directory, nothing else of it) mounted at its ``subPath`` for this run only (the
pod sees ``split.smle`` and ``out/``, never the store, the keys or other runs). Nothing else: no
KEK, no signing key, no other Secret. Both live in the training namespace
(``isolation.kubernetes.namespace``, ``secure-ml-training``), which holds nothing else and denies
every pod there all traffic.

:class:`KubernetesLauncher` is the only part that talks to a cluster (create the Secret and the Job,
read both back, watch the Job, delete both whatever happened), through the kubernetes client, with
the token of the ``secure-ml-training-launcher`` account: the op tag of :func:`launcher_op_tags`
gives it to the step's pod alone, and its Role in the training namespace allows exactly those calls
(k8s/training-pod.yaml). It cannot run without a cluster; everything it sends is built and checked
by :func:`training_pod_objects`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from secure_ml.errors import ConfigurationError
from secure_ml.training.handover import LAUNCHER_ACCOUNT, pod_runner
from secure_ml.training.policy import IsolationPolicy, TrainingPod
from secure_ml.training.sandbox import SandboxError

TRAINING_POD_FILE = Path(__file__).resolve().parents[1] / "k8s" / "training-pod.yaml"
KEY_DIR = "/var/run/secrets/secure-ml-run"   # the per-run key Secret, one file: key
EXCHANGE = "/var/lib/secure-ml-run"          # this run's directory of the exchange volume
RUN_LABEL = "secure-ml.dev/training-run"
KEY_FILE_MODE = 0o440                        # root-owned, group fsGroup 10001: readable by the pod's user only


def launcher_step_k8s_config() -> dict[str, Any]:
    """The ``dagster-k8s/config`` op tag of a step that starts training pods: the launcher's account,
    its token mounted (step pods otherwise have none) and API egress (``events-api``)."""
    return {"pod_template_spec_metadata": {"labels": {"secure-ml.dev/egress": "events-api"}},
            "pod_spec_config": {"service_account_name": LAUNCHER_ACCOUNT, "automount_service_account_token": True}}


def launcher_op_tags() -> dict[str, str]:
    """The tag of the ops in LAUNCHER_STEPS (secure_ml.training.handover), which the render checks hold to."""
    return {"dagster-k8s/config": json.dumps(launcher_step_k8s_config(), sort_keys=True)}


def pod_runner_for(context: Any, isolation: IsolationPolicy, home: Path, *,
                   replay: bool = False) -> Callable[..., dict[str, Any]] | None:
    """None (the local sandbox), or with isolation.backend kubernetes the training pod's runner: this
    run's job under a per-run key in a per-run directory of the exchange volume, run by a Job of its
    own (``replay``: the reproducible check's, named apart from the training's)."""
    if isolation.backend != "kubernetes":
        return None
    origin = context.run.job_code_origin
    image = (origin.repository_origin.container_image if origin else None) or os.environ.get("SECURE_ML_TRAINING_IMAGE")
    if not image:
        raise ConfigurationError("isolation.backend kubernetes needs the code location's image (pinned by digest) "
                                 "or SECURE_ML_TRAINING_IMAGE")
    run_id = f"{context.run.run_id}/replay" if replay else context.run.run_id
    run_dir = home / isolation.kubernetes.exchange / run_name(run_id)
    return pod_runner(run_dir, KubernetesLauncher(isolation.kubernetes, image=image, run_id=run_id))


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


def read_back_problems(secret: Any, job: Any, name: str) -> list[str]:
    """What the API server stored differs from what was sent where it matters (a mutating webhook, or
    someone else's object of this name): the Secret is this run's, the pod still mounts no other Secret
    and no token."""
    problems = []
    labels = (getattr(secret.metadata, "labels", None) or {})
    if labels.get(RUN_LABEL) != name or not secret.immutable:
        problems.append(f"the Secret {name} read back is not this run's immutable key")
    spec = job.spec.template.spec
    secrets = [v.secret.secret_name for v in spec.volumes or [] if v.secret is not None]
    if spec.automount_service_account_token is not False or secrets != [name] or any(
            c.env_from for c in spec.containers):
        problems.append(f"the Job {name} read back mounts a token or a Secret other than its run's key")
    return problems


class KubernetesLauncher:
    """Create the per-run Secret and Job, read both back, watch the Job, delete both (the cluster
    calls, kept thin)."""

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
            problems = read_back_problems(core.read_namespaced_secret(name, namespace),
                                          batch.read_namespaced_job(name, namespace), name)
            if problems:
                raise SandboxError(problems[0])
            deadline = time.monotonic() + self.pod.wait_s
            while True:  # a watch on this Job alone (the Role allows watch on jobs, never on Secrets)
                for event in kubernetes.watch.Watch().stream(
                        batch.list_namespaced_job, namespace, field_selector=f"metadata.name={name}",
                        timeout_seconds=max(1, int(min(60.0, deadline - time.monotonic())))):
                    status = getattr(event["object"], "status", None)  # an ERROR event carries a Status
                    if status is not None and status.succeeded:
                        return
                    if status is not None and status.failed:
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
