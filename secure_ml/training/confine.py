"""The sandbox's set-up step, run inside the fresh namespaces just before the sandboxed program.

    unshare [--user --map-root-user] --net --mount --pid --ipc --fork --mount-proc --kill-child --
        python -I -S .../secure_ml/training/confine.py PLAN_FD STATUS_FD -- program args...

secure_ml.training.sandbox builds that command line; nothing else should. In the new mount
namespace this step: puts an empty, unreadable tmpfs over every hidden directory (and
``/dev/null`` over every hidden file), gives ``/tmp`` and ``/dev/shm`` fresh tmpfs, sets the
resource limits, becomes ``nobody`` when it runs as real root, drops every capability (bounding,
effective, permitted, inheritable, ambient: nothing can undo the mounts), sets no_new_privs and,
where the kernel has Landlock, forbids writing outside /tmp, /dev/shm and /dev and (ABI 4+) any
TCP bind or connect, as a further layer.
It then reports exactly what it applied (``ok``, then ``key<TAB>value`` lines, then an empty
line) on ``STATUS_FD`` (close-on-exec) and ``execve``-s the program. If any step fails it writes
``error<TAB><one line>`` there instead and exits 126 without running the program: the sandbox
never runs a program half-confined.

It runs as a script (no package, no site: only the few standard modules below), because it runs
on every sandbox start (a budget of 100 ms over a bare start, measured by bench/bench_training.py).
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys

NOBODY = 65534
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 0x1, 0x2, 0x4, 0x8, 0x20
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 24, 47, 4
PR_SET_PDEATHSIG = 1
CAP_LAST = 63
LIMITS = {"memory_bytes": resource.RLIMIT_DATA, "cpu_seconds": resource.RLIMIT_CPU,
          "file_size_bytes": resource.RLIMIT_FSIZE, "processes": resource.RLIMIT_NPROC}


class ConfineError(Exception):
    """One step of the set-up failed; the program is not run."""


_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise ConfineError(f"{what}: {os.strerror(errno)}")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                       data.encode() if data else None), f"mount {target}")


def hide(paths: list[str], expose: list[str]) -> list[str]:
    """Cover each existing path: a directory by an empty tmpfs nobody may list, a file by /dev/null.

    A path in ``expose`` inside a hidden directory (the Python or the code the sandbox runs, in
    the user's home) is bound back in at the same place, read-only; nothing else of it shows.
    """
    hidden: list[str] = []
    for path in sorted(set(paths), key=len):
        if not os.path.lexists(path):
            continue
        if not os.path.isdir(path):
            _mount("/dev/null", path, None, MS_BIND)
            hidden.append(path)
            continue
        inside = [e for e in expose if e.startswith(path.rstrip("/") + "/") and os.path.isdir(e)]
        handles = {e: os.open(e, os.O_PATH | os.O_DIRECTORY) for e in inside}  # reachable once covered
        try:
            _mount("none", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   f"size=64k,mode={'755' if inside else '000'}")
            for kept, fd in handles.items():
                os.makedirs(kept, mode=0o755, exist_ok=True)
                _mount(f"/proc/self/fd/{fd}", kept, None, MS_BIND | MS_REC)
                _mount("none", kept, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        finally:
            for fd in handles.values():
                os.close(fd)
        hidden.append(path)
    return hidden


def set_limits(limits: dict[str, int]) -> dict[str, int]:
    applied: dict[str, int] = {}
    for name, value in limits.items():
        if value and value > 0:
            resource.setrlimit(LIMITS[name], (int(value), int(value)))
            applied[name] = int(value)
    return applied


def drop_bounding_set() -> None:
    """No exec'd program can ever regain a capability (needs CAP_SETPCAP: done before anything else drops)."""
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    for cap in range(CAP_LAST + 1):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:  # EINVAL: no such cap
            _check(-1, "dropping the capability bounding set")


def drop_capabilities() -> None:
    """Empty every capability set; after this nothing in the sandbox can unmount what hides the home."""

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header, data = Header(0x20080522, 0), (Data * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "clearing capabilities")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "setting no_new_privs")


SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446  # x86-64, arm64
LANDLOCK_RULE_PATH_BENEATH = 1
# Write-side file system rights (reads are left to the mount namespace, which hides what must not be seen).
FS_WRITE = sum(1 << bit for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write file, remove dir/file, make *
FS_REFER, FS_TRUNCATE = 1 << 13, 1 << 14
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
WRITABLE = ("/tmp", "/dev/shm", "/dev")  # nosec B108: inside the sandbox these are its own private tmpfs mounts


def landlock(writable: tuple[str, ...] = WRITABLE) -> int:
    """A further layer where the kernel has Landlock: no file may be created, written, renamed or
    removed outside ``writable``, and (ABI 4+) no TCP bind or connect at all. Returns the ABI
    version applied, 0 where Landlock is not available. Needs no_new_privs (set before)."""
    syscall = _libc.syscall
    abi = syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi <= 0:
        return 0
    handled_fs = FS_WRITE | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    handled_net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    attr = (ctypes.c_uint64 * 2)(handled_fs, handled_net)
    size = 16 if abi >= 4 else 8
    ruleset = syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        _check(-1, "creating the Landlock ruleset")

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    try:
        for path in writable:
            if not os.path.isdir(path):
                continue
            fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
            try:
                rule = PathBeneath(handled_fs, fd)
                _check(syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule),
                               ctypes.c_uint32(0)), f"adding the Landlock rule for {path}")
            finally:
                os.close(fd)
        _check(syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)), "applying Landlock")
    finally:
        os.close(ruleset)
    return int(abi)


