"""The isolated training process: no network, no secrets, no keys.

Touches: real child processes started exactly as training starts them (``python -I -m
secure_ml.sandbox`` under ``unshare --net`` where the host allows it, as nobody when run as root),
a real listening socket opened by the test, the real keyring file of a fresh SECURE_ML_HOME.
The probe mode skips importing torch, so these tests are fast; the training path through the
same process is covered in test_training.py (SIGKILL and resume).

Does not touch: hosts without unshare (the guard-alone case is run by turning the namespace off),
seccomp or container runtimes.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from secure_ml.errors import ConfigurationError
from secure_ml.settings import Settings
from secure_ml.training import sandbox
from secure_ml.training.sandbox import IsolationPolicy, probe_isolation

pytestmark = pytest.mark.timeout(120)


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
    """The control: without namespace, guard or privilege drop the same probe reaches the socket,
    so the tests below would notice an isolation layer that stopped working."""
    open_policy = IsolationPolicy(network_namespace="off", socket_guard=False, drop_privileges=False)
    report = probe_isolation(open_policy, connect=listener.getsockname())
    assert report["probe"]["connect"] == "connected"
    assert not _nobody_connected(listener)


def test_training_isolation_blocks_a_connection_to_localhost(listener: socket.socket) -> None:
    report = probe_isolation(IsolationPolicy(), connect=listener.getsockname())
    assert report["probe"]["connect"].startswith("blocked")
    assert _nobody_connected(listener)
    if sandbox.namespace_prefix() is not None:
        assert report["policy"]["network_namespace"] is True
        assert report["interfaces"] == ["lo"]  # its own namespace: no route anywhere


def test_the_socket_guard_alone_blocks_it(listener: socket.socket) -> None:
    report = probe_isolation(IsolationPolicy(network_namespace="off"), connect=listener.getsockname())
    assert "blocked in the training sandbox" in report["probe"]["connect"]
    assert report["policy"]["network_namespace"] is False
    assert _nobody_connected(listener)


def test_the_network_namespace_alone_blocks_it(listener: socket.socket) -> None:
    if sandbox.namespace_prefix() is None:
        pytest.skip("this host cannot create a network namespace")
    policy = IsolationPolicy(network_namespace="required", socket_guard=False)
    report = probe_isolation(policy, connect=listener.getsockname())
    assert report["probe"]["connect"].startswith("blocked: OSError")  # unreachable, not refused by Python
    assert _nobody_connected(listener)


def test_secrets_never_reach_the_training_process(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    planted = {
        "SECURE_ML_KEK": "a2V5", "AWS_SECRET_ACCESS_KEY": "x", "AWS_ACCESS_KEY_ID": "x", "GITHUB_TOKEN": "x",
        "GOOGLE_APPLICATION_CREDENTIALS": "/x.json", "AZURE_CLIENT_SECRET": "x", "DB_PASSWORD": "x",
        "MY_API_KEY": "x", "VAULT_ADDR": "x", "HF_TOKEN": "x", "SERVICE_SECRET": "x",
    }
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    report = probe_isolation(IsolationPolicy(), read=str(settings.keyring_path))
    seen = set(report["env"])
    assert not seen & set(planted), seen & set(planted)
    assert not any(name.startswith(("SECURE_ML", "DAGSTER", "AWS_", "GOOGLE_", "AZURE_")) for name in seen)
    assert not any(sandbox.SECRET_ENV.search(name) for name in seen)
    # Nothing names the home, the keyring or the store: not the environment, not the arguments.
    assert str(settings.home) not in " ".join(report["argv"] + report["env"])
    if os.getuid() == 0:
        # Even guessing the keyring's path does not help: the child runs as nobody.
        assert report["uid"] == sandbox.NOBODY
        assert report["probe"]["read"].startswith("blocked")
        assert Path(settings.keyring_path).stat().st_mode & 0o077 == 0


def test_configuration_cannot_pass_a_secret_or_weaken_isolation() -> None:
    with pytest.raises(ConfigurationError, match="looks like a secret"):
        IsolationPolicy.from_mapping({"pass_env": ["HTTPS_PROXY", "DEPLOY_TOKEN"]})
    with pytest.raises(ConfigurationError, match="network_namespace"):
        IsolationPolicy.from_mapping({"network_namespace": "sometimes"})
    with pytest.raises(ConfigurationError, match="unknown setting 'socket_gaurd'"):
        IsolationPolicy.from_mapping({"socket_gaurd": False})
    # The guard cannot be switched off from configuration.
    assert IsolationPolicy.from_mapping({"socket_guard": False}).socket_guard is True
    env, withheld = sandbox.child_environment(IsolationPolicy(pass_env=("LANG",)), threads=2,
                                              environ={"LANG": "C", "PATH": "/bin", "AWS_PROFILE": "p"})
    assert env["OMP_NUM_THREADS"] == "2" and env["LANG"] == "C" and withheld == ["AWS_PROFILE"]


def test_a_required_namespace_that_the_host_cannot_give_is_a_clear_error(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a host without unshare
    sandbox.namespace_prefix.cache_clear()
    try:
        with pytest.raises(ConfigurationError, match="cannot create a network namespace"):
            probe_isolation(IsolationPolicy(network_namespace="required"))
        report = probe_isolation(IsolationPolicy(network_namespace="auto"))  # auto: the guard alone
        assert report["policy"]["network_namespace"] is False and report["policy"]["socket_guard"] is True
    finally:
        monkeypatch.undo()
        sandbox.namespace_prefix.cache_clear()


def test_a_failing_or_hung_training_process_is_reported_in_one_line() -> None:
    from secure_ml.errors import BadInput
    from secure_ml.training.loop import ENTRY
    from secure_ml.training.sandbox import SandboxError, run_isolated

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
