"""Training in a pod of its own (isolation.backend: kubernetes), as far as a machine without a cluster allows.

Touches: the real handover (the encoded split encrypted under a fresh per-run key with the project's
artifact encryption, secure_ml.training.handover), the real pod entry point (python -m
secure_ml.training.pod) run as a subprocess against a directory laid out as the pod sees it (the
per-run key as a file, split.smle, out/), real torch training, and the step's read-back and
verification; the same training through the local namespace sandbox for comparison. The Secret and
Job the step would create are built by dagster-k8s and checked with kubernetes-validate (strict), the
admission policy and secure_ml/release/platform/checks.py. Does not touch: a cluster (the
KubernetesLauncher's create/wait/delete calls).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from resources.training_pod import EXCHANGE, KEY_DIR, run_name, training_pod_objects
from secure_ml.custody.crypto import encrypt_stream
from secure_ml.errors import BadInput, IntegrityError, KeyUnavailable
from secure_ml.training import handover, loop
from secure_ml.training.config import TrainingConfig
from secure_ml.training.policy import IsolationPolicy, TrainingPod
from secure_ml.training.sandbox import CODE_ROOT, SandboxError
from secure_ml.settings import Settings
from secure_ml.training.trainer import fit
from tests.conftest import SAMPLE_CSV, land_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # trains real models in subprocesses
CONFIG = TrainingConfig(hidden=(6,), epochs=3, batch_size=16, checkpoint_every=0)
IMAGE = "ghcr.io/secure-ml/secure-ml@sha256:" + "cd" * 32


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    X = rng.normal(size=(96, 5)).astype(np.float32)
    return X, (X[:, 0] + X[:, 1] > 0).astype(np.float32)


def _pod(key_dir: Path, *, give_key: str | None = None,
         before: Callable[[Path], None] | None = None) -> Callable[[Path, str], None]:
    """A launch that runs the pod's entry point here, on the directory laid out as the pod sees it:
    the per-run key as a file of its own (as the Secret mounts it), the run directory, no KEK."""

    def launch(run_dir: Path, key: str) -> None:
        key_file = key_dir / "key"
        key_file.write_text(give_key or key)
        key_file.chmod(0o400)
        if before is not None:
            before(run_dir)
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(CODE_ROOT), "HOME": "/nonexistent"}
        done = subprocess.run([sys.executable, "-m", "secure_ml.training.pod", "--key-file", str(key_file),
                               "--run-dir", str(run_dir)], env=env, capture_output=True, text=True, timeout=240,
                              check=False)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no output"]
            raise SandboxError(f"the training pod failed: {lines[-1]}")

    return launch


def _fit_in_pod(tmp_path: Path, launch: Callable[[Path, str], None]) -> Any:
    X, y = _data()
    return fit(X, y, CONFIG, isolation=IsolationPolicy(backend="kubernetes"),
               runner=handover.pod_runner(tmp_path / "runs" / "run1", launch))


def test_the_pod_trains_bit_identical_weights_to_the_local_sandbox(tmp_path: Path) -> None:
    X, y = _data()
    local = fit(X, y, CONFIG, isolation=IsolationPolicy())
    (tmp_path / "secret").mkdir()
    seen: dict[str, Any] = {}

    def look(run_dir: Path) -> None:  # what lies on the artifacts volume for the pod: ciphertext only
        seen["files"] = sorted(p.name for p in run_dir.iterdir())
        seen["plain"] = memoryview(X).tobytes()[:64] in (run_dir / handover.SPLIT_FILE).read_bytes()

    pod = _fit_in_pod(tmp_path, _pod(tmp_path / "secret", before=look))
    assert pod.weights == local.weights and pod.weights_sha256 == local.weights_sha256
    assert pod.chain == local.chain and pod.losses == local.losses
    assert seen == {"files": ["out", "split.smle"], "plain": False}
    assert not (tmp_path / "runs" / "run1").exists()  # the per-run directory is removed
    # What the pod reported of itself: here (not a pod) its root is writable, so the level is not met.
    assert pod.isolation["configured"] == "kubernetes" and pod.isolation["level_met"] is False
    assert pod.isolation["isolated"] is False and "SECURE_ML_KEK" not in pod.isolation["environment"]


def test_a_wrong_key_a_cut_split_or_tampered_weights_stop_it_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "secret").mkdir()
    with pytest.raises(SandboxError, match="another per-run key") as wrong:
        _fit_in_pod(tmp_path, _pod(tmp_path / "secret", give_key=handover.new_run_key()))
    assert "\n" not in str(wrong.value)

    def cut(run_dir: Path) -> None:
        split = run_dir / handover.SPLIT_FILE
        split.write_bytes(split.read_bytes()[:-40])

    with pytest.raises(SandboxError, match="training split") as truncated:
        _fit_in_pod(tmp_path, _pod(tmp_path / "secret", before=cut))
    assert "\n" not in str(truncated.value)

    honest = _pod(tmp_path / "secret")

    def forge(run_dir: Path, key: str) -> None:
        """A pod that returns other weights than it learned: it holds the key, so it can seal them."""
        honest(run_dir, key)
        out = run_dir / handover.OUT_DIR / handover.RETURNED["W"]
        got = handover.read_returned(run_dir, key)
        from safetensors.numpy import load, save

        weights = {k: v.copy() for k, v in load(got["W"]).items()}
        first = sorted(weights)[0]
        weights[first].flat[0] += 0.5
        forged = save(weights, metadata={"format": "secure-ml-mlp/1"})
        handover._seal(out, [(b"W", forged)], handover.RunKey(key))

    with pytest.raises(IntegrityError, match="final state is not the model's weights") as tampered:
        _fit_in_pod(tmp_path, forge)
    assert "\n" not in str(tampered.value)
    assert not (tmp_path / "runs" / "run1").exists()  # nothing left behind by any of them


def test_the_handover_refuses_wrong_keys_and_cut_files_without_a_pod(tmp_path: Path) -> None:
    key = handover.new_run_key()
    handover.write_split(tmp_path / "r", {"rows": 1}, [b"\1\2\3\4"], key)
    assert handover.read_split(tmp_path / "r", key) == ({"rows": 1}, [b"\1\2\3\4"])
    with pytest.raises(KeyUnavailable, match="another per-run key"):
        handover.read_split(tmp_path / "r", handover.new_run_key())
    with pytest.raises(KeyUnavailable, match="32 bytes"):
        handover.RunKey("c2hvcnQ=")
    assert key not in repr(handover.RunKey(key))
    # A split sealed under the right key but not a training job (e.g. a replayed other artifact) is refused.
    sealed = io.BytesIO()
    encrypt_stream(io.BytesIO(b"not frames"), sealed, handover.RunKey(key))
    (tmp_path / "r" / handover.SPLIT_FILE).write_bytes(sealed.getvalue())
    with pytest.raises(IntegrityError, match="cut short"):
        handover.read_split(tmp_path / "r", key)
    with pytest.raises(IntegrityError, match="no returned weights"):
        handover.read_returned(tmp_path / "r", key)


def test_the_per_run_secret_and_job_hold_only_the_run_key_and_pass_every_check() -> None:
    from secure_ml.release.platform.checks import check_objects

    key = handover.new_run_key()
    pod = TrainingPod()
    secret, job = training_pod_objects(run_id="run-1", image=IMAGE, key=key, pod=pod)
    name = run_name("run-1")
    problems = check_objects([secret, job], kubernetes_version="1.33", signed_model_digests=[],
                             api_server_endpoints=[], pipeline_namespace=pod.namespace)
    assert problems == []
    assert secret["metadata"]["name"] == name and list(secret["data"]) == ["key"] and secret["immutable"] is True
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert spec["automountServiceAccountToken"] is False and job["spec"]["backoffLimit"] == 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["args"][-4:] == ["--key-file", f"{KEY_DIR}/key", "--run-dir", EXCHANGE]
    # The only Secret: this run's key, as a file; no env secret, no envFrom; the volume only at this run's subPath.
    assert not container.get("envFrom") and not any("valueFrom" in e for e in container.get("env") or [])
    secrets = [v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v]
    assert secrets == [name]
    exchange = next(m for m in container["volumeMounts"] if m["mountPath"] == EXCHANGE)
    assert exchange["subPath"] == f"training-runs/{name}"
    # In the training namespace, which holds nothing else; the exchange claim there, never the artifacts volume.
    assert job["metadata"]["namespace"] == secret["metadata"]["namespace"] == "secure-ml-training"
    claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["secure-ml-training-exchange"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["secure-ml.dev/role"] == "training-sandbox" and labels["secure-ml.dev/egress"] == "none"
    # The checks can fail: the same Job with a writable root or an unpinned image is refused.
    job["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    assert check_objects([job], kubernetes_version="1.33", signed_model_digests=[], api_server_endpoints=[],
                         pipeline_namespace=pod.namespace)
    with pytest.raises(Exception, match="pinned by digest"):
        training_pod_objects(run_id="run-1", image="secure-ml:latest", key=key, pod=pod)


def test_the_reproducible_replay_runs_in_a_pod_of_its_own_and_catches_a_forged_checkpoint(tmp_path: Path) -> None:
    """The check's replay of chain segments through the same handover (the split and the chain, whose
    states are the segments' starting checkpoints, in; each end state's digest back), the pod's entry
    point run here as a subprocess: the digests are the local replay's, and a forged state fails it."""
    import json

    import pandas as pd

    from secure_ml.data import splitting
    from secure_ml.training.proof import verify_segments
    from secure_ml.training.trainer import train_model
    from tests.test_training_chain import CONFIG as CHAIN_CONFIG
    from tests.test_training_chain import SPEC, _forge

    train = splitting.split(pd.read_csv(SAMPLE_CSV), "risk", test_fraction=0.2, seed=20261123)[0]
    model = tmp_path / "model"
    train_model(train, SPEC, CHAIN_CONFIG, model, isolation=None, provenance={"train_sha256": "a" * 64})
    (tmp_path / "secret").mkdir()
    seen: dict[str, Any] = {}

    def look(run_dir: Path) -> None:
        seen["files"] = sorted(p.name for p in run_dir.iterdir())
        seen["entry"] = handover.read_job(run_dir, (tmp_path / "secret" / "key").read_text())[0]

    runner = handover.pod_runner(tmp_path / "runs" / "replay", _pod(tmp_path / "secret", before=look))

    def spy(header: Any, blobs: Any, *, entry: str, on_frame: Callable[[str, bytes], None], **kw: Any) -> Any:
        def keep(kind: str, payload: bytes) -> None:
            seen.setdefault(kind, payload)
            on_frame(kind, payload)
        return runner(header, blobs, entry=entry, on_frame=keep, **kw)

    local = verify_segments(model, train, k=10, run_id="r", isolation=None)
    pod = verify_segments(model, train, k=10, run_id="r", isolation=IsolationPolicy(backend="kubernetes"), runner=spy)
    assert local.passed and pod.passed and pod.checked == local.checked == [(0, 1), (1, 2), (2, 3), (3, 4)]
    record = json.loads((model / "training_record.json").read_text())
    recorded = {e["epoch"]: e["state_sha256"] for e in record["result"]["chain"]}
    assert [d for _, _, d in json.loads(seen["R"])["segments"]] == [recorded[b] for _, b in local.checked]
    assert seen["files"] == ["out", "split.smle"] and seen["entry"] == handover.REPLAY_ENTRY
    assert not (tmp_path / "runs" / "replay").exists()
    # A trainer who forged epoch 2 (and recorded its digest consistently): the pod's replay does not reach it.
    _forge(model, 2, lambda state: state["model.layers.0.weight"].__iadd__(np.float32(1e-3)))
    caught = verify_segments(model, train, k=10, run_id="r", isolation=IsolationPolicy(backend="kubernetes"),
                             runner=handover.pod_runner(tmp_path / "runs" / "replay", _pod(tmp_path / "secret")))
    assert not caught.passed and caught.mismatched == [(1, 2), (2, 3)]
    assert "did not reach the state the chain records" in caught.reason() and "\n" not in caught.reason()
    # The pod runs training or the replay, nothing named by anyone else.
    with pytest.raises(BadInput, match="not 'os:system'"):
        runner({}, [], entry="os:system", on_frame=lambda kind, payload: None)
    assert (handover.TRAIN_ENTRY, handover.REPLAY_ENTRY) == (loop.ENTRY, loop.SEGMENT_ENTRY)


