"""Issue 2 figures: the chain of custody's speed and memory, each against a same-run baseline.

    .venv/bin/python -m bench --only custody [--quick]

- encrypt / decrypt of a 2 GiB file (64 MiB with --quick), file to file with
  secure_ml.crypto, as a ratio to `openssl speed -evp aes-256-gcm -bytes 1048576` on one core.
  Both sides are measured in CPU seconds (openssl speed divides by user CPU time; ours counts
  user + system, so our file reads and writes are charged to us), because this machine is shared
  and wall-clock time measures the neighbours. Measured twice: with the files on the disk
  (bench/out/, where the output is written with O_DIRECT, see secure_ml.integrity) and on tmpfs
  (/dev/shm, where every byte goes through page-cache memory: no disk, but no direct I/O either),
  to tell the disk path from our code. Each is the best of 2 runs (CPU time on a shared VM is noisy).
- peak memory while encrypting / decrypting it: the resident-set high-water mark of a fresh
  subprocess, reset after its imports (/proc/self/clear_refs), minus its resident set at that
  point; reported against the file size (goal: at most 64 MiB above the baseline).
- SHA-256 of the file: secure_ml.integrity.sha256_file vs hashlib.file_digest (best of 3 each,
  interleaved).
- audit log appends/s (hash-chained, flock, head file; fsync off, the default) vs plain unchained
  JSON-line appends with the same flock; plus the rate with fsync on (durable against power
  loss), for the trade-off.

Big files go under bench/out/ (git-ignored) and are deleted afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import Figure

ISSUE = 2
MiB = 1 << 20
REPO = Path(__file__).resolve().parents[1]


# -- the measured child: one operation in a fresh interpreter --------------------------------------
def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else 0


def _child(operation: str, src: str, dst: str) -> None:
    from secure_ml.custody import crypto
    from secure_ml.custody.integrity import atomic_write
    from secure_ml.custody.keys import EnvKeyProvider

    keys = EnvKeyProvider()
    Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark after imports
    baseline = _status_kib("VmRSS")
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter()
    # What `secure-ml encrypt IN OUT` does: stream into an atomic (temp, fsync, rename) output.
    with open(src, "rb") as source, atomic_write(dst) as target:
        if operation == "encrypt":
            size = crypto.encrypt_stream(source, target, keys)
        else:
            size = crypto.decrypt_stream(source, target, keys)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    print(json.dumps({"bytes": size, "cpu_s": user + system, "user_s": user, "sys_s": system, "wall_s": wall,
                      "baseline_kib": baseline,
                      "peak_kib": _status_kib("VmHWM")}))


def _measure(operation: str, src: Path, dst: Path, kek: str) -> dict[str, float]:
    env = {**os.environ, "SECURE_ML_KEK": kek, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "bench.bench_custody", "--child", operation, str(src), str(dst)],
                            cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{operation} child failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _round_trips(plain: Path, sealed: Path, back: Path, kek: str) -> tuple[dict[str, float], dict[str, float]]:
    """Encrypt then decrypt, twice; the run with the least CPU of each (the neighbours only add)."""
    encrypts, decrypts = [], []
    for _ in range(2):
        # A fresh output each time: replacing last run's 2 GiB file would charge its deletion
        # (freeing its blocks inside rename) to the operation measured.
        sealed.unlink(missing_ok=True)
        encrypts.append(_measure("encrypt", plain, sealed, kek))
        back.unlink(missing_ok=True)
        decrypts.append(_measure("decrypt", sealed, back, kek))
        if decrypts[-1]["bytes"] != plain.stat().st_size or encrypts[-1]["bytes"] != plain.stat().st_size:
            raise RuntimeError("round trip size mismatch")
    best = lambda runs: min(runs, key=lambda r: r["cpu_s"])  # noqa: E731
    peak = lambda runs: max(r["peak_kib"] - r["baseline_kib"] for r in runs)  # noqa: E731
    encrypt, decrypt = best(encrypts), best(decrypts)
    return {**encrypt, "peak_above_kib": peak(encrypts)}, {**decrypt, "peak_above_kib": peak(decrypts)}


# -- baselines ------------------------------------------------------------------------------------
def openssl_aes_gcm_bytes_per_s(seconds: int) -> float:
    """`openssl speed -evp aes-256-gcm -bytes 1048576` (one process: one core), bytes/s."""
    result = subprocess.run(["openssl", "speed", "-mr", "-seconds", str(seconds), "-evp", "aes-256-gcm",
                             "-bytes", str(MiB)], capture_output=True, text=True, check=True)
    rates = [float(line.rsplit(":", 1)[1]) for line in result.stdout.splitlines() if line.startswith("+F:")]
    if not rates:
        raise RuntimeError("could not read openssl speed's output")
    return rates[-1]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def in_memory_rates(size: int, kek: str) -> tuple[float, float]:
    """encrypt_stream / decrypt_stream from memory to /dev/null: the crypto, framing and Python
    loop alone, without the file system (MiB per CPU second, best of 3)."""
    import io

    from secure_ml.custody import crypto
    from secure_ml.custody.keys import EnvKeyProvider

    keys = EnvKeyProvider({"SECURE_ML_KEK": kek})
    plain = os.urandom(size)
    sealed_buffer = io.BytesIO()
    crypto.encrypt_stream(io.BytesIO(plain), sealed_buffer, keys)
    sealed = sealed_buffer.getvalue()
    rates = []
    for operation, data in ((crypto.encrypt_stream, plain), (crypto.decrypt_stream, sealed)):
        best = float("inf")
        with open(os.devnull, "wb") as sink:
            for _ in range(3):
                started = _cpu()
                operation(io.BytesIO(data), sink, keys)
                best = min(best, _cpu() - started)
        rates.append(size / best / MiB)
    return rates[0], rates[1]


def _write_random_file(path: Path, size: int) -> None:
    block = os.urandom(64 * MiB)  # AES does not care what repeats; this keeps set-up fast
    with open(path, "wb") as handle:
        left = size
        while left:
            left -= handle.write(block[: min(left, len(block))])


def _best_of(fn, repeat: int = 3) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def _audit_rates(workdir: Path, appends: int) -> tuple[float, float, float]:
    import fcntl

    from secure_ml.custody.audit import AuditLog

    details = {"kind": "parquet", "size": 123456, "role": "dataset"}
    subject = "sha256:" + "ab" * 32

    def chained(fsync: bool, n: int) -> float:
        path = workdir / f"audit-{fsync}.jsonl"
        log = AuditLog(path, fsync=fsync)
        started = time.perf_counter()
        for _ in range(n):
            log.record("bench", "store.write", subject=subject, details=details)
        elapsed = time.perf_counter() - started
        log.close()
        log.verify()
        return n / elapsed

    def plain(n: int) -> float:
        fd = os.open(workdir / "plain.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        started = time.perf_counter()
        for i in range(n):
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, json.dumps({"seq": i, "time": time.time(), "actor": "bench", "action": "store.write",
                                     "subject": subject, "details": details}).encode() + b"\n")
            fcntl.flock(fd, fcntl.LOCK_UN)
        elapsed = time.perf_counter() - started
        os.close(fd)
        return n / elapsed

    baseline = max(plain(appends) for _ in range(2))
    ours = max(chained(False, appends) for _ in range(2))
    durable = chained(True, max(50, appends // 50))
    return ours, baseline, durable


# -- the figures ----------------------------------------------------------------------------------
def run(quick: bool) -> list[Figure]:
    size = 64 * MiB if quick else 2048 * MiB
    label = f"{size // MiB} MiB" if quick else "2 GiB"
    out_root = REPO / "bench" / "out"
    out_root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="custody-", dir=out_root))
    figures: list[Figure] = []
    try:
        plain, sealed, back = workdir / "plain.bin", workdir / "sealed.smle", workdir / "back.bin"
        _write_random_file(plain, size)
        kek = base64.b64encode(os.urandom(32)).decode()
        openssl = openssl_aes_gcm_bytes_per_s(1 if quick else 3)
        runs: dict[str, tuple[dict[str, float], dict[str, float]]] = {"disk": _round_trips(plain, sealed, back, kek)}
        back.unlink()
        sealed.unlink()
        shm = Path("/dev/shm")
        if shm.is_dir() and shutil.disk_usage(shm).free > 3 * size:
            shm_dir = Path(tempfile.mkdtemp(prefix="custody-", dir=shm))
            try:
                shutil.copyfile(plain, shm_dir / "plain.bin")
                runs["tmpfs"] = _round_trips(shm_dir / "plain.bin", shm_dir / "sealed.smle", shm_dir / "back.bin", kek)
            finally:
                shutil.rmtree(shm_dir, ignore_errors=True)
        encrypt, decrypt = runs["disk"]
        ratio_goal = 0.6
        memory_encrypt, memory_decrypt = in_memory_rates((64 if quick else 256) * MiB, kek)
        for name, rate in (("encrypt", memory_encrypt), ("decrypt", memory_decrypt)):
            figures.append(Figure(ISSUE, f"{name}_stream in memory -> /dev/null (MiB/s per CPU s)", rate, "MiB/s",
                                  "openssl speed aes-256-gcm 1MiB", openssl / MiB, "info: the loop alone", True))
        for where, (enc, dec) in runs.items():
            for name, measured in (("encrypt", enc), ("decrypt", dec)):
                rate = measured["bytes"] / measured["cpu_s"] / MiB
                figures.append(Figure(
                    ISSUE, f"{name} {label} file->file on {where} (MiB/s per CPU s: user {measured['user_s']:.2f}"
                    f" + sys {measured['sys_s']:.2f}; wall {measured['wall_s']:.1f}s)",
                    rate, "MiB/s", "openssl speed aes-256-gcm 1MiB", openssl / MiB,
                    # The issue's figure is the file on disk; tmpfs is kernel page copying, for the record.
                    f">= {ratio_goal}x" if where == "disk" else "info",
                    rate >= ratio_goal * openssl / MiB if where == "disk" else True))
        for name, measured in (("encrypt", encrypt), ("decrypt", decrypt)):
            peak = measured["peak_above_kib"] / 1024  # the worst of the runs on disk
            figures.append(Figure(ISSUE, f"peak RSS above baseline while {name}ing {label}", peak, "MiB",
                                  f"file size (baseline RSS {measured['baseline_kib'] / 1024:.0f} MiB)",
                                  size / MiB, "<= 64 MiB", peak <= 64))

        from secure_ml.custody.integrity import sha256_file

        def reference() -> None:
            with open(plain, "rb") as handle:
                hashlib.file_digest(handle, "sha256")

        ours_times, reference_times = [], []
        for _ in range(3):  # interleaved, so both see the same page cache and neighbours
            reference_times.append(_best_of(reference, 1))
            ours_times.append(_best_of(lambda: sha256_file(plain), 1))
        ours_rate, reference_rate = size / min(ours_times) / MiB, size / min(reference_times) / MiB
        figures.append(Figure(ISSUE, f"sha256 of a {label} file", ours_rate, "MiB/s", "hashlib.file_digest",
                              reference_rate, ">= 0.9x", ours_rate >= 0.9 * reference_rate))

        ours, baseline, durable = _audit_rates(workdir, 5_000 if quick else 20_000)
        figures.append(Figure(ISSUE, "audit log appends/s (chained, flock; fsync off: the default)", ours,
                              "/s", "plain JSON-line appends + flock", baseline, ">= 5000/s", ours >= 5000))
        figures.append(Figure(ISSUE, "audit log appends/s with SECURE_ML_AUDIT_FSYNC=1 (power-loss safe)",
                              durable, "/s", "plain JSON-line appends + flock", baseline, "info (disk-bound)",
                              True))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return figures


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        for figure in run("--quick" in sys.argv):
            print(figure)
