"""The shape of every pipeline configuration file: one pydantic model per YAML file.

    from secure_ml.config.models import TrainingFile
    TrainingFile.model_validate(yaml.safe_load(text)).training.epochs

Every model refuses unknown keys (a typo must not silently fall back to a default and weaken a
control) and wrong types (strict: ``"10"`` is not an integer, ``1`` is not ``true``; an integer is
accepted where a number is expected). Sections a file leaves out take the defaults the stages
use. What the stages check beyond shape (cross-file references, policy meaning) stays with them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Severity = Literal["critical", "high", "medium", "low", "info"]
Executor = Literal["in_process", "multiprocess", "k8s", "default"]


class Strict(BaseModel):
    """Base of every configuration model: unknown keys and wrong types are refused; read-only."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, protected_namespaces=())


# -- automation.yaml ---------------------------------------------------------------------------
class Landing(Strict):
    interval_seconds: int = Field(5, ge=1)
    settle_seconds: float = Field(2, ge=0)
    recheck_seconds: float = Field(2, ge=0)
    groups: list[str] = ["data"]


class Retraining(Strict):
    cron: str = "0 3 * * 1"
    timezone: str = "UTC"
    groups: list[str] = ["training", "security"]


class Conditions(Strict):
    interval_seconds: int = Field(10, ge=1)
    owners: dict[str, list[str]] = {}


class Failures(Strict):
    interval_seconds: int = Field(15, ge=1)


class Webhook(Strict):
    url: str = ""
    url_env: str = ""
    timeout_s: float = Field(5, gt=0)


class Freshness(Strict):
    deployment_fail_hours: float = Field(168, gt=0)
    deployment_warn_hours: float = Field(120, gt=0)


class ExecutorChoice(Strict):
    local: Executor = "in_process"
    production: Executor = "k8s"


class AutomationFile(Strict):
    landing: Landing = Landing()
    retraining: Retraining = Retraining()
    conditions: Conditions = Conditions()
    failures: Failures = Failures()
    webhook: Webhook = Webhook()
    freshness: Freshness = Freshness()
    executor: ExecutorChoice = ExecutorChoice()


# -- pipeline.yaml -----------------------------------------------------------------------------
class Dvc(Strict):
    repo: str = "dvc"
    remote: str = "dvc-remote"


class DatasetSection(Strict):
    sources_file: str = "sources.yaml"
    settle_seconds: float = Field(2, ge=0)
    dvc: Dvc = Dvc()


class PipelineFile(Strict):
    dataset: DatasetSection = DatasetSection()
    # The model whose assets keep the unprefixed keys (dataset, trained_model, ...); every other
    # model in models/ gets its name as a key prefix (breast_cancer/dataset).
    default_model: str = "german_credit"


# -- release.yaml ------------------------------------------------------------------------------
class Promotion(Strict):
    min_metrics: dict[str, float] = {}
    max_fairness_gap: dict[str, float] = {}
    min_robustness: dict[str, float] = {}
    required_approvals: int = Field(1, ge=1)
    approver_role: str = "approver"
    deployer_role: str = "deployer"


class Admission(Strict):
    model_digest_annotation: str = "secure-ml.dev/model-digest"
    model_namespaces: list[str] = []
    signed_model_digests: list[str] = []


class Deploy(Strict):
    default_target: Literal["local", "kubernetes"] = "local"
    health_timeout_s: float = Field(20, gt=0)


class Kubernetes(Strict):
    namespace: str = "secure-ml"
    name: str = "secure-ml-model"
    image: str = ""
    kubernetes_version: str = "1.33"
    replicas: int = Field(2, ge=1)
    port: int = Field(8080, ge=1, le=65535)
    allowed_client_labels: dict[str, str] = {}
    models_claim: str = "secure-ml-models"
    trust_config_map: str = "secure-ml-trust"
    tokens_secret: str = "secure-ml-serving-tokens"  # nosec B105 - a Secret's name, not a secret
    resources: dict[Literal["requests", "limits"], dict[str, str]] = {}


class ServingOutput(Strict):
    """How precise answers are: ``decimals`` rounds probabilities; ``label_only`` drops them."""

    decimals: int | None = Field(None, ge=0, le=17)
    label_only: bool = False


class ExtractionDetector(Strict):
    window: int = Field(50, ge=1)
    min_queries: int = Field(20, ge=1)
    z_limit: float = Field(3.0, gt=0)
    max_atypical_share: float = Field(0.3, gt=0, lt=1)
    # PRADA: Shapiro-Wilk W of the minimum distances between a token's queries (serving/extraction.py).
    prada: bool = True
    prada_w: float = Field(0.70, gt=0, lt=1)
    prada_min_distances: int = Field(40, ge=3)
    prada_window: int = Field(100, ge=3)
    prada_history: int = Field(200, ge=2)


class AuthFailures(Strict):
    window_seconds: float = Field(60, gt=0)
    max_per_window: int = Field(20, ge=1)


