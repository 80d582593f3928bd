"""Every rendered Kubernetes object checked the way a platform engineer would before installing it.

    problems = check_objects(objects, kubernetes_version="1.33", signed_model_digests=["sha256:…"],
                             api_server_endpoints=[("172.18.0.2/32", 6443)])
    if problems: raise VerificationError(problems[0])

Each object: kubernetes-validate in strict mode (unknown fields refused), then the project's admission
policy (secure_ml/governance/policies/admission.rego, the rules Gatekeeper would enforce). Each pod:
no two volumes or mounts of one name, every mount names a volume, every container with a read-only
root filesystem has a writable /tmp, an image pinned by digest. Pipeline pods carry a known
``secure-ml.dev/egress`` class; step pods mount no service-account token and never get API egress,
except the steps that start training pods (secure_ml.training.handover.LAUNCHER_STEPS), and those
only with the launcher's account. Pods in the training namespace mount no token and no Secret but
their run's key. RBAC: nothing cluster-wide (no ClusterRole, no binding to one), no wildcard verb,
resource or API group, and no Role that may list or watch Secrets (reading them all by enumeration).
NetworkPolicies reach the API server only through its configured endpoints, never a Service IP.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from secure_ml.release.platform.objects import EGRESS_CLASSES, EGRESS_LABEL
from secure_ml.training.handover import LAUNCHER_ACCOUNT, LAUNCHER_STEPS

Obj = dict[str, Any]
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
MODEL_NAMESPACES = ("secure-ml",)
TRAINING_NAMESPACE = "secure-ml-training"  # training Jobs and their per-run Secrets (k8s/training-pod.yaml)


def describe(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind', '?')}/{meta.get('name', '?')}"


def pod_of(obj: Mapping[str, Any]) -> tuple[Obj, Obj] | None:
    """(pod metadata, pod spec) of a workload or Pod; None for anything else."""
    if obj.get("kind") in WORKLOADS:
        template = obj["spec"]["template"]
        return template.get("metadata") or {}, template["spec"]
    if obj.get("kind") == "Pod":
        return obj.get("metadata") or {}, obj["spec"]
    return None


def is_step_pod(meta: Mapping[str, Any]) -> bool:
    """A step pod: dagster-k8s labels it with its op (a label config cannot take away)."""
    return "dagster/op" in (meta.get("labels") or {})


def _dupes(names: Iterable[str]) -> list[str]:
    return sorted(n for n, c in Counter(names).items() if c > 1)


def token_problems(obj: Mapping[str, Any], *, pipeline_namespace: str | None,
                   training_namespace: str | None) -> list[str]:
    """Who mounts a service-account token and reaches the API: in the pipeline namespace the run worker
    (the chart's) and the training launchers' step pods alone; in the training namespace nobody."""
    found = pod_of(obj)
    if found is None:
        return []
    meta, spec = found
    what, namespace = describe(obj), (obj.get("metadata") or {}).get("namespace")
    if training_namespace and namespace == training_namespace:
        problems = [f"{what}: a training pod mounts a service-account token"] \
            if spec.get("automountServiceAccountToken") is not False else []
        secrets = [v["secret"].get("secretName") for v in spec.get("volumes") or [] if "secret" in v]
        if len(secrets) > 1 or any(v for v in spec.get("volumes") or [] if "projected" in v) or any(
                c.get("envFrom") or any("valueFrom" in e for e in c.get("env") or [])
                for c in [*(spec.get("initContainers") or []), *spec.get("containers", [])]):
            problems.append(f"{what}: a training pod holds a Secret other than its run's key")
        return problems
    if not (pipeline_namespace and namespace == pipeline_namespace and obj.get("kind") == "Job" and is_step_pod(meta)):
        return []
    op = (meta.get("labels") or {}).get("dagster/op")
    egress = (meta.get("labels") or {}).get(EGRESS_LABEL)
    if op in LAUNCHER_STEPS:
        # It creates the training Job and its Secret: the launcher's account (a Role in the training
        # namespace only), never the chart's or the step account.
        if spec.get("serviceAccountName") != LAUNCHER_ACCOUNT:
            return [f"{what}: the {op} step starts training pods but does not run as {LAUNCHER_ACCOUNT}"]
        return []
    problems = []
    # Creating a Job reads every Secret in the namespace: no other step holds a token.
    if spec.get("automountServiceAccountToken") is not False:
        problems.append(f"{what}: a step pod mounts a service-account token (only {', '.join(LAUNCHER_STEPS)} may)")
    if egress == "events-api":
        problems.append(f"{what}: a step pod may reach the Kubernetes API")
    if spec.get("serviceAccountName") == LAUNCHER_ACCOUNT:
        problems.append(f"{what}: only {', '.join(LAUNCHER_STEPS)} may run as {LAUNCHER_ACCOUNT}")
    return problems


def rbac_problems(obj: Mapping[str, Any]) -> list[str]:
    """Roles we render: namespaced, named verbs and resources, and Secrets never enumerated."""
    kind, what = obj.get("kind"), describe(obj)
    if kind in ("ClusterRole", "ClusterRoleBinding"):
        return [f"{what}: nothing cluster-wide (a Role in the namespace it needs instead)"]
    if kind == "RoleBinding":
        ref = obj.get("roleRef") or {}
        return [f"{what}: binds the ClusterRole {ref.get('name')} (a Role in this namespace instead)"] \
            if ref.get("kind") != "Role" else []
    if kind != "Role":
        return []
    problems = []
    for rule in obj.get("rules") or []:
        verbs, resources = set(rule.get("verbs") or []), set(rule.get("resources") or [])
        if "*" in verbs or "*" in resources or "*" in set(rule.get("apiGroups") or []):
            problems.append(f"{what}: a wildcard in {rule} (name every verb, resource and API group)")
        # list or watch on Secrets returns their values: the whole namespace's Secrets, not one by name.
        if "" in set(rule.get("apiGroups") or []) and resources & {"secrets", "*"} and verbs & {"list", "watch", "*"}:
            problems.append(f"{what}: may list or watch Secrets (read them one by name: get)")
    return problems


def pod_problems(obj: Mapping[str, Any], *, pipeline_namespace: str | None = None) -> list[str]:
    """What is wrong with one workload's pod, beyond schema and admission."""
    found = pod_of(obj)
    if found is None:
        return []
    meta, spec = found
    what = describe(obj)
    problems: list[str] = []
    volumes = [v["name"] for v in spec.get("volumes") or []]
    if _dupes(volumes):
        problems.append(f"{what}: duplicate volumes {_dupes(volumes)} (the API server refuses the pod)")
    for container in [*(spec.get("initContainers") or []), *spec.get("containers", [])]:
        cname = f"{what}: container {container.get('name')}"
        mounts = container.get("volumeMounts") or []
        if _dupes(m["mountPath"] for m in mounts):
            problems.append(f"{cname} mounts {_dupes(m['mountPath'] for m in mounts)} twice")
        missing = sorted({m["name"] for m in mounts} - set(volumes))
        if missing:
            problems.append(f"{cname} mounts volumes the pod does not have: {missing}")
        if (container.get("securityContext") or {}).get("readOnlyRootFilesystem") and \
                not any(m["mountPath"] == "/tmp" and not m.get("readOnly") for m in mounts):  # nosec B108
            problems.append(f"{cname} has a read-only root filesystem and no writable /tmp")
        if "@sha256:" not in str(container.get("image", "")):
            problems.append(f"{cname} image {container.get('image')} is not pinned by digest")
    namespace = (obj.get("metadata") or {}).get("namespace")
    # Run and step pods: the chart's own pods (code location) are selected by its `component` label.
    if pipeline_namespace and namespace == pipeline_namespace and obj.get("kind") == "Job":
        egress = (meta.get("labels") or {}).get(EGRESS_LABEL)
        if egress not in EGRESS_CLASSES:
            problems.append(f"{what}: pod label {EGRESS_LABEL}={egress!r} is not one of {list(EGRESS_CLASSES)}")
    return problems


def policy_problems(obj: Mapping[str, Any], api_server_endpoints: Sequence[tuple[str, int]]) -> list[str]:
    if obj.get("kind") != "NetworkPolicy":
        return []
    allowed = {(cidr, port) for cidr, port in api_server_endpoints}
    problems = []
    for rule in (obj.get("spec") or {}).get("egress") or []:
        for peer in rule.get("to") or []:
            block = peer.get("ipBlock")
            if not block:
                continue
            ports = [int(p.get("port", 0)) for p in rule.get("ports") or []] or [0]
            for port in ports:
                if (block["cidr"], port) not in allowed:
                    problems.append(f"{describe(obj)}: egress to {block['cidr']}:{port} is not an API server "
                                    "endpoint in k8s/render.yaml (a Service IP never matches after translation)")
    return problems


def check_objects(objects: Sequence[Mapping[str, Any]], *, kubernetes_version: str,
                  signed_model_digests: Sequence[str], api_server_endpoints: Sequence[tuple[str, int]],
                  pipeline_namespace: str, training_namespace: str = TRAINING_NAMESPACE) -> list[str]:
    """Every problem with ``objects``, one line each; empty when all of them would be admitted."""
    import kubernetes_validate

    from secure_ml.governance.policy import PolicyEngine
    from secure_ml.release.k8s_render import ANNOTATION

    engine = PolicyEngine({"admission": {"model_digest_annotation": ANNOTATION,
                                         "model_namespaces": list(MODEL_NAMESPACES),
                                         "signed_model_digests": list(signed_model_digests)}})
    problems: list[str] = []
    names = [(o.get("kind"), (o.get("metadata") or {}).get("namespace"), (o.get("metadata") or {}).get("name"))
             for o in objects]
    problems += [f"{k}/{n} in {ns} is rendered twice" for k, ns, n in _dupes_tuples(names)]
    for obj in objects:
        what = describe(obj)
        try:
            kubernetes_validate.validate(dict(obj), kubernetes_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path) or "(top)"
            problems.append(f"{what}: not a valid Kubernetes {kubernetes_version} object at {path}: "
                            f"{str(exc.message)[:200]}")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
            problems.append(f"{what}: {getattr(exc, 'message', exc)}")
        decision = engine.decide("admission", dict(obj))
        problems += [f"admission: {reason}" for reason in decision.reasons] if not decision.allowed else []
        problems += pod_problems(obj, pipeline_namespace=pipeline_namespace)
        problems += token_problems(obj, pipeline_namespace=pipeline_namespace, training_namespace=training_namespace)
        problems += rbac_problems(obj)
        problems += policy_problems(obj, api_server_endpoints)
    return problems


def _dupes_tuples(items: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return sorted((t for t, c in Counter(items).items() if c > 1), key=str)
