"""The isolated training process: no network, no secrets, no keys; only the data it trains on.

    policy = IsolationPolicy.from_mapping(config["isolation"])      # training.yaml
    facts = run_isolated(job, blobs, entry="pkg.module:function", policy=policy, on_frame=handle)
    report = probe_isolation(policy, connect=("127.0.0.1", port))    # what the child can reach

The child is ``python -I -c BOOT CODE_ROOT ENTRY`` (isolated mode: no PYTHON* variables, no user
site; BOOT imports this module from the CODE_ROOT the parent imported it from, and runs main). ``ENTRY`` is the ``module:function`` the parent names (training names
secure_ml.training.loop:child_train): once its isolation is set up, the child imports that module
by name, calls its ``preload()`` if it has one (imports needing files only root may read), drops
privileges, reads the job and calls ``function(header, blobs, send, facts)``. So this module
imports nothing of what it runs. The child is started:

- in a fresh **network namespace** (``unshare --net``; ``--map-root-user`` where only user
  namespaces are allowed) whenever the OS offers one: the child sees only a loopback interface
  that is down, so nothing, not even localhost, is reachable. ``network_namespace: required``
  refuses to train where there is none; ``auto`` (default) falls back to the guard alone;
- with a **socket guard** in every case: a Python audit hook that refuses connect, bind, send,
  name resolution and starting other programs (defence in depth, and the only layer where no
  namespace is available);
- with a **scrubbed environment** built from an allow-list (PATH, locale, thread counts, the GPU
  selection); anything that looks like a key, token, password or cloud credential is never
  passed, even if configured;
- as **nobody** when started as root (after its imports, before it reads a byte of data), so the
  keyring and the artifact store are unreadable even to code that guesses their paths;
- with **no key, path or store** handed to it: the job (a JSON header) and the data arrive on its
  stdin, results (progress, checkpoints, weights) leave on its stdout as frames. Nothing is
  written to disk by either side, so there is nothing to clean up.

Frames on stdout: 1 byte kind + 8 bytes big-endian length + payload. Kinds: ``P`` progress
(JSON), ``C`` checkpoint (bytes; the parent encrypts it), ``W`` weights (bytes), ``R`` result
(JSON), ``E`` error (JSON: type, message).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from secure_ml import errors
from secure_ml.errors import BadInput, ConfigurationError, Error

FRAME = struct.Struct(">cQ")
NOBODY = 65534
NAMESPACE_MODES = ("auto", "required", "off")
ENTRY_POINT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
PROBE_ENTRY = "secure_ml.training.sandbox:probe_entry"
# The child imports secure_ml from where the parent did (-I ignores PYTHONPATH): the same code runs on both sides.
CODE_ROOT = Path(__file__).resolve().parents[2]
BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); from secure_ml.training.sandbox import main; "
        "raise SystemExit(main(sys.argv[2:]))")

# Names that must never reach the training process, whatever the configuration says.
SECRET_ENV = re.compile(
    r"(^(SECURE_ML_|DAGSTER_|AWS_|GOOGLE_|GCP_|GCLOUD_|AZURE_|ARM_|VAULT_|KUBE|K8S_|GITHUB_|GITLAB_|CI_|"
    r"ACTIONS_|DOCKER_|NPM_|PIP_|SSH_|GPG_|OPENAI_|HF_|HUGGING)|KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|"
    r"SESSION|COOKIE|PRIVATE|CERT|_PASS$|_PWD$)", re.IGNORECASE)
SAFE_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
GPU_ENV = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES")

# Audit events the guard refuses: the network, name resolution, and starting other programs
# (which could reach the network some other way).
BLOCKED_EVENTS = frozenset({
    "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "pty.spawn",
})


class SandboxError(Error):
    """The isolated process could not run, died, or was killed."""

    exit_code = 1
    label = "training failed"


@dataclass(frozen=True)
class IsolationPolicy:
    """How the training process is isolated (``isolation:`` in training.yaml)."""

    network_namespace: str = "auto"
    socket_guard: bool = True
    drop_privileges: bool = True
    pass_env: tuple[str, ...] = ()
    timeout_s: float = 3600.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> IsolationPolicy:
        data = dict(data or {})
        mode = str(data.pop("network_namespace", "auto"))
        if mode not in NAMESPACE_MODES:
            raise ConfigurationError(f"isolation.network_namespace must be one of {', '.join(NAMESPACE_MODES)}, "
                                     f"not {mode!r}")
        pass_env = tuple(str(n) for n in data.pop("pass_env", None) or ())
        secret = [n for n in pass_env if SECRET_ENV.search(n)]
        if secret:
            raise ConfigurationError(f"isolation.pass_env names {secret[0]!r}, which looks like a secret: "
                                     "the training process never receives keys, tokens or credentials")
        try:
            timeout = float(data.pop("timeout_s", 3600))
        except (TypeError, ValueError):
            raise ConfigurationError("isolation.timeout_s must be a number of seconds") from None
        unknown = sorted(set(data) - {"socket_guard", "drop_privileges"})
        if unknown:
            raise ConfigurationError(f"isolation: unknown setting {unknown[0]!r}")
        # The guard is always on in configuration; only tests switch it off (to prove the namespace alone).
        return cls(network_namespace=mode, socket_guard=True,
                   drop_privileges=bool(data.get("drop_privileges", True)), pass_env=pass_env, timeout_s=timeout)


# -- the parent side ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def namespace_prefix() -> tuple[str, ...] | None:
    """The command prefix that starts a program in a new network namespace here, or None."""
    unshare, true = shutil.which("unshare"), shutil.which("true")
    if not unshare or not true:
        return None
    for prefix in ((unshare, "--net", "--"), (unshare, "--net", "--map-root-user", "--")):
        try:
            done = subprocess.run([*prefix, true], capture_output=True, timeout=15, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return prefix
    return None


def child_environment(policy: IsolationPolicy, *, threads: int = 1,
                      environ: Mapping[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """(environment for the child, names withheld from it). Built from an allow-list."""
    source = dict(os.environ if environ is None else environ)
    env = {name: source[name] for name in (*SAFE_ENV, *GPU_ENV, *policy.pass_env) if name in source}
    env = {name: value for name, value in env.items() if not SECRET_ENV.search(name)}
    env.update({
        "HOME": "/nonexistent",
        "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
        # cuBLAS is only deterministic with a fixed workspace (torch.use_deterministic_algorithms).
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    })
    withheld = sorted(set(source) - set(env))
    return env, withheld


def child_command(policy: IsolationPolicy, entry: str) -> tuple[list[str], bool]:
    """(argv, whether a network namespace is used); raises if one is required and unavailable."""
    if not ENTRY_POINT.match(entry):
        raise BadInput(f"sandbox entry point must be 'module:function', not {entry[:80]!r}")
    argv = [sys.executable, "-I", "-c", BOOT, str(CODE_ROOT), entry,
            "guard" if policy.socket_guard else "no-guard",
            "drop" if policy.drop_privileges else "keep"]
    if policy.network_namespace == "off":
        return argv, False
    prefix = namespace_prefix()
    if prefix is None:
        if policy.network_namespace == "required":
            raise ConfigurationError("isolation.network_namespace is 'required' but this host cannot create a "
                                     "network namespace (unshare --net failed); run as root or allow user "
                                     "namespaces, or set it to 'auto' to rely on the socket guard alone")
        return argv, False
    return [*prefix, *argv], True


def _write_all(stream: BinaryIO, header: Mapping[str, Any], blobs: Iterable[bytes | memoryview]) -> None:
    try:
        head = json.dumps(header, sort_keys=True).encode()
        stream.write(FRAME.pack(b"H", len(head)) + head)
        for blob in blobs:
            view = memoryview(blob).cast("B")
            stream.write(FRAME.pack(b"B", len(view)))
            for start in range(0, len(view), 1 << 22):
                stream.write(view[start:start + (1 << 22)])
        stream.close()
    except (BrokenPipeError, OSError, ValueError):
        pass  # the child died; its exit status says why


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    chunks: list[bytes] = []
    left = size
    while left:
        chunk = stream.read(min(left, 1 << 22))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


_ERRORS: dict[str, type[Error]] = {
    name: cls for name, cls in vars(errors).items() if isinstance(cls, type) and issubclass(cls, Error)
}


def run_isolated(header: Mapping[str, Any], blobs: Iterable[bytes | memoryview], *, policy: IsolationPolicy,
                 entry: str, on_frame: Callable[[str, bytes], None], threads: int = 1,
                 on_start: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run ``entry`` (``module:function``) on one job in the isolated child; frames go to
    ``on_frame(kind, payload)`` as they arrive.

    Returns the isolation facts (namespace used, environment withheld). A child that fails
    raises its own error class (BadInput, IntegrityError, ...) with its one-line message; a
    child that dies or is killed raises :class:`SandboxError`.
    """
    argv, namespaced = child_command(policy, entry)
    env, withheld = child_environment(policy, threads=threads)
    try:
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env=env, cwd="/", close_fds=True, bufsize=0)
    except OSError as exc:
        raise SandboxError(f"could not start the training process: {exc.strerror or exc}") from None
    if on_start is not None:
        on_start(process.pid)
    if process.stdin is None or process.stdout is None or process.stderr is None:  # pragma: no cover
        process.kill()
        raise SandboxError("the training process has no pipes")
    writer = threading.Thread(target=_write_all, args=(process.stdin, header, blobs), daemon=True)
    writer.start()
    stderr: list[bytes] = []
    drain = threading.Thread(target=lambda: stderr.append(process.stderr.read() if process.stderr else b""),
                             daemon=True)
    drain.start()
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        with contextlib.suppress(ProcessLookupError):
            process.kill()

    timer = threading.Timer(policy.timeout_s, expire)
    timer.daemon = True
    timer.start()
    failure: dict[str, Any] | None = None
    try:
        while True:
            head = _read_exact(process.stdout, FRAME.size)
            if len(head) < FRAME.size:
                break
            kind_byte, length = FRAME.unpack(head)
            payload = _read_exact(process.stdout, length)
            if len(payload) < length:
                break
            kind = kind_byte.decode("ascii", "replace")
            if kind == "E":
                failure = json.loads(payload)
            else:
                on_frame(kind, payload)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        raise
    finally:
        code = process.wait()
        timer.cancel()
        writer.join(timeout=5)
        drain.join(timeout=5)
    if failure is not None:
        cls = _ERRORS.get(str(failure.get("type")), SandboxError)
        raise cls(str(failure.get("message") or "the training process failed"))
    if timed_out.is_set():
        raise SandboxError(f"the training process ran past isolation.timeout_s ({policy.timeout_s:g} s) and was killed")
    if code != 0:
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            raise SandboxError(f"the training process was killed by {name}; the next run resumes from the last "
                               "good checkpoint")
        tail = (b"".join(stderr).decode("utf-8", "replace").strip().splitlines() or ["no output"])[-1]
        raise SandboxError(f"the training process exited with status {code}: {tail[:300]}")
    return {"network_namespace": namespaced, "socket_guard": policy.socket_guard,
            "drop_privileges": policy.drop_privileges, "environment_withheld": len(withheld)}


