"""`secure-ml deploy --target kubernetes` renders ONE server with every live model, each pinned by digest.

Touches: the release workflow end to end on a real home (encrypted store, audit log, SQLite registry,
Rego policies, real model-signing bundles and attestations) for two models, each registered, approved
and deployed to the kubernetes target through the gate; the rendered manifests are checked as
`k8s render --model NAME DIGEST` renders them (secure_ml.release.k8s_render). Does not touch: a
cluster, the trust policy's signed decisions (tests/test_signed_release.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from _release_fixtures import Keys, make_keys, make_model_dir, publish, release_for

from secure_ml.release import k8s_render
from secure_ml.release.deploy import Release
from secure_ml.settings import Settings

pytestmark = pytest.mark.slow  # deploys two signed models through the release workflow


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


def _for_model(release: Release, model: str) -> Release:
    """The same release acting for another model (what Release.from_settings(settings.for_model(...)) gives)."""
    registry = release.registry.for_model(model)
    release.registry = registry
    release.gatekeeper.registry = registry
    return release


def _deploy(release: Release, settings: Settings, keys: Keys, tmp_path: Path, seed: int) -> Any:
    published = publish(settings, make_model_dir(tmp_path / f"m{seed}", seed=seed), keys, tmp_path / f"p{seed}")
    version, _, _ = release.register(published.digest, published.evidence, actor="bob")
    version, decision = release.approve(version.version, identity="carol")
    assert decision.allowed, decision.reasons
    return release.deploy(version.version, actor="dave", target="kubernetes")


def _served(record: Any) -> dict[str, str]:
    manifests = list(yaml.safe_load_all((Path(record.location) / "manifests.yaml").read_text()))
    (server,) = [m for m in manifests if m.get("kind") == "Deployment"]
    pod = server["spec"]["template"]
    args = pod["spec"]["containers"][0]["args"]
    served = {args[i + 1]: args[i + 3].removeprefix("sha256:") for i, a in enumerate(args) if a == "--model"}
    digests = pod["metadata"]["annotations"][k8s_render.ANNOTATION].split(",")
    assert sorted(d.removeprefix("sha256:") for d in digests) == sorted(served.values())
    assert len(pod["spec"]["initContainers"]) == len(served)  # one verify-model per model
    return served


def test_one_server_serves_every_live_model_pinned_by_digest(settings: Settings, keys: Keys, tmp_path: Path) -> None:
    credit = release_for(settings, keys)
    first = _deploy(credit, settings, keys, tmp_path, 0)
    assert _served(first) == {"german_credit": first.model_digest}
    iris = _for_model(release_for(settings, keys), "iris")
    second = _deploy(iris, settings, keys, tmp_path, 1)
    # Deploying iris renders both: german_credit stays served, pinned to its live digest.
    assert _served(second) == {"german_credit": first.model_digest, "iris": second.model_digest}
    # A new german_credit version replaces only its own entry.
    third = _deploy(release_for(settings, keys), settings, keys, tmp_path, 2)
    assert _served(third) == {"german_credit": third.model_digest, "iris": second.model_digest}
    # The same objects `k8s render --model NAME DIGEST` (repeated) renders.
    expected = k8s_render.render(credit.config["kubernetes"], models=[
        k8s_render.PinnedModel("iris", second.version, second.model_digest),
        k8s_render.PinnedModel("german_credit", third.version, third.model_digest)])
    assert list(yaml.safe_load_all((Path(third.location) / "manifests.yaml").read_text())) == expected
