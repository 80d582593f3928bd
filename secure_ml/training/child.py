"""The Python program secure_ml.training.sandbox runs confined: it runs one named entry point on one job.

    python -I -c BOOT CODE_ROOT ENTRY guard|no-guard      (started by sandbox.run_isolated only)

``ENTRY`` is the ``module:function`` the parent names (training names
secure_ml.training.loop:child_train). The child imports that module by name, calls its
``preload()`` if it has one, reads the job (a JSON header and byte blobs) from stdin and calls
``function(header, blobs, send, facts)``; ``send(kind, payload)`` writes frames to stdout. The
guard (a Python audit hook refusing connect, bind, name resolution and starting programs) is a
further layer on top of the namespaces; it is installed before anything else runs.

Frames: 1 byte kind + 8 bytes big-endian length + payload. Job frames: ``H`` header (JSON),
``B`` blob. Result frames: ``P`` progress (JSON), ``C`` checkpoint, ``W`` weights, ``R`` result
(JSON), ``E`` error (JSON: type, message).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import socket
import struct
import sys
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

from secure_ml.errors import BadInput, Error

FRAME = struct.Struct(">cQ")
ENTRY_POINT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
PROBE_ENTRY = "secure_ml.training.child:probe_entry"
# Audit events the guard refuses: the network, name resolution, and starting other programs
# (which could reach the network some other way).
BLOCKED_EVENTS = frozenset({
    "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "pty.spawn",
})
DENIED: list[str] = []  # what the guard refused, reported to the parent (bounded)


def read_exact(stream: BinaryIO, size: int) -> bytes:
    chunks: list[bytes] = []
    left = size
    while left:
        chunk = stream.read(min(left, 1 << 22))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


HIDDEN: list[str] = []  # what the sandbox hides; an attempt to open one is reported


def _guard(event: str, args: tuple[Any, ...]) -> None:
    if event in BLOCKED_EVENTS:
        if len(DENIED) < 100:
            DENIED.append(event)
        raise PermissionError(f"blocked in the training sandbox: {event}")
    if event == "open" and HIDDEN and args and isinstance(args[0], str) and len(DENIED) < 100:
        path = os.path.abspath(args[0])
        if any(path == h or path.startswith(h.rstrip("/") + "/") for h in HIDDEN):
            DENIED.append(f"open {path}")  # hidden by the mount namespace: it fails; reported here


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


def read_into(stream: BinaryIO, size: int) -> bytearray:
    """``size`` bytes read straight into one buffer (no chunks joined: one copy less of a large split);
    shorter at the end of the stream."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        count = stream.readinto(view[got:got + (1 << 24)])  # type: ignore[attr-defined]
        if not count:
            break
        got += count
    view.release()
    if got < size:
        del buffer[got:]
    return buffer


def _read_job(src: BinaryIO) -> tuple[dict[str, Any], list[bytearray]]:
    head = read_exact(src, FRAME.size)
    if len(head) < FRAME.size or FRAME.unpack(head)[0] != b"H":
        raise BadInput("the training process received no job")
    header = json.loads(read_exact(src, FRAME.unpack(head)[1]))
    blobs: list[bytearray] = []
    while True:
        head = read_exact(src, FRAME.size)
        if len(head) < FRAME.size:
            return header, blobs
        kind, length = FRAME.unpack(head)
        data = read_into(src, length)
        if kind != b"B" or len(data) < length:
            raise BadInput("the training process received a truncated job")
        blobs.append(data)


def facts() -> dict[str, Any]:
    """What this process sees of itself: uid, environment names, network interfaces, namespaces."""
    try:  # the interfaces of this process's network namespace (sysfs would show the host's)
        interfaces = sorted(name for _, name in socket.if_nameindex())
    except OSError:
        interfaces = []
    namespaces = {}
    for kind in ("user", "net", "mnt", "pid", "ipc"):
        try:
            namespaces[kind] = os.readlink(f"/proc/self/ns/{kind}")
        except OSError:
            namespaces[kind] = None
    return {"uid": os.getuid(), "env": sorted(os.environ), "interfaces": interfaces, "argv": sys.argv[1:],
            "namespaces": namespaces}


def _probe(probe: Mapping[str, Any]) -> dict[str, Any]:
    outcome: dict[str, Any] = {}
    if probe.get("connect"):
        host, port = probe["connect"]
        try:
            with socket.create_connection((str(host), int(port)), timeout=3):
                outcome["connect"] = "connected"
        except OSError as exc:
            outcome["connect"] = f"blocked: {type(exc).__name__}: {exc}"
    for path in probe.get("read") or []:
        try:
            with open(str(path), "rb") as handle:
                handle.read(1)
            outcome.setdefault("read", {})[path] = "read"
        except OSError as exc:
            outcome.setdefault("read", {})[path] = f"blocked: {type(exc).__name__}"
    return outcome


def preload() -> None:
    """The probe's imports (host names are encoded lazily)."""
    import encodings.idna  # noqa: F401


def probe_entry(header: Mapping[str, Any], blobs: list[bytes], send: Callable[[str, bytes], None],
                facts: Mapping[str, Any]) -> None:
    """The probe's entry point: report what the child sees, and each attempt's outcome."""
    send("R", json.dumps({**facts, "probe": _probe(header.get("probe") or {})}, sort_keys=True).encode())


def load_entry(entry: str) -> tuple[Any, Callable[..., None]]:
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


def _report() -> dict[str, Any]:
    """What the parent cannot see from outside: denied attempts, and tasks started in this PID namespace."""
    try:  # the last PID handed out in the sandbox's own PID namespace = processes and threads started
        tasks: int | None = int(open("/proc/sys/kernel/ns_last_pid").read())
    except (OSError, ValueError):
        tasks = None
    return {"denied": list(DENIED), "tasks_started": tasks}


def exit_now(code: int) -> None:
    """End the process with ``code`` once the streams are flushed, skipping the interpreter's teardown
    (with torch loaded, seconds on a busy machine, for nothing: every frame was written and flushed)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def main(argv: list[str]) -> int:
    entry, guard = (argv + [PROBE_ENTRY, "guard"][len(argv):])[:2]
    if guard == "guard":
        sys.addaudithook(_guard)  # audit hooks cannot be removed: the guard holds for the whole process
    # Frames own the real stdout; anything else writing to fd 1 (a print, a C library) goes to stderr.
    out = _Channel(os.fdopen(os.dup(1), "wb"))
    os.dup2(2, 1)
    try:
        module, function = load_entry(entry)
        warm = getattr(module, "preload", None)
        if callable(warm):
            warm()
        header, blobs = _read_job(sys.stdin.buffer)
        HIDDEN.extend(str(p) for p in (header.pop("_sandbox", None) or {}).get("hidden", []))
        function(header, blobs, out.send, facts())
        out.send_json("D", _report())
        return 0
    except Error as exc:
        out.send_json("D", _report())
        out.send_json("E", {"type": type(exc).__name__, "message": str(exc)})
        return 1
    except Exception as exc:  # noqa: BLE001 - reported as one line to the parent
        out.send_json("D", _report())
        out.send_json("E", {"type": "SandboxError", "message": f"{type(exc).__name__}: {exc}"})
        return 1
