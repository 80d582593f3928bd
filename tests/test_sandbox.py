"""The sandbox: no network, no secrets, no keys, no other processes; as root and as an ordinary user.

Touches: real sandboxed processes started exactly as training starts them (``unshare`` with new
network, mount, PID and IPC namespaces, a user namespace for the ordinary user, then
secure_ml.training.confine), a real listening socket opened by the test, the real keyring file of
a fresh SECURE_ML_HOME, the real ``secure-ml sandbox run`` command. The ordinary-user path is run
for real: the test's parent process itself runs as uid 65534 (``setpriv``), with a home it owns.
The probe entry point skips importing torch, so these tests are fast; the training path through
the same code is covered in test_training.py (SIGKILL and resume).

Does not touch: seccomp (not used), container runtimes. Landlock is exercised where the kernel has it. A kernel without user
namespaces is stood in for by an ``unshare`` that fails as the kernel would.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from secure_ml.errors import BadInput, ConfigurationError
from secure_ml.settings import Settings
from secure_ml.training import sandbox
from secure_ml.training.sandbox import IsolationPolicy, Limits, SandboxError, probe_isolation, run_command

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]  # slow: starts real sandboxes
REPO = Path(__file__).resolve().parents[1]
needs_namespaces = pytest.mark.skipif(sandbox.namespace_prefix() is None, reason="this host cannot create namespaces")


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A localhost server the child will try to reach; a connection would show up in accept()."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.3)
    yield server
    server.close()


def _nobody_connected(server: socket.socket) -> bool:
    try:
        connection, _ = server.accept()
    except TimeoutError:
        return True
    connection.close()
    return False


def test_the_probe_does_connect_when_nothing_isolates_it(listener: socket.socket) -> None:
    """The control: without namespaces or guard the same probe reaches the socket, so the tests
    below would notice an isolation layer that stopped working."""
    open_policy = IsolationPolicy(network_namespace="off", socket_guard=False, drop_privileges=False)
    report = probe_isolation(open_policy, connect=listener.getsockname())
    assert report["probe"]["connect"] == "connected"
    assert not _nobody_connected(listener)
    assert report["policy"]["level_met"] is False  # no layer at all: never reported as isolated


@needs_namespaces
def test_the_sandbox_blocks_loopback_and_applies_every_layer(listener: socket.socket) -> None:
    report = probe_isolation(IsolationPolicy(), connect=listener.getsockname())
    assert report["probe"]["connect"].startswith("blocked")
    assert _nobody_connected(listener)
    assert report["interfaces"] == ["lo"]  # its own namespace: only a loopback, and it is down
    facts = report["policy"]
    assert facts["level"] == "namespaces" and facts["level_met"] is True
    assert all(facts["namespaces"][kind] for kind in ("net", "mnt", "pid", "ipc"))
    assert facts["capabilities_effective"] == facts["capabilities_bounding"] == "0" * 16
    assert facts["no_new_privs"] and facts["non_dumpable_parent"] and facts["pid_in_namespace"] == 1
    assert facts["limits"]["processes"] == Limits().processes
    assert facts["watch"]["denied"][0].startswith("socket.")  # what the guard refused is reported
    if os.getuid() == 0:
        assert report["uid"] == sandbox.NOBODY and facts["uid_outside"] == sandbox.NOBODY


def test_the_socket_guard_alone_blocks_it(listener: socket.socket) -> None:
    report = probe_isolation(IsolationPolicy(network_namespace="off"), connect=listener.getsockname())
    assert "blocked in the training sandbox" in report["probe"]["connect"]
    assert report["policy"]["level"] == "guard" and report["policy"]["namespaces"] == {}
    assert _nobody_connected(listener)


@needs_namespaces
def test_the_network_namespace_alone_blocks_it(listener: socket.socket) -> None:
    report = probe_isolation(IsolationPolicy(socket_guard=False, landlock=False), connect=listener.getsockname())
    assert report["probe"]["connect"].startswith("blocked: OSError")  # unreachable, not refused by Python or Landlock
    assert _nobody_connected(listener)


@needs_namespaces
def test_secrets_keys_store_and_the_parent_are_out_of_reach(settings: Settings,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    planted = {
        "SECURE_ML_KEK": "a2V5", "AWS_SECRET_ACCESS_KEY": "x", "AWS_ACCESS_KEY_ID": "x", "GITHUB_TOKEN": "x",
        "GOOGLE_APPLICATION_CREDENTIALS": "/x.json", "AZURE_CLIENT_SECRET": "x", "DB_PASSWORD": "x",
        "MY_API_KEY": "x", "VAULT_ADDR": "x", "HF_TOKEN": "x", "SERVICE_SECRET": "x",
    }
    from secure_ml.custody import keys

    monkeypatch.setattr(keys, "_handed_over", {})  # the sandbox takes the planted KEK: forget it after this test
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    settings.audit_log().record("tester", "test.start")
    signing_key = settings.keys_dir / "model-signing.pem"
    signing_key.write_text("-----BEGIN PRIVATE KEY-----\nplanted\n")
    signing_key.chmod(0o600)
    targets = [str(settings.keyring_path), str(signing_key), str(settings.audit_path), str(settings.artifacts_dir),
               f"/proc/{os.getpid()}/environ", f"/proc/{os.getppid()}/environ"]
    report = probe_isolation(IsolationPolicy(), read=targets)
    seen = set(report["env"])
    assert not seen & set(planted), seen & set(planted)
    assert not any(sandbox.SECRET_ENV.search(name) for name in seen)
    assert str(settings.home) not in " ".join(report["argv"] + report["env"])
    for target in targets:  # the keyring, the audit log, the store, the parent's /proc: none exists in there
        assert report["probe"]["read"][target].startswith("blocked"), (target, report["probe"]["read"][target])
    assert str(settings.home) in report["policy"]["hidden"] or any(
        str(settings.home).startswith(h) for h in report["policy"]["hidden"] + ["/tmp"])


def test_configuration_cannot_pass_a_secret_or_weaken_isolation() -> None:
    with pytest.raises(ConfigurationError, match="looks like a secret"):
        IsolationPolicy.from_mapping({"pass_env": ["HTTPS_PROXY", "DEPLOY_TOKEN"]})
    with pytest.raises(ConfigurationError, match="network_namespace"):
        IsolationPolicy.from_mapping({"network_namespace": "sometimes"})
    with pytest.raises(ConfigurationError, match="'auto' is no longer accepted"):
        IsolationPolicy.from_mapping({"network_namespace": "auto"})
    with pytest.raises(ConfigurationError, match="unknown setting 'socket_gaurd'"):
        IsolationPolicy.from_mapping({"socket_gaurd": False})
    with pytest.raises(ConfigurationError, match="limits: unknown setting 'memory'"):
        IsolationPolicy.from_mapping({"limits": {"memory": 1}})
    with pytest.raises(ConfigurationError, match="absolute paths"):
        IsolationPolicy.from_mapping({"hide": ["keys"]})
    # The guard cannot be switched off from configuration; required is the default.
    policy = IsolationPolicy.from_mapping({"socket_guard": False, "limits": {"processes": 64}})
    assert policy.socket_guard is True and policy.level == "namespaces" and policy.limits.processes == 64
    env, withheld = sandbox.child_environment(IsolationPolicy(pass_env=("LANG",)), threads=2,
                                              environ={"LANG": "C", "PATH": "/bin", "AWS_PROFILE": "p"})
    assert env["OMP_NUM_THREADS"] == "2" and env["LANG"] == "C" and withheld == ["AWS_PROFILE"]


def test_a_host_without_user_namespaces_gets_a_clean_refusal_not_a_bare_run(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    # An unshare that fails as a kernel without (unprivileged) user namespaces makes it fail.
    (fake / "unshare").write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    (fake / "unshare").chmod(0o755)
    (fake / "true").symlink_to(shutil.which("true") or "/bin/true")
    marker = tmp_path / "ran"
    for path in (str(fake), str(tmp_path / "empty")):  # unshare refusing, then no unshare at all
        monkeypatch.setenv("PATH", path)
        sandbox.namespace_prefix.cache_clear()
        with pytest.raises(SandboxError, match="cannot set up the sandbox .*nothing was run"):
            run_command(["/bin/sh", "-c", f"touch {marker}"], policy=IsolationPolicy())
        with pytest.raises(SandboxError, match="cannot set up the sandbox"):
            probe_isolation(IsolationPolicy())
        assert not marker.exists()
    monkeypatch.undo()
    sandbox.namespace_prefix.cache_clear()


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.slow
def test_a_failing_or_hung_training_process_is_reported_in_one_line() -> None:
    from secure_ml.training.loop import ENTRY
    from secure_ml.training.sandbox import run_isolated

    header = {"config": {"epochs": 1}, "rows": 10, "width": 3, "device": "cpu", "fingerprint": "0" * 64}
    with pytest.raises(BadInput, match="received data of the wrong size"):
        run_isolated(header, [b"\0" * 8, b"\0" * 8], entry=ENTRY, policy=IsolationPolicy(),
                     on_frame=lambda k, p: None)
    with pytest.raises(SandboxError, match="ran past isolation.timeout_s"):
        run_isolated(header, [], entry=ENTRY, policy=IsolationPolicy(timeout_s=0.5), on_frame=lambda k, p: None)
    with pytest.raises(BadInput, match="entry point must be 'module:function'"):
        run_isolated(header, [], entry="os:system; rm -rf /", policy=IsolationPolicy(), on_frame=lambda k, p: None)
    with pytest.raises(BadInput, match="has no function 'nothing_here'"):
        run_isolated(header, [], entry="secure_ml.training.loop:nothing_here", policy=IsolationPolicy(),
                     on_frame=lambda k, p: None)


def _as_user(user: int) -> list[str]:
    """A prefix that runs a command as ``user``. Where this machine's Python lives in a directory
    that user may not enter (pyenv under /root), the command gets a private mount namespace in which
    that directory shows only the Python: an ordinary user's machine, where Python is readable."""
    become = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    base = Path(sys.base_prefix).resolve()
    locked = next((p for p in base.parents if p != Path("/") and not os.stat(p).st_mode & 0o001), None)
    if locked is None:
        return become
    stage = tempfile.mkdtemp(prefix="secure-ml-py-")
    inner = base.relative_to(locked)
    script = (f'mount --bind "{base}" "{stage}" && mount -t tmpfs -o mode=755 none "{locked}" && '
              f'mkdir -p "{locked / inner}" && mount --bind "{stage}" "{locked / inner}" && exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *become]


def _cli(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None,
         user: int | None = None) -> subprocess.CompletedProcess[bytes]:
    prefix = _as_user(user) if user is not None else []
    return subprocess.run([*prefix, sys.executable, "-m", "secure_ml", *args], input=stdin, capture_output=True,
                          timeout=60, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


@needs_namespaces
def test_sandbox_run_passes_stdin_stdout_and_the_exit_status(settings: Settings) -> None:
    done = _cli("sandbox", "run", "--show", "--", "sh", "-c", "cat; echo out; exit 7", stdin=b"in\n",
                env={"SECURE_ML_HOME": str(settings.home)})
    assert done.returncode == 7 and done.stdout == b"in\nout\n", done.stderr
    facts = json.loads(done.stderr.decode().splitlines()[0])
    assert facts["level_met"] is True and facts["namespaces"]["net"] is True
    missing = _cli("sandbox", "run", "--", "no-such-command-here", env={"SECURE_ML_HOME": str(settings.home)})
    assert missing.returncode == 1 and b"command not found" in missing.stderr
    assert len(missing.stderr.decode().strip().splitlines()) == 1


@needs_namespaces
def test_a_fork_bomb_is_contained_and_dies_with_the_sandbox() -> None:
    bomb = ("import os, sys, time\nn = 0\ntry:\n    while n < 100000:\n        if os.fork() == 0:\n"
            "            time.sleep(60); os._exit(0)\n        n += 1\nexcept OSError:\n"
            "    print('refused after', n, flush=True); sys.exit(3)\n")
    code = run_command([sys.executable, "-I", "-c", bomb],
                       policy=IsolationPolicy(limits=Limits(processes=40)))
    assert code == 3  # the 41st process was refused; when the sandbox's first process ended, all its children died
    leftover = subprocess.run(["pgrep", "-f", "time.sleep\\(60\\)"], capture_output=True, check=False)
    assert leftover.stdout.strip() == b""


@needs_namespaces
@pytest.mark.skipif(os.getuid() != 0 or not shutil.which("setpriv"), reason="needs root to become an ordinary user")
def test_as_an_ordinary_user_the_sandbox_uses_a_user_namespace_and_hides_the_users_own_keys(
        listener: socket.socket) -> None:
    """The whole parent runs as uid 65534 with a SECURE_ML_HOME it owns: its keyring is readable to
    that user outside the sandbox, and must not be inside."""
    tmp_path = Path(tempfile.mkdtemp(prefix="secure-ml-user-"))  # pytest's own tmp is private to root
    tmp_path.chmod(0o755)
    try:
        _as_ordinary_user(tmp_path, listener)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _as_ordinary_user(tmp_path: Path, listener: socket.socket) -> None:
    home = tmp_path / "home"
    env = {"SECURE_ML_HOME": str(home), "HOME": str(tmp_path)}
    init = _cli("init", env=env)
    assert init.returncode == 0, init.stderr
    subprocess.run(["chown", "-R", f"{sandbox.NOBODY}:{sandbox.NOBODY}", str(home)], check=True)
    keyring = Settings.from_env(env).keyring_path
    outside = subprocess.run(["setpriv", f"--reuid={sandbox.NOBODY}", f"--regid={sandbox.NOBODY}", "--clear-groups",
                              "cat", str(keyring)], capture_output=True, check=False)
    assert outside.returncode == 0  # the control: this user can read its keyring outside the sandbox
    host, port = listener.getsockname()
    probe = ("import socket, sys\ntry:\n    open(sys.argv[1]).read(); print('READ')\nexcept OSError as e:\n"
             "    print('hidden', type(e).__name__)\n"
             "try:\n    socket.create_connection((sys.argv[2], int(sys.argv[3])), 2)"
             "; print('CONNECTED')\nexcept OSError as e:\n    print('no network')\n")
    done = _cli("sandbox", "run", "--show", "--", sys.executable, "-I", "-c", probe, str(keyring), host, str(port),
                env=env, user=sandbox.NOBODY)
    assert done.returncode == 0, done.stderr
    # Hidden: gone from the sandbox's view, or (when the checkout itself lives under /tmp and is bound
    # back in) present but unreadable; never read.
    said = done.stdout.decode().split()
    assert said[0] == "hidden" and said[1] in ("FileNotFoundError", "PermissionError") and said[2:] == ["no", "network"]
    facts = json.loads(done.stderr.decode().splitlines()[0])
    assert facts["user_namespace"] is True and facts["as_root"] is False and facts["level_met"] is True
    assert facts["capabilities_effective"] == "0" * 16 and facts["uid_outside"] == sandbox.NOBODY
    assert _nobody_connected(listener)


@needs_namespaces
def test_landlock_where_available_refuses_writes_outside_tmp_even_where_permissions_allow(tmp_path: Path) -> None:
    target = Path(tempfile.mkdtemp(prefix="secure-ml-landlock-", dir="/var/tmp"))
    try:
        target.chmod(0o777)  # file permissions would let anyone write here
        probe = (f"import sys\ntry:\n    open('{target}/x', 'w').write('x'); print('WROTE')\nexcept OSError as e:\n"
                 "    print('refused', type(e).__name__)\nopen('/tmp/y', 'w').write('y'); print('tmp ok')\n")
        facts: dict[str, object] = {}
        read, write = os.pipe()
        with os.fdopen(write, "w") as out, os.fdopen(read) as back:
            saved = os.dup(1)
            os.dup2(out.fileno(), 1)
            try:
                code = run_command([sys.executable, "-I", "-c", probe], policy=IsolationPolicy(), on_facts=facts.update)
            finally:
                os.dup2(saved, 1)
                os.close(saved)
            out.close()
            printed = back.read().split()
        assert code == 0
        if not facts.get("landlock_abi"):
            pytest.skip("this kernel has no Landlock")
        assert printed == ["refused", "PermissionError", "tmp", "ok"] and not (target / "x").exists()
    finally:
        shutil.rmtree(target, ignore_errors=True)
