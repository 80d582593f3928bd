"""Key providers (secure_ml.keys) and key rotation (`secure-ml keys rotate`, store.rotate_keys).

Touches: LocalKeyring files with real permissions and ownership, EnvKeyProvider from an
environment mapping, Settings choosing between them, and rotation over a real store: through
the installed CLI in a subprocess, killed with SIGKILL at many points, and in-process with a
writer thread sealing artifacts while the rotation runs. Key material is looked for (base64 and
hex) in every repr, exception and audit log line these tests produce.
Does not touch: a cloud KMS or Vault provider (none exists yet), the Dagster event log (searched
for key material in tests/test_dataset_asset.py).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from secure_ml.custody import crypto
from secure_ml.custody.keys import KEY_BYTES, EnvKeyProvider, LocalKeyring, key_id_for
from secure_ml.custody.store import ArtifactStore, rotate_keys
from secure_ml.errors import ConfigurationError, Error, KeyUnavailable
from secure_ml.settings import Settings

pytestmark = pytest.mark.slow  # runs key rotation and the CLI in subprocesses

CLI = str(Path(sys.executable).parent / "secure-ml")


def secure_ml(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "SECURE_ML_HOME": str(home), "SECURE_ML_ACTOR": "key-admin", **env}
    if "SECURE_ML_KEK" not in env:
        environ.pop("SECURE_ML_KEK", None)
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=environ, timeout=120)


def secrets_in(keyring: Path) -> list[str]:
    """Every way a key in this keyring could be spelled in a leak."""
    found = []
    for entry in json.loads(keyring.read_text())["keys"].values():
        material = base64.b64decode(entry["material"])
        found += [entry["material"], material.hex(), base64.urlsafe_b64encode(material).decode()]
    return found


def assert_no_secret(text: str, keyring: Path) -> None:
    for secret in secrets_in(keyring):
        assert secret not in text


def header_and_body(path: Path) -> tuple[str, bytes]:
    with path.open("rb") as handle:
        header = crypto.read_header(handle)
    return header.key_id, path.read_bytes()[header.size:]


# -- LocalKeyring ---------------------------------------------------------------------------------
def test_keyring_is_created_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "keyring.json"
    keyring = LocalKeyring.create(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
    key_id, material = keyring.active_key()
    assert len(material) == KEY_BYTES and key_id == key_id_for(material) and key_id.startswith("kek-")
    assert keyring.key(key_id) == material
    assert LocalKeyring.create(path).active_key() == (key_id, material)  # idempotent
    with pytest.raises(ConfigurationError, match="already exists"):
        LocalKeyring.create(path, exist_ok=False)
    assert repr(keyring) == f"LocalKeyring({str(path)!r})"
    assert_no_secret(repr(keyring), path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o666, 0o610, 0o601])
def test_keyring_readable_by_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "keyring.json"
    LocalKeyring.create(path)
    path.chmod(mode)
    for use in (lambda k: k.active_key(), lambda k: k.key("kek-0"), lambda k: LocalKeyring.create(k.path)):
        with pytest.raises(KeyUnavailable) as caught:
            use(LocalKeyring(path))
        line = caught.value.explain()
        assert f"mode {mode:04o}" in line and f"chmod 600 {path}" in line and "\n" not in line
        assert_no_secret(line, path)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_keyring_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    LocalKeyring.create(path)
    os.chown(path, 4242, -1)
    with pytest.raises(KeyUnavailable, match="not owned by the current user"):
        LocalKeyring(path).active_key()


def test_missing_keyring(tmp_path: Path) -> None:
    with pytest.raises(KeyUnavailable, match=r"no keyring at .*run `secure-ml keys init`"):
        LocalKeyring(tmp_path / "nope.json").active_key()


@pytest.mark.parametrize("content", [
    "not json", "[]", '{"version": 2, "active": "a", "keys": {"a": {}}}',
    '{"version": 1, "active": "a", "keys": {}}', '{"version": 1, "keys": {}}',
])
def test_malformed_keyring(tmp_path: Path, content: str) -> None:
    path = tmp_path / "keyring.json"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(KeyUnavailable, match="malformed"):
        LocalKeyring(path).active_key()


@pytest.mark.parametrize("material,problem", [("%%%", "malformed"), (base64.b64encode(b"short").decode(), "256-bit")])
def test_malformed_key_material(tmp_path: Path, material: str, problem: str) -> None:
    path = tmp_path / "keyring.json"
    path.write_text(json.dumps({"version": 1, "active": "kek-a", "keys": {"kek-a": {"material": material}}}))
    path.chmod(0o600)
    with pytest.raises(KeyUnavailable, match=problem) as caught:
        LocalKeyring(path).active_key()
    assert material not in str(caught.value)


def test_unknown_key_id(tmp_path: Path) -> None:
    keyring = LocalKeyring.create(tmp_path / "keyring.json")
    with pytest.raises(KeyUnavailable, match="'kek-nope' is not in .*missing key, or the wrong keyring"):
        keyring.key("kek-nope")


# -- EnvKeyProvider -------------------------------------------------------------------------------
def b64(material: bytes) -> str:
    return base64.b64encode(material).decode()


def test_env_provider_active_and_retired_keys() -> None:
    active, old1, old2 = os.urandom(32), os.urandom(32), os.urandom(32)
    keys = EnvKeyProvider({"SECURE_ML_KEK": b64(active), "SECURE_ML_KEK_RETIRED": f" {b64(old1)}, ,{b64(old2)} "})
    assert keys.active_key() == (key_id_for(active), active)
    assert keys.key(key_id_for(old1)) == old1 and keys.key(key_id_for(old2)) == old2
    with pytest.raises(KeyUnavailable, match="not provided by SECURE_ML_KEK") as caught:
        keys.key(key_id_for(os.urandom(32)))
    text = repr(keys) + str(caught.value)
    assert repr(keys) == "EnvKeyProvider(variable='SECURE_ML_KEK')"
    for material in (active, old1, old2):
        assert b64(material) not in text and material.hex() not in text


@pytest.mark.parametrize("environ,problem", [
    ({}, "SECURE_ML_KEK is not set"),
    ({"SECURE_ML_KEK": ""}, "SECURE_ML_KEK is not set"),
    ({"SECURE_ML_KEK": "not base64!"}, "SECURE_ML_KEK is not valid base64"),
    ({"SECURE_ML_KEK": b64(b"x" * 16)}, "256-bit"),
    ({"SECURE_ML_KEK": b64(b"x" * 32), "SECURE_ML_KEK_RETIRED": "@@"}, "SECURE_ML_KEK_RETIRED is not valid base64"),
    ({"SECURE_ML_KEK": b64(b"x" * 32), "SECURE_ML_KEK_RETIRED": b64(b"y" * 31)}, "SECURE_ML_KEK_RETIRED must hold"),
])
def test_env_provider_refuses_bad_values(environ: dict[str, str], problem: str) -> None:
    with pytest.raises(KeyUnavailable, match=problem) as caught:
        EnvKeyProvider(environ)
    for value in environ.values():
        if len(value) > 8:
            assert value not in str(caught.value)


def test_settings_choose_the_provider(tmp_path: Path) -> None:
    kek = b64(os.urandom(32))
    assert isinstance(Settings.from_env({"SECURE_ML_HOME": str(tmp_path), "SECURE_ML_KEK": kek}).key_provider(),
                      EnvKeyProvider)
    assert isinstance(Settings.from_env({"SECURE_ML_HOME": str(tmp_path)}).key_provider(), LocalKeyring)
    with pytest.raises(KeyUnavailable, match="production needs its key-encryption key from a secret"):
        Settings.from_env({"SECURE_ML_HOME": str(tmp_path), "SECURE_ML_ENV": "production"}).key_provider()
    prod = Settings.from_env({"SECURE_ML_HOME": str(tmp_path), "SECURE_ML_ENV": "production", "SECURE_ML_KEK": kek})
    assert isinstance(prod.key_provider(), EnvKeyProvider)
    assert kek not in repr(prod) and kek not in repr(prod.key_provider()) and kek not in repr(prod.artifact_store())


def test_init_makes_no_keyring_when_a_key_is_handed_over_as_a_file(tmp_path: Path) -> None:
    from secure_ml.settings import init_home

    key_file = tmp_path / "kek"
    key_file.write_text(b64(os.urandom(32)))
    key_file.chmod(0o600)
    handed = Settings.from_env({"SECURE_ML_HOME": str(tmp_path / "a"), "SECURE_ML_KEK_FILE": str(key_file)})
    init_home(handed)
    assert not handed.keyring_path.exists()
    local = Settings.from_env({"SECURE_ML_HOME": str(tmp_path / "b")})
    init_home(local)
    assert local.keyring_path.exists()


def test_env_keys_through_the_cli_with_a_retired_key(tmp_path: Path) -> None:
    old, new = b64(os.urandom(32)), b64(os.urandom(32))
    home = tmp_path / "home"
    plain, sealed, back = tmp_path / "p", tmp_path / "s", tmp_path / "b"
    plain.write_bytes(b"ci secret test" * 1000)
    assert secure_ml(home, "encrypt", str(plain), str(sealed), SECURE_ML_KEK=old).returncode == 0
    missing = secure_ml(home, "decrypt", str(sealed), str(back), SECURE_ML_KEK=new)
    assert missing.returncode == 2 and "key error" in missing.stderr and not back.exists()
    assert old not in missing.stderr and new not in missing.stderr
    ok = secure_ml(home, "decrypt", str(sealed), str(back), SECURE_ML_KEK=new, SECURE_ML_KEK_RETIRED=old)
    assert ok.returncode == 0 and back.read_bytes() == plain.read_bytes()
    refused = secure_ml(home, "keys", "rotate", SECURE_ML_KEK=new)
    assert refused.returncode == 2 and "rotate them in your secret store" in refused.stderr


# -- rotation -------------------------------------------------------------------------------------
def fill_store(settings: Settings, count: int, size: int = 3000) -> dict[str, bytes]:
    store = settings.artifact_store()
    bodies = {}
    for _ in range(count):
        ref = store.put_bytes(os.urandom(size))
        bodies[ref.sha256] = header_and_body(store.root / ref.location)[1]
    return bodies


def audit_count(settings: Settings, action: str) -> int:
    return sum(1 for e in settings.audit_log().entries() if e["action"] == action)


def all_readable(settings: Settings, digests: list[str]) -> None:
    store = settings.artifact_store()
    for digest in digests:
        store.verify(digest)


def test_keys_rotate_rewraps_without_reencrypting(settings: Settings, home: Path) -> None:
    bodies = fill_store(settings, 12, size=70_000)
    old_id = LocalKeyring(settings.keyring_path).active_key()[0]
    result = secure_ml(home, "keys", "rotate")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "re-wrapped 12 artifacts (0 already current, 1 old keys retired)"
    keyring = LocalKeyring(settings.keyring_path)
    new_id = keyring.active_key()[0]
    assert new_id != old_id and keyring.key_ids() == [new_id]
    store = settings.artifact_store()
    for digest, body in bodies.items():
        key_id, after = header_and_body(store.path_for(digest))
        assert key_id == new_id
        assert after == body  # every chunk byte-identical: only the key slot was rewritten
        store.verify(digest)
    actions = [e["action"] for e in settings.audit_log().entries()]
    assert actions[-2:] == ["keys.rotate.begin", "keys.rotate.finish"]
    settings.audit_log().verify()
    assert_no_secret(settings.audit_path.read_text(), settings.keyring_path)
    assert_no_secret(result.stdout + result.stderr, settings.keyring_path)


def test_keys_init_cli_is_idempotent_and_audited(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = secure_ml(home, "keys", "init")
    assert first.returncode == 0 and first.stdout.startswith("created keyring")
    again = secure_ml(home, "keys", "init")
    assert again.returncode == 0 and again.stdout.startswith("keyring exists")
    keyring = home / "keys" / "keyring.json"
    assert oct(keyring.stat().st_mode & 0o777) == "0o600"
    log = (home / "audit" / "audit.jsonl").read_text()
    assert log.count('"keys.init"') == 2
    assert_no_secret(log + first.stdout + again.stdout, keyring)


def test_rotation_keeps_the_key_an_unreadable_artifact_needs(settings: Settings, home: Path) -> None:
    bodies = fill_store(settings, 3)
    old_id = LocalKeyring(settings.keyring_path).active_key()[0]
    store = settings.artifact_store()
    victim = store.path_for(sorted(bodies)[0])
    blob = bytearray(victim.read_bytes())
    blob[crypto.read_header(victim.open("rb")).size - 1] ^= 1  # inside the wrapped data key
    victim.write_bytes(bytes(blob))
    result = secure_ml(home, "keys", "rotate")
    assert result.returncode == 1
    assert result.stderr.strip() == "1 artifacts could not be re-wrapped; see `secure-ml audit tail`"
    assert old_id in LocalKeyring(settings.keyring_path).key_ids()  # not stranded by the rotation
    all_readable(settings, sorted(bodies)[1:])
    fails = [e for e in settings.audit_log().entries() if e["action"] == "keys.rotate.artifact"]
    assert fails and "does not open this artifact" in fails[0]["details"]["reason"]


def test_two_rotations_at_once_are_refused(settings: Settings, home: Path) -> None:
    fill_store(settings, 1)
    lock = settings.artifacts_dir / ".rotate.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        result = secure_ml(home, "keys", "rotate")
    finally:
        os.close(fd)
    assert result.returncode == 2
    assert result.stderr.strip() == "secure-ml: configuration error: another key rotation is running on this store"
    assert len(LocalKeyring(settings.keyring_path).key_ids()) == 1


def test_rotation_with_writers_running_strands_nothing(settings: Settings) -> None:
    """A writer thread seals artifacts while the rotation runs; afterwards every one of them
    opens with the one remaining key."""
    fill_store(settings, 40)
    written: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        store = settings.artifact_store()
        while not stop.is_set():
            written.append(store.put_bytes(os.urandom(500)).sha256)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.05)
        counts = rotate_keys(settings.artifact_store(), LocalKeyring(settings.keyring_path))
    finally:
        stop.set()
        thread.join()
    assert counts["unreadable"] == 0 and counts["retired"] == 1
    keyring = LocalKeyring(settings.keyring_path)
    assert len(keyring.key_ids()) == 1 and written
    store: ArtifactStore = settings.artifact_store()
    for path in store.objects():
        assert header_and_body(path)[0] == keyring.active_key()[0]
    all_readable(settings, written)


def rewrapped_under(settings: Settings, key_id: str, digests: list[str]) -> int:
    store = settings.artifact_store()
    count = 0
    for digest in digests:  # each artifact is replaced by an atomic rename, so it always opens
        with store.path_for(digest).open("rb") as handle:
            count += crypto.peek_key_id(handle) == key_id
    return count


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.slow
def test_rotation_killed_at_many_points_never_strands_an_artifact(settings: Settings, home: Path) -> None:
    """SIGKILL `secure-ml keys rotate` while starting, right after it saved its new key, and after
    it re-wrapped 5, 20, 45, 75 and 100 of 120 artifacts (each run resuming the last). After
    every kill every artifact still decrypts; a final rotate finishes the job with one key left."""
    bodies = fill_store(settings, 120, size=1000)
    digests = sorted(bodies)
    first_id = LocalKeyring(settings.keyring_path).active_key()[0]
    env = {**os.environ, "SECURE_ML_HOME": str(home), "SECURE_ML_ACTOR": "key-admin"}
    env.pop("SECURE_ML_KEK", None)
    states = []
    for target in (None, 0, 5, 20, 45, 75, 100):
        begun = audit_count(settings, "keys.rotate.begin")
        process = subprocess.Popen([CLI, "keys", "rotate"], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        if target is None:
            time.sleep(0.03)  # still importing
        else:
            deadline = time.monotonic() + 60
            while audit_count(settings, "keys.rotate.begin") == begun and time.monotonic() < deadline:
                time.sleep(0.001)
            new_id = LocalKeyring(settings.keyring_path).active_key()[0]
            while rewrapped_under(settings, new_id, digests) < target and time.monotonic() < deadline:
                time.sleep(0.001)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
        all_readable(settings, digests)
        key_ids = [header_and_body(settings.artifact_store().path_for(d))[0] for d in digests]
        assert set(key_ids) <= set(LocalKeyring(settings.keyring_path).key_ids())  # no key dropped early
        states.append(tuple(sorted(Counter(key_ids).values())))
    print("artifacts per key after each kill:", states)
    partial = [state for state in states if len(state) > 1]
    assert len(partial) >= 4, f"too few kills landed mid-rotation: {states}"
    done = secure_ml(home, "keys", "rotate")
    assert done.returncode == 0, done.stderr
    keyring = LocalKeyring(settings.keyring_path)
    (final_id,) = keyring.key_ids()
    assert final_id != first_id
    for digest in digests:
        key_id, body = header_and_body(settings.artifact_store().path_for(digest))
        assert key_id == final_id and body == bodies[digest]  # chunks never re-encrypted
    all_readable(settings, digests)
    assert len(list(settings.artifact_store().objects())) == 120
    settings.audit_log().verify()


def test_no_key_material_in_errors_of_any_bad_input(settings: Settings) -> None:
    """Every error a wrong, missing or damaged key produces, searched for the key."""
    store = settings.artifact_store()
    ref = store.put_bytes(b"x" * 5000)
    path = store.root / ref.location
    messages = []
    original = path.read_bytes()
    for position in range(0, crypto.read_header(path.open("rb")).size):
        blob = bytearray(original)
        blob[position] ^= 0x10
        path.write_bytes(bytes(blob))
        try:
            store.verify(ref.sha256)
        except Error as exc:
            messages.append(exc.explain())
    path.write_bytes(original)
    assert messages
    text = "\n".join(messages) + settings.audit_path.read_text()
    assert_no_secret(text, settings.keyring_path)