def status_of(pid: str = "self") -> dict[str, str]:
    with open(f"/proc/{pid}/status") as handle:
        return dict(line.rstrip("\n").split(":\t", 1) for line in handle if ":\t" in line)


class Plan:
    """What the parent asks for: lines ``key<TAB>value`` (``limit<TAB>name<TAB>value`` for limits)."""

    def __init__(self, text: str) -> None:
        self.hide: list[str] = []
        self.expose: list[str] = []
        self.keep: list[str] = []
        self.limits: dict[str, int] = {}
        self.flags: dict[str, str] = {}
        for line in text.splitlines():
            key, _, value = line.partition("\t")
            if key in ("hide", "expose", "keep"):
                getattr(self, key).append(value)
            elif key == "limit":
                name, _, number = value.partition("\t")
                if name not in LIMITS:
                    raise ConfineError(f"unknown limit {name!r}")
                self.limits[name] = int(number)
            elif key in ("real_root", "drop_privileges", "outer_uid", "landlock"):
                self.flags[key] = value
            else:
                raise ConfineError(f"unknown plan line {key!r}")


def confine(plan: Plan) -> list[str]:
    """Apply the plan in this process (already in its namespaces); returns what was applied, as
    ``key<TAB>value`` lines."""
    # Nothing mounted here may propagate back to the host's mount namespace.
    _mount("none", "/", None, MS_REC | MS_PRIVATE)
    hidden = hide(plan.hide, plan.expose)
    for scratch in ("/tmp", "/dev/shm"):  # nosec B108: replaced by a private tmpfs just below
        if os.path.isdir(scratch) and scratch not in plan.keep:
            _mount("none", scratch, "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=1777")
    limits = set_limits(plan.limits)
    drop_uid = plan.flags.get("real_root") == "1" and plan.flags.get("drop_privileges") == "1"
    drop_bounding_set()
    if drop_uid:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        # A change of uid clears the parent-death signal unshare --kill-child set: set it again, so that
        # killing the sandbox's unshare (a timeout, a kill) still kills everything in it.
        _check(_libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "setting the parent-death signal")
    drop_capabilities()
    landlock_abi = landlock() if plan.flags.get("landlock", "1") == "1" else 0
    status = status_of()
    facts = [f"hidden\t{path}" for path in hidden]
    facts += [f"limit\t{name}\t{value}" for name, value in limits.items()]
    facts += [f"ns\t{kind}\t{os.readlink(f'/proc/self/ns/{kind}')}" for kind in ("user", "net", "mnt", "pid", "ipc")]
    facts += [f"uid\t{os.getuid()}", f"uid_outside\t{NOBODY if drop_uid else plan.flags.get('outer_uid', '')}",
              f"capabilities_effective\t{status.get('CapEff', '?')}",
              f"capabilities_bounding\t{status.get('CapBnd', '?')}",
              f"no_new_privs\t{status.get('NoNewPrivs', '0')}", f"pid_in_namespace\t{os.getpid()}",
              f"private_tmp\t{'0' if plan.keep else '1'}", f"landlock_abi\t{landlock_abi}"]
    return facts


def _read_plan(fd: int) -> Plan:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return Plan(b"".join(chunks).decode())


def _which(name: str) -> str | None:
    candidates = [name] if "/" in name else [os.path.join(d, name) for d in os.environ.get("PATH", "").split(":") if d]
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def main(argv: list[str]) -> int:
    plan_fd, status_fd, separator, *program = argv
    status = int(status_fd)
    os.set_inheritable(status, False)  # closes on exec: the program never sees it
    try:
        # The plan (which paths to hide) arrives on a pipe, not argv: nothing names them in /proc/*/cmdline.
        plan = _read_plan(int(plan_fd))
        if separator != "--" or not program:
            raise ConfineError("no program to run")
        applied = confine(plan)
        found = _which(program[0])
        if found is None:  # checked before the facts are reported: after them, only the exec itself can fail
            raise ConfineError(f"{program[0]}: command not found, or not executable in the sandbox")
        os.write(status, "\n".join(["ok", *applied, "", ""]).encode())
        os.execve(found, program, os.environ)
    except (ConfineError, OSError, ValueError) as exc:
        message = str(exc) if isinstance(exc, ConfineError) else f"{program[0] if program else ''}: " \
            f"{getattr(exc, 'strerror', None) or exc}"
        os.write(status, f"error\t{' '.join(message.split())}\n\n".encode())
        return 126
    return 126  # pragma: no cover - execve does not return


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