def probe_isolation(policy: IsolationPolicy, *, connect: tuple[str, int] | None = None,
                    read: str | None = None) -> dict[str, Any]:
    """Start the child as training would (without torch) and report what it can see and reach.

    ``connect``: an address it tries to connect to; ``read``: a file it tries to open. The
    report holds its uid, environment names, network interfaces and each attempt's outcome.
    """
    report: dict[str, Any] = {}

    def keep(kind: str, payload: bytes) -> None:
        if kind == "R":
            report.update(json.loads(payload))

    facts = run_isolated({"probe": {"connect": list(connect) if connect else None, "read": read}}, [],
                         policy=policy, entry=PROBE_ENTRY, on_frame=keep)
    return {**report, "policy": facts}


# -- the child side ----------------------------------------------------------------------------
def _guard(event: str, args: tuple[Any, ...]) -> None:
    if event in BLOCKED_EVENTS:
        raise PermissionError(f"blocked in the training sandbox: {event}")


def _drop_privileges() -> None:
    if os.getuid() != 0:
        return
    import ctypes  # imported while the standard library is still readable
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    try:  # no_new_privs: nothing exec'd later can regain privileges (setuid binaries)
        ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class _Channel:
    def __init__(self, out: BinaryIO) -> None:
        self._out = out

    def send(self, kind: str, payload: bytes) -> None:
        self._out.write(FRAME.pack(kind.encode("ascii"), len(payload)))
        view = memoryview(payload)
        for start in range(0, len(view), 1 << 22):
            self._out.write(view[start:start + (1 << 22)])
        self._out.flush()

    def send_json(self, kind: str, obj: Any) -> None:
        self.send(kind, json.dumps(obj, sort_keys=True).encode())


