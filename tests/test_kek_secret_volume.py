"""The KEK as a Kubernetes Secret volume gives it to a non-root pod, and what the KEK file reader refuses.

Touches: the real reader (secure_ml.custody.keys.read_kek_file) in a real process running as the
pod's user (UID 10001, supplementary group = the pod's fsGroup 10001) over a real Secret-volume
layout: a tmpfs holding ``..<timestamp>/kek`` owned root:10001 mode 0440, the ``..data`` symlink to
it and ``kek -> ..data/kek``, remounted read-only as the kubelet mounts it (a private mount
namespace, so it needs root; skipped otherwise). The rule itself (kek_file_problem) is also checked
on file statuses for the cases no unprivileged test can lay out. Does not touch: a kubelet.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from secure_ml.custody.keys import kek_file_problem, read_kek_file
from secure_ml.errors import KeyUnavailable

REPO = Path(__file__).resolve().parents[1]
POD_UID = POD_GID = 10001

# Lay out a Secret volume as the kubelet does, mount it read-only, become the pod's user, read.
KUBELET = r"""
import json, os, subprocess, sys
from pathlib import Path
vol, writable, kek = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "secret-volume", str(vol)], check=True)
stamp = vol / "..2026_11_30_15_00_00.000000001"
stamp.mkdir(mode=0o755)
files = {"kek": (0o440, 10001), "wide": (0o444, 10001), "group-writable": (0o460, 10001),
         "other-group": (0o440, 4242), "owner-rw": (0o640, 10001)}
for name, (mode, gid) in files.items():
    (stamp / name).write_text(kek + "\n")
    os.chown(stamp / name, 0, gid)
    os.chmod(stamp / name, mode)
(vol / "..data").symlink_to(stamp.name)
for name in files:
    (vol / name).symlink_to(f"..data/{name}")
(vol / "escape").symlink_to("../outside")
subprocess.run(["mount", "-o", "remount,ro", str(vol)], check=True)
# The same file as a Secret volume's, but on a writable mount.
(writable / "kek").write_text(kek + "\n")
os.chown(writable / "kek", 0, 10001)
os.chmod(writable / "kek", 0o440)
from secure_ml.custody.keys import read_kek_file   # imported first: the pod's user cannot read root's stdlib here
from secure_ml.errors import KeyUnavailable
os.setgroups([10001]); os.setgid(10001); os.setuid(10001)   # the pod: runAsUser/runAsGroup/fsGroup 10001
seen = {}
for path in [*(vol / n for n in [*files, "escape"]), writable / "kek"]:
    try:
        seen[f"{path.parent.name}/{path.name}"] = "ok" if read_kek_file(str(path)) == kek else "wrong key"
    except KeyUnavailable as exc:
        seen[f"{path.parent.name}/{path.name}"] = str(exc)
print(json.dumps(seen))
"""


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--mount", "true"], capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="laying out a read-only Secret volume needs root and mount namespaces")
def test_a_secret_volume_as_the_kubelet_mounts_it_is_read_and_loose_files_in_it_are_refused() -> None:
    kek = base64.b64encode(os.urandom(32)).decode()
    # Not under pytest's root-only tmp_path: the pod's user must be able to walk to the volume.
    with tempfile.TemporaryDirectory(prefix="secure-ml-secret-volume-") as tmp:
        seen = _read_as_the_pod(Path(tmp), kek)
    assert seen.pop("volume/kek") == "ok"  # root:fsGroup 0440 via ..data, read-only: a Secret volume's file
    assert all(kek not in message for message in seen.values())
    assert all("\n" not in message for message in seen.values())
    assert "accessible to group or others (mode 0444)" in seen["volume/wide"]
    assert "accessible to group or others (mode 0460)" in seen["volume/group-writable"]
    assert "Permission denied" in seen["volume/other-group"]  # not even openable by the pod's user
    assert "is root's with mode 0640" in seen["volume/owner-rw"]
    assert "symlink leading out of its directory" in seen["volume/escape"]
    assert "is root's on a writable mount" in seen["writable/kek"]  # the same file, not on a Secret volume


def _read_as_the_pod(tmp: Path, kek: str) -> dict[str, str]:
    vol, writable = tmp / "volume", tmp / "writable"
    vol.mkdir()
    writable.mkdir()
    for where in (tmp, vol, writable):
        where.chmod(0o755)  # the pod's user walks to them (the files keep their own modes)
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", KUBELET,
                           str(vol), str(writable), kek], capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO),
                               "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/nonexistent"})
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(json.loads(done.stdout))


def _status(mode: int, uid: int, gid: int, kind: int = stat.S_IFREG) -> os.stat_result:
    return os.stat_result((kind | mode, 1, 1, 1, uid, gid, 44, 0, 0, 0))


def test_the_rule_accepts_exactly_a_private_file_or_a_secret_volumes_file() -> None:
    me, group = os.geteuid(), os.getegid()
    pod_group = group if me != 0 else POD_GID  # as root, a group this process is in is its own
    ok = [(_status(0o600, me, group), False), (_status(0o400, me, group), False),
          (_status(0o440, 0, group), True), (_status(0o400, 0, group), True)]
    for info, read_only in ok:
        assert kek_file_problem(info, read_only=read_only) is None, (oct(info.st_mode), read_only)
    refused = {
        "others may read": (_status(0o604, me, group), False, "accessible to group or others"),
        "others may write": (_status(0o602, me, group), False, "accessible to group or others"),
        "group may write": (_status(0o460, 0, group), True, "accessible to group or others"),
        "group reads a private file": (_status(0o640, me, group), False, "accessible to group or others")
        if me != 0 else (_status(0o640, 0, group), True, "accessible to group or others"),
        "another owner": (_status(0o600, 4242, group), False, "not owned by the current user"),
        "root's on a writable mount": (_status(0o440, 0, group), False, "writable mount"),
        "a directory": (_status(0o600, me, group, stat.S_IFDIR), False, "not a regular file"),
    }
    if me != 0:
        refused["a group this process is not in"] = (_status(0o440, 0, 4242), True, "which this process is not in")
        refused["root's, not a Secret's mode"] = (_status(0o640, 0, pod_group), True, "not a Secret volume's")
    for what, (info, read_only, says) in refused.items():
        problem = kek_file_problem(info, read_only=read_only)
        assert problem is not None and says in problem, (what, problem)


def test_a_symlink_out_of_the_key_files_directory_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text(base64.b64encode(os.urandom(32)).decode())
    outside.chmod(0o600)
    (tmp_path / "mount").mkdir()
    (tmp_path / "mount" / "kek").symlink_to("../outside")
    with pytest.raises(KeyUnavailable, match="symlink leading out of its directory"):
        read_kek_file(str(tmp_path / "mount" / "kek"))
    # Within its directory a symlink is followed (a Secret volume's ..data), and the file's own rule applies.
    (tmp_path / "mount" / "..data").mkdir()
    target = tmp_path / "mount" / "..data" / "key"
    target.write_text(outside.read_text())
    target.chmod(0o600)
    (tmp_path / "mount" / "key").symlink_to("..data/key")
    assert read_kek_file(str(tmp_path / "mount" / "key")) == outside.read_text()
    target.chmod(0o644)
    with pytest.raises(KeyUnavailable, match="accessible to group or others"):
        read_kek_file(str(tmp_path / "mount" / "key"))