class Serving(Strict):
    # The name the one local deployment is served under (/v2/models/{model_name}); per-model
    # deployments name their own (secure_ml.release.served.deployed_models).
    model_name: str = Field("german_credit", pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=1, le=65535)
    rate_limit_per_minute: int = Field(120, ge=1)
    max_batch: int = Field(256, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1)
    daily_query_budget: int = Field(10_000, ge=0)
    output: ServingOutput = ServingOutput()
    extraction_detector: ExtractionDetector = ExtractionDetector()
    auth_failures: AuthFailures = AuthFailures()


class ReleaseFile(Strict):
    promotion: Promotion = Promotion()
    admission: Admission = Admission()
    deploy: Deploy = Deploy()
    kubernetes: Kubernetes = Kubernetes()
    serving: Serving = Serving()


# -- roles.yaml --------------------------------------------------------------------------------
class Role(Strict):
    may: list[str] = []
    clearance: str | None = None


class RolesFile(Strict):
    classifications: list[str] = ["public", "internal", "confidential", "restricted"]
    roles: dict[str, Role] = {}
    # An identity's roles: a list, or one role name written without brackets.
    identities: dict[str, list[str] | str] = {}
    default_roles: list[str] | str = []


# -- security.yaml -----------------------------------------------------------------------------
class SafetensorsLimits(Strict):
    max_header_bytes: int = Field(16 << 20, ge=1)
    max_tensors: int = Field(100_000, ge=1)
    allowed_dtypes: list[str] = []


class Dependencies(Strict):
    lock_file: str = "requirements.lock"
    source: Literal["offline", "osv"] = "offline"
    offline_db: str = "data/osv/pypi-advisories.json"
    severity: Severity = "high"


class CodeScan(Strict):
    paths: list[str] = ["secure_ml", "assets", "resources", "sensors"]
    blocking_severity: Severity = "medium"


class Scan(Strict):
    blocking_severity: Severity = "high"
    model_file_types: list[str] = [".safetensors", ".json", ".md"]
    safetensors: SafetensorsLimits = SafetensorsLimits()
    dependencies: Dependencies = Dependencies()
    code: CodeScan = CodeScan()


class TrustedIdentity(Strict):
    identity: str = Field(min_length=1)
    issuer: str = Field(min_length=1)


class Signing(Strict):
    method: Literal["key", "sigstore", "auto"] = "key"
    private_key: str = "keys/model-signing.pem"
    trusted_public_keys: list[str] = []
    trusted_identities: list[TrustedIdentity] = []


class Attestation(Strict):
    builder_id: str = "https://secure-ml.local/dagster/local"


class SecurityFile(Strict):
    scan: Scan = Scan()
    signing: Signing = Signing()
    attestation: Attestation = Attestation()


# -- sources.yaml ------------------------------------------------------------------------------
class Source(Strict):
    name: str = Field(min_length=1)
    description: str = ""
    patterns: list[str] | str | None = None
    pattern: str | None = None
    formats: list[Literal["csv", "parquet"]] | None = None
    owner: str = Field(min_length=1)
    classification: str


class SourcesFile(Strict):
    sources: list[Source]


# -- training.yaml -----------------------------------------------------------------------------
class Training(Strict):
    hidden: list[int] = [32, 16]
    dropout: float = Field(0.1, ge=0, lt=1)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(0.003, gt=0)
    weight_decay: float = Field(0.0001, ge=0)
    seed: int = 20261123
    threads: int = Field(1, ge=1)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    cuda_fallback: bool = False
    checkpoint_every: int = Field(5, ge=0)
    segment_epochs: int = Field(1, ge=1)
    threshold: float = Field(0.5, gt=0, lt=1)


class Limits(Strict):
    """Resource limits in the sandbox (0: not limited)."""

    memory_mb: int = Field(16384, ge=0)
    cpu_s: int = Field(7200, ge=0)
    file_size_mb: int = Field(1024, ge=0)
    processes: int = Field(512, ge=0)


class TrainingPod(Strict):
    """Where the training pod runs when isolation.backend is kubernetes (secure_ml.training.policy)."""

    namespace: str = "secure-ml-pipeline"
    volume_claim: str = "secure-ml-artifacts"
    exchange: str = "training-runs"
    wait_s: float = Field(3600, gt=0)


class Isolation(Strict):
    # 'auto' is refused: it used to fall back silently to the socket guard alone.
    network_namespace: Literal["required", "off"] = "required"
    drop_privileges: bool = True
    socket_guard: bool = True
    landlock: bool = True
    limits: Limits = Limits()
    pass_env: list[str] = []
    timeout_s: float = Field(3600, gt=0)
    # local: the namespace sandbox; kubernetes: a pod of its own, given only this run's split under a per-run key.
    backend: Literal["local", "kubernetes"] = "local"
    kubernetes: TrainingPod = TrainingPod()


class Watch(Strict):
    """Bounds of the sandbox_in_bounds check against the model's recent runs."""

    window: int = Field(10, ge=1)
    min_history: int = Field(3, ge=1)
    max_ratio: float = Field(3.0, gt=1)
    # Per-measure noise floors (absolute: seconds, bytes, tasks); unset measures keep the defaults.
    floors: dict[Literal["cpu_seconds", "peak_memory_bytes", "block_read_bytes", "block_written_bytes",
                         "bytes_from_child", "tasks_started"], float] = Field(default_factory=dict)


