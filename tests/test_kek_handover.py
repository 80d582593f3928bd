"""Handing the KEK to a process without leaving it where a child can find it.

Touches: real subprocesses started with ``SECURE_ML_KEK`` in their environment (the CI
convention), their own ``/proc/self/environ`` and the environment of the children they start; KEK
files with real permissions and ownership; a KEK on stdin through the real CLI; the real sandbox
reading the parent's ``/proc`` and the keyring. Does not touch: a KMS or Vault (none is shipped).
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from secure_ml.custody.keys import key_id_for, read_kek_file
from secure_ml.errors import KeyUnavailable

pytestmark = pytest.mark.slow  # starts CLI and sandbox processes

REPO = Path(__file__).resolve().parents[1]
CHILD = r"""
import os, subprocess, sys
from secure_ml.settings import Settings
key_id, _ = Settings.from_env().key_provider().active_key()
kek = sys.argv[1]
inherited = subprocess.run(["env"], capture_output=True, text=True).stdout
own = open("/proc/self/environ", "rb").read()
print(key_id, kek in inherited, kek.encode() in own, "SECURE_ML_KEK" in os.environ)
"""


def _python(code: str, *args: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SECURE_ML_KEK")}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                          input=stdin, env={**base, "PYTHONPATH": str(REPO), **env})


def test_a_kek_in_the_environment_is_taken_out_before_any_child_exists(tmp_path: Path) -> None:
    material = os.urandom(32)
    kek = base64.b64encode(material).decode()
    done = _python(CHILD, kek, env={"SECURE_ML_KEK": kek, "SECURE_ML_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr
    # The key works; a child inherits nothing; even the process's original environment block is wiped.
    assert done.stdout.split() == [key_id_for(material), "False", "False", "False"]


def test_a_kek_file_must_be_private_and_stdin_hands_it_over_too(tmp_path: Path) -> None:
    material = os.urandom(32)
    kek = base64.b64encode(material).decode()
    path = tmp_path / "kek"
    path.write_text(kek + "\n")
    path.chmod(0o644)
    with pytest.raises(KeyUnavailable, match=r"accessible to group or others \(mode 0644\); run: chmod 600"):
        read_kek_file(str(path))
    path.chmod(0o600)
    assert read_kek_file(str(path)) == kek
    with pytest.raises(KeyUnavailable, match="does not exist"):
        read_kek_file(str(tmp_path / "missing"))
    from_file = _python(CHILD, kek, env={"SECURE_ML_KEK_FILE": str(path), "SECURE_ML_HOME": str(tmp_path / "h")})
    assert from_file.returncode == 0 and from_file.stdout.split()[0] == key_id_for(material), from_file.stderr
    path.chmod(0o640)
    refused = subprocess.run([sys.executable, "-m", "secure_ml", "encrypt", str(path), str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=60, cwd=str(REPO),
                             env={**os.environ, "PYTHONPATH": str(REPO), "SECURE_ML_KEK_FILE": str(path),
                                  "SECURE_ML_HOME": str(tmp_path / "h")})
    assert refused.returncode == 2 and "chmod 600" in refused.stderr and kek not in refused.stderr
    assert not (tmp_path / "x").exists()
    plain = tmp_path / "plain"
    plain.write_bytes(b"through stdin")
    on_stdin = subprocess.run([sys.executable, "-m", "secure_ml", "encrypt", str(plain), str(tmp_path / "sealed")],
                              input=kek + "\n", capture_output=True, text=True, timeout=60, cwd=str(REPO),
                              env={**os.environ, "PYTHONPATH": str(REPO), "SECURE_ML_KEK_FILE": "-",
                                   "SECURE_ML_HOME": str(tmp_path / "h")})
    assert on_stdin.returncode == 0, on_stdin.stderr
    back = subprocess.run([sys.executable, "-m", "secure_ml", "decrypt", str(tmp_path / "sealed"), "-"],
                          capture_output=True, timeout=60, cwd=str(REPO),
                          env={**os.environ, "PYTHONPATH": str(REPO), "SECURE_ML_KEK": kek,
                               "SECURE_ML_HOME": str(tmp_path / "h")})
    assert back.stdout == b"through stdin"
