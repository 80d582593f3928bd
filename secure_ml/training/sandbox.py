"""The sandbox: runs a program, or a named Python entry point, with no network, no secrets and no keys.

    policy = IsolationPolicy.from_mapping(config["isolation"])      # training.yaml
    facts = run_isolated(job, blobs, entry="pkg.module:function", policy=policy, on_frame=handle)
    ready = prepare(policy, entry="pkg.module:function")      # start it first: it imports while you work
    facts = run_isolated(job, blobs, entry=..., policy=policy, on_frame=handle, prepared=ready)
    warm(policy, entry="pkg.module:function")   # for a later run_isolated in this process (claimed there)
    code = run_command(["python", "my_train.py"], policy=policy)    # `secure-ml sandbox run -- ...`
    report = probe_isolation(policy, connect=("127.0.0.1", port), read=[keyring])

Both go through :func:`start`, one code path: ``unshare`` puts the program in new network, mount,
PID and IPC namespaces, plus a user namespace when not run as root (so it works as an ordinary
user too); secure_ml.training.confine then, inside them, hides ``SECURE_ML_HOME``, the keys, the
store, the audit log, the Dagster home and the user's home behind empty tmpfs mounts, gives
``/tmp`` and ``/dev/shm`` fresh ones, mounts a ``/proc`` that shows only the sandbox's own
processes, sets resource limits (memory, CPU time, file size, processes), becomes ``nobody`` when
started as root, drops every capability, sets no_new_privs and, where the kernel has Landlock,
forbids writes outside /tmp, /dev/shm and /dev and any TCP bind or connect; then it execs the
program. The
parent makes itself non-dumpable first, so no process of its uid can read its memory or
``/proc/<pid>/environ``. The new network namespace has only a loopback that is down: nothing, not
even the host's loopback, is reachable.

``network_namespace: required`` (the default) refuses with :class:`SandboxError` where this
cannot be set up (no ``unshare``, no user namespaces for an ordinary user): nothing ever runs
bare. ``off`` runs only the Python socket guard (secure_ml.training.child); the record then says
so and the level is ``guard``. The environment is built from an allow-list; anything that looks
like a key, token, password or credential is never passed, even if configured.

What was applied is measured, not assumed: the set-up step reports its mounts, limits, uid and
capability sets, and the namespaces are compared with the parent's. The facts returned say
``level_met`` only when every layer of the configured level is in place.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

from secure_ml import errors
from secure_ml.custody.keys import take_kek_from_environment
from secure_ml.errors import BadInput, ConfigurationError, Error
from secure_ml.training.child import ENTRY_POINT, FRAME, PROBE_ENTRY, read_exact
from secure_ml.training.policy import (  # noqa: F401 - part of this module's interface
    GPU_ENV,
    NAMESPACE_MODES,
    SAFE_ENV,
    SECRET_ENV,
    IsolationPolicy,
    Limits,
    child_environment,
)

NOBODY = 65534
NAMESPACES = ("net", "mnt", "pid", "ipc")
# The child imports secure_ml from where the parent did (-I ignores PYTHONPATH): the same code runs on both sides.
CODE_ROOT = Path(__file__).resolve().parents[2]
CHILD_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); from secure_ml.training.child import main, exit_now; "
              "exit_now(main(sys.argv[2:]))")
CONFINE = Path(__file__).resolve().with_name("confine.py")  # run as a script: standard library only, fast

class SandboxError(Error):
    """The sandbox could not be set up, or the process in it died or was killed."""

    exit_code = 1
    label = "sandbox"


# -- setting it up ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _namespace_prefix(real_root: bool, unshare: str | None) -> tuple[tuple[str, ...] | None, str]:
    true = shutil.which("true")
    if not unshare or not true:
        return None, "unshare(1) is not installed"
    user = () if real_root else ("--user", "--map-root-user")
    prefix = (unshare, *user, "--net", "--mount", "--pid", "--ipc", "--fork", "--mount-proc", "--kill-child")
    try:
        done = subprocess.run([*prefix, "--", true], capture_output=True, timeout=15, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"unshare did not run ({exc})"
    if done.returncode != 0:
        why = (done.stderr.decode("utf-8", "replace").strip().splitlines() or ["no reason given"])[-1]
        kind = "network, mount, PID and IPC namespaces" if real_root else "a user namespace (as an ordinary user)"
        return None, f"this host cannot create {kind}: {why[:200]}"
    return prefix, ""


def namespace_prefix() -> tuple[str, ...] | None:
    """The command prefix that starts a program in its new namespaces here, or None."""
    return _namespace_prefix(os.getuid() == 0, shutil.which("unshare"))[0]


namespace_prefix.cache_clear = _namespace_prefix.cache_clear  # type: ignore[attr-defined]


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def hidden_paths(policy: IsolationPolicy, environ: Mapping[str, str] | None = None) -> list[str]:
    """What the sandbox hides: SECURE_ML_HOME and where its keys, store, audit log and Dagster home
    live, a KEK file, the user's home, and ``isolation.hide``. Refuses to hide the code it runs."""
    from secure_ml.settings import Settings

    environ = dict(os.environ if environ is None else environ)
    settings = Settings.from_env(environ)
    paths = [settings.home, settings.keys_dir, settings.keyring_path, settings.artifacts_dir,
             settings.audit_path.parent, settings.dagster_home]
    if environ.get("SECURE_ML_KEK_FILE"):
        paths.append(Path(environ["SECURE_ML_KEK_FILE"]))
    needed = exposed_paths()
    resolved = sorted({str(Path(p).resolve()) for p in paths + [Path(p) for p in policy.hide]})
    for path in resolved:
        if any(_inside(n, Path(path)) for n in needed):
            raise ConfigurationError(f"the sandbox must hide {path}, but the code or Python it runs lives there; "
                                     "keep SECURE_ML_HOME and keys outside the code and the virtual environment")
    home = Path(environ.get("HOME") or "/nonexistent")
    if home.is_absolute() and home.resolve() != Path("/") and home.resolve() not in needed:
        resolved.append(str(home.resolve()))  # the Python and code inside it, if any, are bound back (exposed_paths)
    return sorted(set(resolved))


