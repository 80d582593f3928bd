"""The encrypted, content-addressed artifact store (secure_ml.store).

Touches: ArtifactStore on a real initialised home (keyring 0600, audit log), real AES-GCM,
Parquet through pandas/pyarrow, and the files under objects/ as an attacker with write access to
the store would change them (flipped bytes, swapped objects, hostile tree manifests).
Does not touch: Dagster (tests/test_dataset_asset.py), key rotation (tests/test_keys.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from secure_ml.custody.store import ArtifactStore
from secure_ml.errors import BadInput, Error, IntegrityError
from secure_ml.settings import Settings


@pytest.fixture
def store(settings: Settings) -> ArtifactStore:
    return settings.artifact_store()


def audit_entries(settings: Settings, action: str) -> list[dict]:
    return [e for e in settings.audit_log().entries() if e["action"] == action]


def test_put_and_get_every_kind(store: ArtifactStore, settings: Settings, tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    ref = store.put_bytes(data, details={"why": "test"})
    assert ref.sha256 == hashlib.sha256(data).hexdigest() and ref.size == len(data)
    assert ref.location == f"objects/{ref.sha256[:2]}/{ref.sha256}.smle"
    assert store.get_bytes(ref.sha256) == data
    assert store.verify(ref.sha256) == len(data)
    stored = store.root / ref.location
    assert data[:4096] not in stored.read_bytes()  # encrypted at rest
    assert oct(stored.stat().st_mode & 0o777) == "0o600"

    assert store.get_json(store.put_json({"a": [1, 2]}).sha256) == {"a": [1, 2]}
    frame = pd.DataFrame({"x": [1, 2, 3], "y": ["a", "b", "c"]})
    pd.testing.assert_frame_equal(store.get_dataframe(store.put_dataframe(frame).sha256), frame)
    assert store.get_bytes(store.put_bytes(b"").sha256) == b""

    out = tmp_path / "copy.bin"
    assert store.get_file(ref.sha256, out) == len(data) and out.read_bytes() == data
    writes = audit_entries(settings, "store.write")
    assert writes[0]["subject"] == f"sha256:{ref.sha256}" and writes[0]["actor"] == "test-engineer"
    assert writes[0]["details"] == {"kind": "bytes", "size": len(data), "why": "test"}
    assert not list((store.root / "staging").iterdir())  # nothing left behind


def test_put_is_idempotent_for_the_same_bytes(store: ArtifactStore) -> None:
    first, second = store.put_bytes(b"same"), store.put_bytes(b"same")
    assert first.sha256 == second.sha256
    assert len(list(store.objects())) == 1


def test_tampered_object_raises_integrity_error_and_is_audited(store: ArtifactStore, settings: Settings) -> None:
    ref = store.put_bytes(os.urandom(3 << 20))
    path = store.root / ref.location
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))
    for read in (store.get_bytes, store.verify):
        with pytest.raises(IntegrityError, match=rf"sha256:{ref.sha256[:16]}.*chunk 1 failed authentication"):
            read(ref.sha256)
    fails = [e for e in audit_entries(settings, "store.verify") if e["outcome"] == "fail"]
    assert len(fails) == 2 and fails[0]["subject"] == f"sha256:{ref.sha256}"
    assert "failed authentication" in fails[0]["details"]["reason"]
    settings.audit_log().verify()


def test_get_file_leaves_nothing_when_the_object_is_tampered(store: ArtifactStore, tmp_path: Path) -> None:
    ref = store.put_bytes(os.urandom(3 << 20))
    path = store.root / ref.location
    path.write_bytes(path.read_bytes()[:-100])  # truncated: the first chunks still authenticate
    out = tmp_path / "out" / "plain.bin"
    with pytest.raises(IntegrityError, match="truncated|failed authentication"):
        store.get_file(ref.sha256, out)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_a_swapped_object_is_caught_by_its_digest(store: ArtifactStore, settings: Settings) -> None:
    """Object B copied over object A: every tag is valid, but it decrypts to the wrong digest."""
    a, b = store.put_bytes(b"approved data"), store.put_bytes(b"poisoned data")
    (store.root / a.location).write_bytes((store.root / b.location).read_bytes())
    with pytest.raises(IntegrityError, match=rf"decrypts to sha256:{b.sha256[:16]}.*it was replaced"):
        store.get_bytes(a.sha256)
    assert audit_entries(settings, "store.verify")[-1]["outcome"] == "fail"


def test_missing_object_and_malformed_digests(store: ArtifactStore) -> None:
    with pytest.raises(IntegrityError, match="missing from the store"):
        store.get_bytes("0" * 64)
    for bad in ("../../etc/passwd", "A" * 64, "0" * 63, "", "0" * 64 + "/x"):
        with pytest.raises(BadInput, match="not a SHA-256 digest"):
            store.get_bytes(bad)


def test_a_stream_that_fails_midway_leaves_nothing(store: ArtifactStore, settings: Settings) -> None:
    class Failing(io.RawIOBase):
        sent = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
            if self.sent > 3 << 20:
                raise OSError("disk went away")
            n = len(buffer)
            buffer[:n] = b"\xab" * n
            self.sent += n
            return n

    before = len(audit_entries(settings, "store.write"))
    with pytest.raises(OSError, match="disk went away"):
        store.put_stream(Failing())
    assert list(store.objects()) == []
    assert list((store.root / "staging").iterdir()) == []
    assert len(audit_entries(settings, "store.write")) == before


def test_tree_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(os.urandom(5000))
    (src / "sub" / "config.json").write_text('{"a": 1}')
    ref = store.put_tree(src, details={"role": "model"})
    out = tmp_path / "restored"
    files = store.get_tree(ref.sha256, out)
    assert set(files) == {"model.safetensors", "sub/config.json"}
    for name in files:
        assert (out / name).read_bytes() == (src / name).read_bytes()
    with pytest.raises(BadInput, match="output exists"):
        store.get_tree(ref.sha256, out)


HOSTILE = {
    "parent-traversal": {"../escape.txt": None},
    "nested-traversal": {"a/../../escape.txt": None},
    "absolute": {"/tmp/escape.txt": None},
    "dot": {"./x": None},
    "empty": {"": None},
    "backslash": {"..\\escape.txt": None},
    "double-slash": {"a//b": None},
    "file-and-dir": {"a": None, "a/b": None},
    "bad-digest": {"x": "../../objects"},
    "not-a-dict": ["x"],
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_get_tree_refuses_hostile_manifests(store: ArtifactStore, tmp_path: Path, kind: str) -> None:
    inner = store.put_bytes(b"payload").sha256
    files = HOSTILE[kind]
    if isinstance(files, dict):
        files = {name: digest or inner for name, digest in files.items()}
    manifest = store.put_bytes(json.dumps({"format": "secure-ml-tree/1", "files": files}).encode(), kind="tree")
    out = tmp_path / "deep" / "out"
    with pytest.raises(IntegrityError) as caught:
        store.get_tree(manifest.sha256, out)
    assert "\n" not in caught.value.explain()
    assert not out.exists() and (not out.parent.exists() or list(out.parent.iterdir()) == [])
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "deep" / "escape.txt").exists()


def test_get_tree_refuses_what_is_not_a_tree(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match="not a stored directory"):
        store.get_tree(store.put_json({"format": "something else"}).sha256, tmp_path / "x")
    with pytest.raises(BadInput, match="not JSON"):
        store.get_tree(store.put_bytes(b"\x00\x01").sha256, tmp_path / "y")


def test_a_tampered_file_inside_a_tree_leaves_no_directory(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "model"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a" * 100)
    (src / "b.bin").write_bytes(b"b" * 100)
    ref = store.put_tree(src)
    victim = store.path_for(hashlib.sha256(b"b" * 100).hexdigest())
    blob = bytearray(victim.read_bytes())
    blob[-1] ^= 0x80
    victim.write_bytes(bytes(blob))
    with pytest.raises(Error):
        store.get_tree(ref.sha256, tmp_path / "restored")
    assert not (tmp_path / "restored").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "secure_ml_home"]


def test_repr_names_no_secrets(store: ArtifactStore, settings: Settings) -> None:
    assert repr(store) == f"ArtifactStore({str(store.root)!r})"
    assert "material" not in repr(store.keys) and str(settings.keyring_path) in repr(store.keys)