class Reproducible(Strict):
    """The ``reproducible`` check: re-execute ``segments`` chain segments (Proof-of-Learning) or retrain fully."""

    when: Literal["every", "release"] = "every"
    method: Literal["segments", "full"] = "segments"
    segments: int = Field(3, ge=1)


class Checkpoints(Strict):
    keep: int = Field(2, ge=1)


class Threshold(Strict):
    """A limit on one measured value: exactly one of ``min`` or ``max``."""

    min: float | None = None
    max: float | None = None
    on_breach: Literal["block", "warn"] = "block"

    @model_validator(mode="after")
    def _one_limit(self) -> Threshold:
        if (self.min is None) == (self.max is None):
            raise ValueError("needs exactly one of min or max")
        return self


class Attack(Strict):
    epsilon: float = Field(0.1, ge=0)
    pgd_steps: int = Field(10, ge=1)
    pgd_step_size: float = Field(0.025, gt=0)
    seed: int = 0


class Robustness(Strict):
    """The attack's settings, and a threshold per robustness measure (any other key)."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Threshold] = Field(init=False)  # type: ignore[assignment]

    attack: Attack = Attack()


class Evaluation(Strict):
    bands: dict[str, list[float]] = {}
    min_group_size: int = Field(10, ge=1)
    calibration_bins: int = Field(10, ge=2)
    metrics: dict[str, Threshold] = {}
    fairness: dict[str, Threshold] = {}
    robustness: Robustness = Robustness()


class TrainingFile(Strict):
    training: Training = Training()
    isolation: Isolation = Isolation()
    reproducible: Reproducible = Reproducible()
    watch: Watch = Watch()
    checkpoints: Checkpoints = Checkpoints()
    evaluation: Evaluation = Evaluation()


# -- validation.yaml ---------------------------------------------------------------------------
class Schemas(Strict):
    default: str | None = None
    by_source: dict[str, str] = {}


class Outliers(Strict):
    limit: float = Field(8.0, gt=0)
    robust_z: float = Field(6.0, gt=0)


class LabelNeighbours(Strict):
    limit: float = Field(5.0, gt=0)
    k: int = Field(15, ge=1)
    duplicate_mismatch_rate: float = Field(0.01, ge=0, le=1)


class LabelCrossValidated(Strict):
    limit: float = Field(8.0, gt=0)
    folds: int = Field(5, ge=2)


class Shift(Strict):
    limit: float = Field(0.25, gt=0)


class LabelLikelihood(Strict):
    folds: int = Field(10, ge=2)
    p_min: float = Field(0.1, gt=0, lt=0.5)
    global_share: float = Field(0.75, gt=0, le=1)


class LabelSubgroups(Strict):
    min_rows: int = Field(20, ge=5)


class Detectors(Strict):
    outliers: Outliers = Outliers()
    label_neighbours: LabelNeighbours = LabelNeighbours()
    label_cross_validated: LabelCrossValidated = LabelCrossValidated()
    shift: Shift = Shift()
    label_likelihood: LabelLikelihood = LabelLikelihood()
    label_subgroups: LabelSubgroups = LabelSubgroups()


class Poisoning(Strict):
    # One false-alarm rate for the whole screen; legacy_alpha of it goes to the fixed-limit detectors.
    alpha: float = Field(0.05, gt=0, lt=0.5)
    legacy_alpha: float = Field(0.005, ge=0)
    threshold: float = Field(1.0, gt=0)
    max_model_rows: int = Field(20_000, ge=100)
    seed: int = 0
    detectors: Detectors = Detectors()


class PiiRule(Strict):
    column: str = Field(min_length=1)
    kind: Literal["email", "phone", "ssn", "iban", "card", "name", "*"] = "*"
    action: Literal["drop", "hash", "redact"]


class Pii(Strict):
    max_values: int = Field(20_000, ge=1)
    rules: list[PiiRule] = []


class Split(Strict):
    test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0


class Reference(Strict):
    lookback: int = Field(50, ge=1)
    # How far the last accepted version may drift from the pinned sample and still be the reference.
    max_psi: float = Field(0.25, gt=0)
    max_label_shift: float = Field(0.10, gt=0, le=1)


class ValidationFile(Strict):
    schemas: Schemas = Schemas()
    poisoning: Poisoning = Poisoning()
    pii: Pii = Pii()
    split: Split = Split()
    reference: Reference = Reference()


#: Each configuration file (``NAME.yaml`` in the configuration directory) and its model.
FILES: dict[str, type[Strict]] = {
    "automation": AutomationFile,
    "pipeline": PipelineFile,
    "release": ReleaseFile,
    "roles": RolesFile,
    "security": SecurityFile,
    "sources": SourcesFile,
    "training": TrainingFile,
    "validation": ValidationFile,
}
