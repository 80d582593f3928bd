"""`secure-ml keys rotate --reencrypt`: every data key replaced after a suspected leak, resumable.

Touches: a real store and keyring under a fresh SECURE_ML_HOME, the real CLI in a subprocess
killed with SIGKILL at several points of a re-encryption, and the real cipher (a data key
captured before the rotation is tried against the re-encrypted bytes). Does not touch: DVC's
own copies of old versions (kept under the keys they were sealed with, see README).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from secure_ml.custody import crypto
from secure_ml.custody.keys import LocalKeyring
from secure_ml.errors import Error
from secure_ml.settings import Settings
from tests.test_keys import CLI, all_readable, audit_count, fill_store, header_and_body, secure_ml


class _Keys:
    """A key source holding exactly the keys captured from a keyring file."""

    def __init__(self, keyring: dict[str, object]) -> None:
        entries = keyring["keys"]  # type: ignore[index]
        self._keys = {k: base64.b64decode(v["material"]) for k, v in entries.items()}  # type: ignore[union-attr]
        self._active = str(keyring["active"])

    def active_key(self) -> tuple[str, bytes]:
        return self._active, self._keys[self._active]

    def key(self, key_id: str) -> bytes:
        return self._keys[key_id]


def _reencrypted(settings: Settings, bodies: dict[str, bytes]) -> int:
    store = settings.artifact_store()
    return sum(header_and_body(store.path_for(d))[1] != body for d, body in bodies.items())


@pytest.mark.slow
def test_reencrypt_killed_at_any_point_leaves_everything_readable_and_a_rerun_finishes(
        settings: Settings, home: Path) -> None:
    bodies = fill_store(settings, 60, size=2000)
    digests = sorted(bodies)
    leaked = json.loads(settings.keyring_path.read_text())  # what an attacker captured before the leak was noticed
    victim = settings.artifact_store().path_for(digests[0])
    old_file = victim.read_bytes()
    old_header = old_file[:len(old_file) - len(bodies[digests[0]])]

    env = {**os.environ, "SECURE_ML_HOME": str(home), "SECURE_ML_ACTOR": "key-admin"}
    env.pop("SECURE_ML_KEK", None)
    states = []
    for target in (None, 0, 10, 30, 50):
        begun = audit_count(settings, "keys.rotate.begin")
        process = subprocess.Popen([CLI, "keys", "rotate", "--reencrypt"], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        if target is None:
            time.sleep(0.03)  # still importing
        else:
            deadline = time.monotonic() + 60
            while audit_count(settings, "keys.rotate.begin") == begun and time.monotonic() < deadline:
                time.sleep(0.001)
            while _reencrypted(settings, bodies) < target and time.monotonic() < deadline:
                time.sleep(0.001)
        process.send_signal(signal.SIGKILL)
        process.wait()
        all_readable(settings, digests)  # nothing unreadable after any kill
        states.append(_reencrypted(settings, bodies))
    assert any(0 < s < len(digests) for s in states), f"no kill landed mid-way: {states}"
    # A plain rotation does not take over an unfinished re-encryption (it would leave old data keys).
    refused = secure_ml(home, "keys", "rotate")
    assert refused.returncode == 2 and "--reencrypt" in refused.stderr

    done = secure_ml(home, "keys", "rotate", "--reencrypt")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("re-encrypted ")
    all_readable(settings, digests)
    assert _reencrypted(settings, bodies) == len(digests)  # every artifact has a new data key
    assert not (settings.artifact_store().root / ".reencrypt.journal").exists()
    keyring = LocalKeyring(settings.keyring_path)
    assert len(keyring.key_ids()) == 1 and keyring.key_ids()[0] not in leaked["keys"]

    # The captured key and wrapped data key open nothing any more: the old header on the new bytes fails.
    new_file = victim.read_bytes()
    _, new_body = header_and_body(victim)
    spliced = old_header + new_body
    with pytest.raises(Error):
        crypto.decrypt_stream(io.BytesIO(spliced), io.BytesIO(), _Keys(leaked))
    assert new_file != old_file
    finish = [e for e in settings.audit_log().entries() if e["action"] == "keys.rotate.finish"][-1]
    assert finish["details"]["reencrypted"] >= 1 and finish["outcome"] == "ok"
    settings.audit_log().verify()
