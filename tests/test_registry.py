"""The model registry (secure_ml/release/registry.py) on a real SQLite file.

Touches: registration by digest (idempotent), reference resolution (names, digests, stages,
hostile strings), stage moves (one production at a time, stale decisions refused), approvals,
history, deployment records and rollback targets, concurrent writers in separate processes, a
damaged database file, and file permissions.
Does not touch: policy decisions or verification (tests/test_policy.py, tests/test_deploy.py).
"""

from __future__ import annotations

import multiprocessing
import stat
from pathlib import Path

import pytest

from secure_ml.errors import BadInput, ConfigurationError, PolicyDenied
from secure_ml.release.registry import Registry


def digest(n: int) -> str:
    return f"{n:064x}"


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry" / "registry.db")


def test_register_names_versions_and_is_idempotent_per_digest(registry: Registry) -> None:
    first, created = registry.register(digest(1), {"note": "a"}, actor="bob")
    again, created_again = registry.register(digest(1), {"note": "changed"}, actor="mallory")
    second, _ = registry.register(digest(2), {}, actor="bob")
    assert (first.version, created, again.version, created_again, second.version) == ("v1", True, "v1", False, "v2")
    assert again.evidence == {"note": "a"} and again.registered_by == "bob"  # a re-register changes nothing
    assert first.stage == "candidate"
    assert [e["action"] for e in registry.history()] == ["register", "register"]


@pytest.mark.parametrize("bad", ["", "latest", "v0", "v1; DROP TABLE versions", "../v1", "V1", "sha256:zz",
                                 "sha256:abc", "v" + "9" * 20])
def test_hostile_or_malformed_references_are_refused(registry: Registry, bad: str) -> None:
    registry.register(digest(1), {}, actor="bob")
    with pytest.raises(BadInput):
        registry.get(bad)


def test_references_by_digest_prefix_and_stage(registry: Registry) -> None:
    registry.register("ab" * 32, {}, actor="bob")
    registry.register("ac" * 32, {}, actor="bob")
    assert registry.resolve("sha256:" + "ab" * 32) == "v1"
    assert registry.resolve("sha256:acacacac") == "v2"
    with pytest.raises(BadInput, match="names 0 model versions"):
        registry.resolve("sha256:ffffffff")
    assert registry.resolve("candidate") == "v2"
    with pytest.raises(BadInput, match="no model version is in production"):
        registry.resolve("production")
    with pytest.raises(BadInput, match="no model version v9"):
        registry.get("v9")
    with pytest.raises(BadInput, match="not a model digest"):
        registry.register("../../etc/passwd", {}, actor="bob")


def test_only_one_version_is_in_production(registry: Registry) -> None:
    for n in (1, 2):
        registry.register(digest(n), {}, actor="bob")
    registry.set_stage("v1", "production", actor="carol")
    registry.set_stage("v2", "production", actor="carol")
    assert {v.version: v.stage for v in registry.versions()} == {"v1": "archived", "v2": "production"}
    assert registry.production().version == "v2"  # type: ignore[union-attr]
    archive = [e for e in registry.history("v1") if e["action"] == "archive"][0]
    assert archive["details"]["replaced_by"] == "v2"
    with pytest.raises(BadInput, match="unknown stage"):
        registry.set_stage("v1", "prod", actor="carol")


def test_a_stale_decision_is_refused(registry: Registry) -> None:
    registry.register(digest(1), {}, actor="bob")
    registry.set_stage("v1", "archived", actor="someone-else")
    with pytest.raises(PolicyDenied, match="v1 is archived now"):
        registry.set_stage("v1", "production", actor="carol", expect=("candidate", "staging"))
    assert registry.get("v1").stage == "archived"


def test_approvals_are_recorded_once(registry: Registry) -> None:
    registry.register(digest(1), {}, actor="bob")
    version = registry.add_approval("v1", "carol", roles=["approver"])
    assert [a["identity"] for a in version.approvals] == ["carol"]
    with pytest.raises(PolicyDenied, match="already approved"):
        registry.add_approval("v1", "carol", roles=["approver"])
    assert len(registry.get("v1").approvals) == 1


def test_deployment_history_and_rollback_targets(registry: Registry) -> None:
    for n in (1, 2, 3):
        registry.register(digest(n), {}, actor="bob")
    assert registry.current_deployment("local") is None and registry.previous_deployment("local") is None
    registry.record_deployment(actor="dave", target="local", version="v1", model_digest=digest(1), status="deployed")
    registry.record_deployment(actor="dave", target="local", version="v2", model_digest=digest(2), status="deployed")
    assert registry.current_deployment("local").version == "v2"  # type: ignore[union-attr]
    assert registry.previous_deployment("local").version == "v1"  # type: ignore[union-attr]
    # v3 fails its health check and is rolled back: the rollback target skips it.
    registry.record_deployment(actor="dave", target="local", version="v3", model_digest=digest(3), status="deployed")
    registry.record_deployment(actor="dave", target="local", version="v3", model_digest=digest(3),
                               status="rolled_back", reason="health check failed")
    registry.record_deployment(actor="dave", target="local", version="v2", model_digest=digest(2), status="rollback")
    assert registry.current_deployment("local").version == "v2"  # type: ignore[union-attr]
    assert registry.previous_deployment("local").version == "v1"  # type: ignore[union-attr]
    assert registry.current_deployment("kubernetes") is None
    status = registry.status()
    assert status["deployed"]["local"]["version"] == "v2" and len(status["versions"]) == 3


def _writer(path: str, worker: int, count: int) -> None:
    registry = Registry(path)
    for i in range(count):
        version, _ = registry.register(digest(1000 * worker + i), {"worker": worker}, actor=f"w{worker}")
        registry.add_approval(version.version, f"approver-{worker}", roles=["approver"])
        registry.record_deployment(actor=f"w{worker}", target="local", version=version.version,
                                   model_digest=version.model_digest, status="deployed")


@pytest.mark.slow
def test_concurrent_writers_in_separate_processes(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    Registry(path)
    workers, count = 4, 15
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_writer, args=(str(path), w, count)) for w in range(workers)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
        assert p.exitcode == 0
    registry = Registry(path)
    versions = registry.versions()
    assert len(versions) == workers * count
    assert sorted(int(v.version[1:]) for v in versions) == list(range(1, workers * count + 1))  # no gaps, no dupes
    assert all(len(v.approvals) == 1 for v in versions)
    assert len(registry.deployments("local")) == workers * count
    assert len(registry.history()) == workers * count * 3  # register + approve + deploy, none lost


def test_a_damaged_registry_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigurationError, match="is damaged"):
        Registry(path)


def test_the_registry_file_is_private(registry: Registry) -> None:
    assert stat.S_IMODE(registry.path.stat().st_mode) == 0o600