def exposed_paths() -> list[Path]:
    """What the sandboxed Python needs even inside a hidden home: the code root, the virtual
    environment and the base interpreter."""
    return sorted({CODE_ROOT, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(),
                   Path(sys.executable).resolve().parent})


def make_parent_non_dumpable() -> bool:
    """No process of this uid may ptrace this one or read its /proc/<pid>/environ or mem (PR_SET_DUMPABLE 0)."""
    try:
        return bool(ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _own_namespaces() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for kind in ("user", *NAMESPACES):
        try:
            out[kind] = os.readlink(f"/proc/self/ns/{kind}")
        except OSError:
            out[kind] = None
    return out


@dataclass
class Started:
    """A process started in the sandbox, and what was applied to it."""

    process: subprocess.Popen[bytes]
    facts: dict[str, Any]


def _parse_facts(lines: list[str]) -> dict[str, Any]:
    facts: dict[str, Any] = {"hidden": [], "limits": {}, "namespaces": {}}
    for line in lines:
        key, _, value = line.partition("\t")
        if key == "hidden":
            facts["hidden"].append(value)
        elif key in ("limit", "ns"):
            name, _, number = value.partition("\t")
            facts["limits" if key == "limit" else "namespaces"][name] = int(number) if key == "limit" else number
        elif key in ("uid", "pid_in_namespace", "uid_outside", "landlock_abi"):
            facts[key] = int(value) if value.lstrip("-").isdigit() else None
        elif key in ("no_new_privs", "private_tmp"):
            facts[key] = value == "1"
        elif key:
            facts[key] = value
    return facts


def start(argv: Sequence[str], policy: IsolationPolicy, *, env: Mapping[str, str], stdin: Any = None,
          stdout: Any = None, stderr: Any = None, socket_guard: bool = False,
          environ: Mapping[str, str] | None = None) -> Started:
    """Start ``argv`` in the sandbox ``policy`` asks for; raises :class:`SandboxError` (and runs
    nothing) when that sandbox cannot be set up. The one way any program is sandboxed."""
    take_kek_from_environment()  # no child may inherit a KEK, whatever env it is given
    non_dumpable = make_parent_non_dumpable()
    facts: dict[str, Any] = {"configured": policy.level, "socket_guard": socket_guard,
                             "non_dumpable_parent": non_dumpable}
    if policy.level == "guard":
        try:
            process = subprocess.Popen(list(argv), stdin=stdin, stdout=stdout, stderr=stderr, env=dict(env),
                                       cwd="/", close_fds=True, bufsize=0)
        except OSError as exc:
            raise SandboxError(f"could not start {argv[0]}: {exc.strerror or exc}") from None
        facts.update({"level": "guard", "namespaces": {}, "level_met": socket_guard})
        return Started(process, facts)
    real_root = os.getuid() == 0
    prefix, why = _namespace_prefix(real_root, shutil.which("unshare"))
    if prefix is None:
        raise SandboxError(f"cannot set up the sandbox ({why}); nothing was run. Allow user namespaces "
                           "(kernel.unprivileged_userns_clone, or a container with them), run as root, or set "
                           "isolation.network_namespace: off to accept the Python guard alone")
    hide = hidden_paths(policy, environ)
    scratch = ("/tmp", "/dev/shm")  # nosec B108: names compared with the code's location, never written to
    keep = [d for d in scratch if any(_inside(n, Path(d)) for n in (CODE_ROOT, Path(sys.prefix)))]
    plan = [*(f"hide\t{p}" for p in hide), *(f"expose\t{p}" for p in exposed_paths()), *(f"keep\t{p}" for p in keep),
            *(f"limit\t{name}\t{value}" for name, value in policy.limits.rlimits().items()),
            f"real_root\t{int(real_root)}", f"drop_privileges\t{int(policy.drop_privileges)}",
            f"outer_uid\t{os.getuid()}",
            f"landlock\t{int(policy.landlock)}"]
    if any("\n" in line or line.count("\t") > 2 for line in plan):
        raise ConfigurationError("a path the sandbox hides or exposes contains a tab or a newline")
    plan_r, plan_w = os.pipe()
    status_r, status_w = os.pipe()
    try:
        os.write(plan_w, "\n".join(plan).encode())
        os.close(plan_w)
        command = [*prefix, "--", sys.executable, "-I", "-S", str(CONFINE), str(plan_r), str(status_w), "--", *argv]
        try:
            process = subprocess.Popen(command, stdin=stdin, stdout=stdout, stderr=stderr, env=dict(env), cwd="/",
                                       close_fds=True, pass_fds=(plan_r, status_w), bufsize=0)
        except OSError as exc:
            raise SandboxError(f"could not start the sandbox: {exc.strerror or exc}") from None
    finally:
        os.close(plan_r)
        os.close(status_w)
    with os.fdopen(status_r, "rb") as status:
        # Lines up to an empty one: "ok" and the facts, or "error<TAB>why". (unshare keeps a copy of
        # the pipe, so there is no EOF to wait for.)
        lines: list[str] = []
        while (raw := status.readline()) not in (b"", b"\n"):
            lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
    if lines[:1] != ["ok"]:
        process.kill()
        process.wait()
        first = lines[0] if lines else ""
        reason = first.partition("\t")[2] if first.startswith("error\t") else "its set-up did not complete"
        raise SandboxError(f"the sandbox could not be set up ({reason}); nothing was run")
    applied = _parse_facts(lines[1:])
    ours = _own_namespaces()
    theirs = applied.pop("namespaces", {})
    namespaces = {kind: bool(theirs.get(kind)) and theirs.get(kind) != ours.get(kind) for kind in ("user", *NAMESPACES)}
    caps_clear = set(str(applied.get("capabilities_effective", "?"))) == {"0"} and \
        set(str(applied.get("capabilities_bounding", "?"))) == {"0"}
    met = (all(namespaces[k] for k in NAMESPACES) and (real_root or namespaces["user"]) and caps_clear
           and bool(applied.get("no_new_privs")) and non_dumpable
           and (not real_root or not policy.drop_privileges or applied.get("uid") == NOBODY))
    facts.update({"level": "namespaces" if met else "incomplete", "level_met": met, "namespaces": namespaces,
                  "user_namespace": namespaces["user"], "as_root": real_root, **applied})
    return Started(process, facts)


# -- running a command -------------------------------------------------------------------------
def run_command(argv: Sequence[str], *, policy: IsolationPolicy, environ: Mapping[str, str] | None = None,
                on_facts: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Run ``argv`` in the sandbox with this process's stdin, stdout and stderr; its exit status
    (128 + N when killed by signal N). A sandbox that cannot be set up raises; nothing runs bare."""
    if not argv:
        raise BadInput("sandbox run needs a command")
    if policy.level != "namespaces":
        raise SandboxError("sandbox run needs isolation.network_namespace: required; it never runs a command "
                           "without its namespaces")
    env, _ = child_environment(policy, environ=environ)
    started = start(argv, policy, env=env, environ=environ)
    if on_facts is not None:
        on_facts(started.facts)
    if not started.facts["level_met"]:
        started.process.kill()
        started.process.wait()
        raise SandboxError(f"the sandbox was set up only in part ({started.facts}); the command was stopped")
    code = started.process.wait()
    return 128 - code if code < 0 else code


# -- running a Python entry point on a job -------------------------------------------------------
def _write_all(stream: BinaryIO, header: Mapping[str, Any], blobs: Iterable[bytes | memoryview],
               sent: list[int]) -> None:
    try:
        head = json.dumps(header, sort_keys=True).encode()
        stream.write(FRAME.pack(b"H", len(head)) + head)
        sent[0] += FRAME.size + len(head)
        for blob in blobs:
            view = memoryview(blob).cast("B")
            stream.write(FRAME.pack(b"B", len(view)))
            for start_ in range(0, len(view), 1 << 22):
                stream.write(view[start_:start_ + (1 << 22)])
            sent[0] += FRAME.size + len(view)
        stream.close()
    except (BrokenPipeError, OSError, ValueError):
        pass  # the child died; its exit status says why


_ERRORS: dict[str, type[Error]] = {
    name: cls for name, cls in vars(errors).items() if isinstance(cls, type) and issubclass(cls, Error)
}


def child_command(policy: IsolationPolicy, entry: str) -> list[str]:
    if not ENTRY_POINT.match(entry):
        raise BadInput(f"sandbox entry point must be 'module:function', not {entry[:80]!r}")
    return [sys.executable, "-I", "-c", CHILD_BOOT, str(CODE_ROOT), entry,
            "guard" if policy.socket_guard else "no-guard"]


@dataclass
class Prepared:
    """A sandbox child started before its job: it sets up, imports its entry point's module and runs its
    ``preload()`` while the caller prepares the job (2 cores: the fixed cost overlaps the caller's work).
    It waits for the job on stdin; :func:`run_isolated` hands it over. ``close()`` ends it if unused."""

    started: Started
    entry: str
    policy: IsolationPolicy
    threads: int
    withheld: int
    claimed: bool = False

    def matches(self, policy: IsolationPolicy, entry: str, threads: int) -> bool:
        return (self.entry, self.policy, self.threads) == (entry, policy, threads) and \
            self.started.process.poll() is None

    def close(self) -> None:
        """End the child unless a run took it (idempotent)."""
        if not self.claimed:
            self.claimed = True
            with contextlib.suppress(ProcessLookupError):
                self.started.process.kill()
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self.started.process.communicate(timeout=5)


def prepare(policy: IsolationPolicy, *, entry: str, threads: int = 1) -> Prepared:
    """Start the sandbox child for ``entry`` now, its job to follow (run_isolated(..., prepared=...)).
    Raises :class:`SandboxError` as run_isolated does when the sandbox cannot be set up."""
    argv = child_command(policy, entry)
    env, withheld = child_environment(policy, threads=threads)
    started = start(argv, policy, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    socket_guard=policy.socket_guard)
    return Prepared(started, entry, policy, threads, len(withheld))


# Children warmed for a later run_isolated in this process (the `reproducible` check after training):
# claimed by the first run_isolated of the same entry, policy and threads; ended after WARM_IDLE_S
# unclaimed, and when this process exits.
WARM_IDLE_S = 300.0
_WARM: list[Prepared] = []
_WARM_LOCK = threading.Lock()


def warm(policy: IsolationPolicy, *, entry: str, threads: int = 1, idle_s: float = WARM_IDLE_S) -> Prepared:
    """Start a child for a later :func:`run_isolated` of ``entry`` in this process (which claims it)."""
    prepared = prepare(policy, entry=entry, threads=threads)
    with _WARM_LOCK:
        _WARM.append(prepared)
    timer = threading.Timer(idle_s, discard, args=(prepared,))
    timer.daemon = True
    timer.start()
    return prepared


def claim_or_prepare(policy: IsolationPolicy, *, entry: str, threads: int = 1) -> Prepared:
    """The child :func:`warm` started for this entry, policy and threads, else one started now."""
    return _claim(policy, entry, threads) or prepare(policy, entry=entry, threads=threads)


def _claim(policy: IsolationPolicy, entry: str, threads: int) -> Prepared | None:
    with _WARM_LOCK:
        for prepared in list(_WARM):
            if prepared.matches(policy, entry, threads):
                _WARM.remove(prepared)
                return prepared
    return None


def discard(prepared: Prepared) -> None:
    """End a child :func:`warm` started, unless a run claimed it (then it is that run's)."""
    with _WARM_LOCK:
        if prepared in _WARM:
            _WARM.remove(prepared)
    prepared.close()


@atexit.register
def discard_warm() -> None:
    """End every warmed child nobody claimed."""
    for prepared in list(_WARM):
        discard(prepared)


def run_isolated(header: Mapping[str, Any], blobs: Iterable[bytes | memoryview], *, policy: IsolationPolicy,
                 entry: str, on_frame: Callable[[str, bytes], None], threads: int = 1,
                 on_start: Callable[[int], None] | None = None, prepared: Prepared | None = None) -> dict[str, Any]:
    """Run ``entry`` (``module:function``) on one job in the sandbox; frames go to
    ``on_frame(kind, payload)`` as they arrive. The child is ``prepared`` (started earlier by
    :func:`prepare` for the same entry, policy and threads), else one :func:`warm` started in this
    process, else started now.

    Returns the isolation facts (what was applied, measured; ``level_met``). A child that fails
    raises its own error class (BadInput, IntegrityError, ...) with its one-line message; a
    sandbox that cannot be set up, or a child that dies or is killed, raises :class:`SandboxError`.
    """
    if prepared is not None and (prepared.claimed or not prepared.matches(policy, entry, threads)):
        prepared.close()
        prepared = None  # used, ended, or started for another job: start afresh
    ready = prepared or _claim(policy, entry, threads) or prepare(policy, entry=entry, threads=threads)
    ready.claimed = True
    started, withheld = ready.started, ready.withheld
    sent = [0]
    process = started.process
    if on_start is not None:
        on_start(process.pid)
    if process.stdin is None or process.stdout is None or process.stderr is None:  # pragma: no cover
        process.kill()
        raise SandboxError("the training process has no pipes")
    job = {**header, "_sandbox": {"hidden": started.facts.get("hidden", [])}}
    writer = threading.Thread(target=_write_all, args=(process.stdin, job, blobs, sent), daemon=True)
    writer.start()
    stderr: list[bytes] = []
    err_stream: IO[bytes] = process.stderr
    drain = threading.Thread(target=lambda: stderr.append(err_stream.read()), daemon=True)
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
    denied: list[str] = []
    child_report: dict[str, Any] = {}
    received = 0
    try:
        while True:
            head = read_exact(process.stdout, FRAME.size)
            if len(head) < FRAME.size:
                break
            kind_byte, length = FRAME.unpack(head)
            payload = read_exact(process.stdout, length)
            received += FRAME.size + len(payload)
            if len(payload) < length:
                break
            kind = kind_byte.decode("ascii", "replace")
            if kind == "E":
                failure = json.loads(payload)
            elif kind == "D":
                child_report = json.loads(payload)
                denied = list(child_report.get("denied") or [])
            else:
                on_frame(kind, payload)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        raise
    finally:
        code, usage = _reap(process)
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
    watch = {
        # getrusage of the sandbox (unshare) and everything it waited for, i.e. the whole sandbox.
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3) if usage else None,
        "peak_memory_bytes": usage.ru_maxrss * 1024 if usage else None,
        "block_read_bytes": usage.ru_inblock * 512 if usage else None,
        "block_written_bytes": usage.ru_oublock * 512 if usage else None,
        "bytes_to_child": sent[0], "bytes_from_child": received,
        "tasks_started": child_report.get("tasks_started"),
        "denied": denied,
    }
    return {**started.facts, "environment_withheld": withheld, "watch": watch}


def _reap(process: subprocess.Popen[bytes]) -> tuple[int, Any]:
    """Wait for the process with wait4, keeping its resource usage (and its waited-for children's)."""
    if process.returncode is not None:
        return process.returncode, None
    try:
        _, status, usage = os.wait4(process.pid, 0)
    except ChildProcessError:
        return process.wait(), None
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage


def probe_isolation(policy: IsolationPolicy, *, connect: tuple[str, int] | None = None,
                    read: str | Sequence[str] | None = None) -> dict[str, Any]:
    """Start the child as training would (without torch) and report what it can see and reach.

    ``connect``: an address it tries to connect to; ``read``: files it tries to open. The
    report holds its uid, environment names, network interfaces and each attempt's outcome.
    """
    report: dict[str, Any] = {}

    def keep(kind: str, payload: bytes) -> None:
        if kind == "R":
            report.update(json.loads(payload))

    reads = [read] if isinstance(read, str) else list(read or [])
    facts = run_isolated({"probe": {"connect": list(connect) if connect else None, "read": reads}}, [],
                         policy=policy, entry=PROBE_ENTRY, on_frame=keep)
    outcome = report.get("probe") or {}
    if isinstance(read, str) and isinstance(outcome.get("read"), dict):
        outcome["read"] = outcome["read"].get(read)
    return {**report, "policy": facts}
