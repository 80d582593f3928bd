"""What the sandbox applies, as configured (``isolation:`` in training.yaml), and the environment it passes.

    policy = IsolationPolicy.from_mapping(settings.load_config("training")["isolation"])
    env, withheld = child_environment(policy, threads=2)     # an allow-list; never a secret

Unknown settings, a secret named in ``pass_env``, and the old ``network_namespace: auto`` (it
fell back silently) are refused with one line. secure_ml.training.sandbox applies the policy.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from secure_ml.errors import ConfigurationError, refuse_unknown

NAMESPACE_MODES = ("required", "off")
# Names that must never reach the sandboxed process, whatever the configuration says.
SECRET_ENV = re.compile(
    r"(^(SECURE_ML_|DAGSTER_|AWS_|GOOGLE_|GCP_|GCLOUD_|AZURE_|ARM_|VAULT_|KUBE|K8S_|GITHUB_|GITLAB_|CI_|"
    r"ACTIONS_|DOCKER_|NPM_|PIP_|SSH_|GPG_|OPENAI_|HF_|HUGGING)|KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|"
    r"SESSION|COOKIE|PRIVATE|CERT|_PASS$|_PWD$)", re.IGNORECASE)
SAFE_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
GPU_ENV = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES")
MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Resource limits inside the sandbox (``isolation.limits``); 0 means not limited."""

    memory_mb: int = 16384      # RLIMIT_DATA: heap and private writable mappings (GPU reservations are not)
    cpu_s: int = 7200           # RLIMIT_CPU, all threads together
    file_size_mb: int = 1024    # RLIMIT_FSIZE: the largest file it may write
    processes: int = 512        # RLIMIT_NPROC: tasks (threads count) of its uid

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> Limits:
        data = dict(data or {})
        refuse_unknown(data, cls.__dataclass_fields__, "isolation.limits")
        try:
            values = {name: int(data.get(name, getattr(cls, name))) for name in cls.__dataclass_fields__}
        except (TypeError, ValueError):
            raise ConfigurationError("isolation.limits: every limit is a whole number (0: not limited)") from None
        if any(v < 0 for v in values.values()):
            raise ConfigurationError("isolation.limits: a limit cannot be negative")
        return cls(**values)

    def rlimits(self) -> dict[str, int]:
        return {"memory_bytes": self.memory_mb * MIB, "cpu_seconds": self.cpu_s,
                "file_size_bytes": self.file_size_mb * MIB, "processes": self.processes}


BACKENDS = ("local", "kubernetes")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class TrainingPod:
    """Where the training pod runs (``isolation.kubernetes``, used when ``isolation.backend: kubernetes``)."""

    namespace: str = "secure-ml-training"              # training Jobs and their per-run Secrets, nothing else
    volume_claim: str = "secure-ml-training-exchange"  # the exchange directory's volume there; one run's subPath per pod
    exchange: str = "training-runs"             # that directory, relative to SECURE_ML_HOME (the artifacts volume)
    wait_s: float = 3600.0

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> TrainingPod:
        data = dict(data or {})
        refuse_unknown(data, cls.__dataclass_fields__, "isolation.kubernetes")
        pod = cls(**{k: (float(v) if k == "wait_s" else str(v)) for k, v in data.items()})
        for name in ("namespace", "volume_claim"):
            if not _NAME.match(getattr(pod, name)):
                raise ConfigurationError(f"isolation.kubernetes.{name} must be a Kubernetes name, "
                                         f"not {getattr(pod, name)!r}")
        if os.path.isabs(pod.exchange) or ".." in pod.exchange.split("/") or not pod.exchange.strip("/"):
            raise ConfigurationError("isolation.kubernetes.exchange is a directory relative to SECURE_ML_HOME")
        if pod.wait_s <= 0:
            raise ConfigurationError("isolation.kubernetes.wait_s must be positive")
        return pod


@dataclass(frozen=True)
class IsolationPolicy:
    """How the training process is isolated (``isolation:`` in training.yaml)."""

    network_namespace: str = "required"
    socket_guard: bool = True
    drop_privileges: bool = True
    pass_env: tuple[str, ...] = ()
    timeout_s: float = 3600.0
    limits: Limits = field(default_factory=Limits)
    hide: tuple[str, ...] = ()
    landlock: bool = True
    # local: the namespace sandbox in the step's own process tree; kubernetes: a pod of its own
    # (secure_ml.training.handover), holding only this run's split under a per-run key.
    backend: str = "local"
    kubernetes: TrainingPod = field(default_factory=TrainingPod)

    @property
    def level(self) -> str:
        return "namespaces" if self.network_namespace == "required" else "guard"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> IsolationPolicy:
        data = dict(data or {})
        mode = str(data.pop("network_namespace", "required"))
        if mode == "auto":
            raise ConfigurationError("isolation.network_namespace 'auto' is no longer accepted (it fell back to the "
                                     "socket guard without saying so): use required (the default) or off")
        if mode not in NAMESPACE_MODES:
            raise ConfigurationError(f"isolation.network_namespace must be one of {', '.join(NAMESPACE_MODES)}, "
                                     f"not {mode!r}")
        pass_env = tuple(str(n) for n in data.pop("pass_env", None) or ())
        secret = [n for n in pass_env if SECRET_ENV.search(n)]
        if secret:
            raise ConfigurationError(f"isolation.pass_env names {secret[0]!r}, which looks like a secret: "
                                     "the training process never receives keys, tokens or credentials")
        try:
            timeout = float(data.pop("timeout_s", 3600))
        except (TypeError, ValueError):
            raise ConfigurationError("isolation.timeout_s must be a number of seconds") from None
        limits = Limits.from_mapping(data.pop("limits", None))
        hide = tuple(str(p) for p in data.pop("hide", None) or ())
        if any(not os.path.isabs(p) for p in hide):
            raise ConfigurationError("isolation.hide lists absolute paths only")
        landlock = bool(data.pop("landlock", True))
        backend = str(data.pop("backend", "local"))
        if backend not in BACKENDS:
            raise ConfigurationError(f"isolation.backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        pod = TrainingPod.from_mapping(data.pop("kubernetes", None))
        refuse_unknown(data, {"socket_guard", "drop_privileges"}, "isolation")
        # The guard is always on in configuration; only tests switch it off (to prove the namespace alone).
        return cls(network_namespace=mode, socket_guard=True, drop_privileges=bool(data.get("drop_privileges", True)),
                   pass_env=pass_env, timeout_s=timeout, limits=limits, hide=hide, landlock=landlock,
                   backend=backend, kubernetes=pod)


def child_environment(policy: IsolationPolicy, *, threads: int = 1,
                      environ: Mapping[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """(environment for the child, names withheld from it). Built from an allow-list."""
    source = dict(os.environ if environ is None else environ)
    env = {name: source[name] for name in (*SAFE_ENV, *GPU_ENV, *policy.pass_env) if name in source}
    env = {name: value for name, value in env.items() if not SECRET_ENV.search(name)}
    env.update({
        "HOME": "/nonexistent",
        "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
        # cuBLAS is only deterministic with a fixed workspace (torch.use_deterministic_algorithms).
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    })
    withheld = sorted(set(source) - set(env))
    return env, withheld