def _read_job(src: BinaryIO) -> tuple[dict[str, Any], list[bytes]]:
    head = _read_exact(src, FRAME.size)
    if len(head) < FRAME.size or FRAME.unpack(head)[0] != b"H":
        raise BadInput("the training process received no job")
    header = json.loads(_read_exact(src, FRAME.unpack(head)[1]))
    blobs: list[bytes] = []
    while True:
        head = _read_exact(src, FRAME.size)
        if len(head) < FRAME.size:
            return header, blobs
        kind, length = FRAME.unpack(head)
        data = _read_exact(src, length)
        if kind != b"B" or len(data) < length:
            raise BadInput("the training process received a truncated job")
        blobs.append(data)


def _facts() -> dict[str, Any]:
    try:  # the interfaces of this process's network namespace (sysfs would show the host's)
        interfaces = sorted(name for _, name in socket.if_nameindex())
    except OSError:
        interfaces = []
    return {"uid": os.getuid(), "env": sorted(os.environ), "interfaces": interfaces, "argv": sys.argv[1:]}


def _probe(probe: Mapping[str, Any]) -> dict[str, str]:
    outcome: dict[str, str] = {}
    if probe.get("connect"):
        host, port = probe["connect"]
        try:
            with socket.create_connection((str(host), int(port)), timeout=3):
                outcome["connect"] = "connected"
        except OSError as exc:
            outcome["connect"] = f"blocked: {type(exc).__name__}: {exc}"
    if probe.get("read"):
        try:
            with open(str(probe["read"]), "rb") as handle:
                handle.read(1)
            outcome["read"] = "read"
        except OSError as exc:
            outcome["read"] = f"blocked: {type(exc).__name__}"
    return outcome