def test_what_the_cluster_hands_back_is_checked_before_the_job_is_waited_for() -> None:
    """The launcher reads the Secret and Job back (as the kubernetes client gives them) and stops when
    what was stored mounts a token or another Secret (a mutating webhook, someone else's object)."""
    import copy

    import kubernetes

    from resources.training_pod import read_back_problems

    client = kubernetes.client.ApiClient()
    secret, job = training_pod_objects(run_id="run-1", image=IMAGE, key=handover.new_run_key(), pod=TrainingPod())
    name = run_name("run-1")

    def back(obj: dict[str, Any], kind: str) -> Any:
        return client._ApiClient__deserialize(copy.deepcopy(obj), kind)  # what read_namespaced_* returns

    assert read_back_problems(back(secret, "V1Secret"), back(job, "V1Job"), name) == []
    token = copy.deepcopy(job)
    token["spec"]["template"]["spec"]["automountServiceAccountToken"] = True
    kek = copy.deepcopy(job)
    kek["spec"]["template"]["spec"]["containers"][0]["envFrom"] = [{"secretRef": {"name": "secure-ml-kek"}}]
    for changed in (token, kek):
        (problem,) = read_back_problems(back(secret, "V1Secret"), back(changed, "V1Job"), name)
        assert "mounts a token or a Secret other than its run's key" in problem
    other = copy.deepcopy(secret)
    other["metadata"]["labels"]["secure-ml.dev/training-run"] = "someone-else"
    assert read_back_problems(back(other, "V1Secret"), back(job, "V1Job"), name)


