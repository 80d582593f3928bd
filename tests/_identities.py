"""People with keys and a signed trust policy for tests: the shipped roles.yaml's people, as keys.

    keys = trust_people(settings, tmp_path)          # {"carol": Path(".../carol.key"), ...}; owner signs
    monkeypatch.setenv("SECURE_ML_IDENTITY", str(keys["carol"]))

Every identity listed in roles.yaml gets an Ed25519 key in its own folder under ``root`` (outside
the home) and its roles in the trust policy; unauthenticated runs may land data and train (as the
demo's pipeline runs in these tests do) unless ``unauthenticated_may_train=False``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from secure_ml.custody.dsse import public_key
from secure_ml.governance.identity import load_identity, new_identity
from secure_ml.governance.trust import TrustPolicy, TrustStore, add_identity
from secure_ml.security.signing import ensure_signing_key, public_key_path
from secure_ml.settings import Settings


def trust_people(settings: Settings, root: Path, *, unauthenticated_may_train: bool = True,
                 aliases: dict[str, list[str]] | None = None,
                 extra: dict[str, list[str]] | None = None) -> dict[str, Path]:
    roles = settings.load_config("roles")
    release = settings.load_config("release")
    people = {**roles.get("identities", {}), **(extra or {})}
    keys: dict[str, Path] = {}
    for name in ["owner", *people]:
        keys[name] = new_identity(name, root / name)[0]
    owner = load_identity(keys["owner"])
    doc = TrustPolicy.new_document([owner.key], threshold=1, roles_config=roles, release_config=release,
                                   unauthenticated_roles=("data_steward", "ml_engineer") if unauthenticated_may_train
                                   else ())
    pipeline = ensure_signing_key(settings.home / "keys" / "model-signing.pem")
    add_identity(doc, "pipeline", roles=["pipeline"], key=public_key(public_key_path(pipeline)), model_signer=True)
    for name, held in people.items():
        held_roles: Any = [held] if isinstance(held, str) else list(held)
        add_identity(doc, name, roles=held_roles, key=load_identity(keys[name]).key,
                     aliases=(aliases or {}).get(name, []))
    TrustStore.from_home(settings.home).init(doc, [owner.signer])
    return keys