def preload() -> None:
    """The probe's imports (host names are encoded lazily)."""
    import encodings.idna  # noqa: F401


def probe_entry(header: Mapping[str, Any], blobs: list[bytes], send: Callable[[str, bytes], None],
                facts: Mapping[str, Any]) -> None:
    """The probe's entry point: report what the child sees, and each attempt's outcome."""
    send("R", json.dumps({**facts, "probe": _probe(header.get("probe") or {})}, sort_keys=True).encode())


def _load_entry(entry: str) -> tuple[Any, Callable[..., None]]:
    if not ENTRY_POINT.match(entry):
        raise BadInput(f"sandbox entry point must be 'module:function', not {entry[:80]!r}")
    module_name, function_name = entry.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BadInput(f"sandbox entry point {entry!r}: cannot import {module_name!r} ({exc})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise BadInput(f"sandbox entry point {entry!r}: {module_name} has no function {function_name!r}")
    return module, function


def main(argv: list[str]) -> int:
    entry, guard, drop = (argv + [PROBE_ENTRY, "guard", "drop"][len(argv):])[:3]
    if guard == "guard":
        sys.addaudithook(_guard)  # audit hooks cannot be removed: the guard holds for the whole process
    # Frames own the real stdout; anything else writing to fd 1 (a print, a C library) goes to stderr.
    out = _Channel(os.fdopen(os.dup(1), "wb"))
    os.dup2(2, 1)
    try:
        # The entry's module is imported before privileges drop (the interpreter's own files may be
        # readable only by root); the data is read only after.
        module, function = _load_entry(entry)
        warm = getattr(module, "preload", None)
        if callable(warm):
            warm()
        if drop == "drop":
            _drop_privileges()
        header, blobs = _read_job(sys.stdin.buffer)
        function(header, blobs, out.send, _facts())
        return 0
    except Error as exc:
        out.send_json("E", {"type": type(exc).__name__, "message": str(exc)})
        return 1
    except Exception as exc:  # noqa: BLE001 - reported as one line to the parent
        out.send_json("E", {"type": "SandboxError", "message": f"{type(exc).__name__}: {exc}"})
        return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