def test_isolation_backend_is_typed_and_refuses_unknown_settings() -> None:
    from secure_ml.errors import ConfigurationError

    policy = IsolationPolicy.from_mapping({"backend": "kubernetes", "kubernetes": {"namespace": "ml-train"}})
    assert policy.backend == "kubernetes" and policy.kubernetes.namespace == "ml-train"
    assert IsolationPolicy.from_mapping({}).backend == "local"
    for bad, says in (({"backend": "docker"}, "backend"), ({"kubernetes": {"nodes": 3}}, "nodes"),
                      ({"kubernetes": {"exchange": "../keys"}}, "relative"),
                      ({"kubernetes": {"namespace": "Bad_Name"}}, "Kubernetes name")):
        with pytest.raises(ConfigurationError, match=says):
            IsolationPolicy.from_mapping(bad)


def test_the_trained_model_step_on_kubernetes_without_a_cluster_fails_in_one_line_and_registers_nothing(
        tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The asset takes the pod path when training.yaml says so: here the cluster call is refused (none
    exists), after the split was handed over; the step fails in one line, nothing is materialised and
    the per-run directory is gone. The reproducible check takes it too, and fails closed in one line."""
    import shutil

    import dagster as dg
    import yaml

    import resources
    from assets import data as data_stage
    from assets import training as training_stage
    from assets import validation as validation_stage
    config = tmp_path / "config"
    shutil.copytree(CODE_ROOT / "secure_ml" / "config", config)
    training = yaml.safe_load((config / "training.yaml").read_text())
    training["training"].update({"epochs": 2, "checkpoint_every": 0})
    training["isolation"]["backend"] = "kubernetes"
    (config / "training.yaml").write_text(yaml.safe_dump(training))
    monkeypatch.setenv("SECURE_ML_CONFIG", str(config))
    monkeypatch.setenv("SECURE_ML_TRAINING_IMAGE", IMAGE)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    settings = Settings.from_env()
    drop = land_file(settings, SAMPLE_CSV)
    modules = [data_stage, validation_stage, training_stage]
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize([*dg.load_assets_from_modules(modules)], instance=instance,
                                resources=resources.build_resources(settings),
                                run_config={"ops": {"dataset": {"config": {"drop": drop}}}}, raise_on_error=False)
    (failure,) = result.get_step_failure_events()
    assert failure.step_key == "trained_model"
    message = failure.step_failure_data.error.message.strip()
    assert "no cluster is configured" in message and message.count("\n") <= 1
    done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "trained_model" not in done and "validated_dataset" in done
    exchange = settings.home / "training-runs"
    assert not exchange.exists() or not any(exchange.iterdir())
    # The reproducible check takes the pod path too: a model trained locally, then the check alone with
    # isolation.backend kubernetes: its replay's pod cannot start here, so the check fails (fail closed), in one line.
    training["isolation"]["backend"] = "local"
    (config / "training.yaml").write_text(yaml.safe_dump(training))
    assets = [*dg.load_assets_from_modules(modules), *dg.load_asset_checks_from_modules(modules)]
    with dg.DagsterInstance.get() as instance:
        trained = dg.materialize(assets, instance=instance, resources=resources.build_resources(Settings.from_env()),
                                 selection=dg.AssetSelection.assets("trained_model").without_checks())
        assert trained.success
        training["isolation"]["backend"] = "kubernetes"
        (config / "training.yaml").write_text(yaml.safe_dump(training))
        check = dg.AssetCheckKey(dg.AssetKey("trained_model"), "reproducible")
        checked = dg.materialize(assets, instance=instance, resources=resources.build_resources(Settings.from_env()),
                                 selection=dg.AssetSelection.checks(check), raise_on_error=False)
    (evaluation,) = [e for e in checked.get_asset_check_evaluations() if e.check_name == "reproducible"]
    reason = str(evaluation.metadata["reason"].value)
    assert not evaluation.passed and "no cluster is configured" in reason and "\n" not in reason
    assert not exchange.exists() or not any(exchange.iterdir())
