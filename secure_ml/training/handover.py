"""Training in a pod of its own: the per-run handover of the split and the return of the weights.

    key = new_run_key()                                         # base64 text; it goes into a per-run Secret
    facts = run_handed_over(header, blobs, run_dir=exchange / run_id, key=key, launch=start_pod,
                            on_frame=handle)                    # the same contract as sandbox.run_isolated
    runner = pod_runner(run_dir, start_pod)                     # run_isolated's keywords: training, or the replay

Two jobs cross over, and nothing else (:data:`RETURNS`): training (secure_ml.training.loop's
``ENTRY``: the split and a checkpoint in; weights, chain and result back) and the ``reproducible``
check's replay of chain segments (``SEGMENT_ENTRY``: the split and the chain, whose recorded states
are the segments' starting checkpoints, in; the end state's digest of each segment back). The
replay's pod is started by the pipeline's check, never by the trainer, from the split the pipeline
holds.

On Kubernetes the training step holds the KEK but the training pod must not. So the step writes the
job the local sandbox would receive (the encoded training split, its header, a checkpoint to resume
from) into ``run_dir/split.smle``, encrypted with the project's own artifact encryption
(secure_ml.custody.crypto) under a fresh random per-run key, never the KEK. ``launch(run_dir, key)``
starts the pod with only that key and only that directory (resources/training_pod.py: a per-run
Secret and a Job), and returns when it has finished. The pod (secure_ml.training.pod) decrypts the
split, runs the same training entry point as the local sandbox and writes weights, training chain and
result, encrypted under the same key, to ``run_dir/out/``. Back here they are decrypted and the
weights verified against the returned chain (its final state is the weights, every state matches
the digest the result lists), and the directory is removed, whatever happened.

That check only proves the weights are the chain's end. What makes returned weights trustworthy is
the ``reproducible`` check: it replays segments of the chain (Proof-of-Learning) on this side, from
the split this side holds, so weights the pod did not honestly learn from this split fail it.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import shutil
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secure_ml.custody.crypto import decrypt_stream, encrypt_stream
from secure_ml.custody.integrity import atomic_write
from secure_ml.custody.keys import key_id_for
from secure_ml.errors import BadInput, Error, IntegrityError, KeyUnavailable
from secure_ml.training.chain import TrainingChain

SPLIT_FILE = "split.smle"
OUT_DIR = "out"
RETURNED = {"W": "weights.smle", "K": "chain.smle", "R": "result.smle"}
FACTS_FILE = "facts.smle"
TRAIN_ENTRY = "secure_ml.training.loop:child_train"
REPLAY_ENTRY = "secure_ml.training.loop:child_segments"
# What each job the pod may run returns (frame kinds); the pod runs these and nothing else.
RETURNS = {TRAIN_ENTRY: ("W", "K", "R"), REPLAY_ENTRY: ("R",)}
# Who may start a training pod on Kubernetes: this account (its Role: the training namespace's Secrets
# and Jobs, by name), in the pods of these ops alone (k8s/training-pod.yaml, resources/training_pod.py).
LAUNCHER_ACCOUNT = "secure-ml-training-launcher"
LAUNCHER_STEPS = ("trained_model", "trained_model_reproducible")
_FRAME = struct.Struct(">cQ")
MAX_KEY_FILE = 256

Launch = Callable[[Path, str], None]


class RunKey:
    """A per-run key as a key source for the artifact encryption: it wraps each file's data key."""

    def __init__(self, text: str) -> None:
        try:
            material = base64.b64decode(text.strip(), validate=True)
        except ValueError:
            raise KeyUnavailable("the per-run training key is not base64") from None
        if len(material) != 32:
            raise KeyUnavailable(f"the per-run training key must be 32 bytes, not {len(material)}")
        self._material = material
        self._id = "run-" + key_id_for(material)

    def __repr__(self) -> str:
        return f"RunKey({self._id})"  # never the material

    def active_key(self) -> tuple[str, bytes]:
        return self._id, self._material

    def key(self, key_id: str) -> bytes:
        if key_id != self._id:
            raise KeyUnavailable("the training handover was encrypted under another per-run key (wrong key)")
        return self._material


def new_run_key() -> str:
    """A fresh random 256-bit per-run key, base64: it never wraps anything but this run's files."""
    return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode("ascii")


def read_key_file(path: Path | str) -> str:
    """The per-run key as the pod sees it (a file of the per-run Secret); one line on error."""
    try:
        with open(path, "rb") as handle:
            text = handle.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise KeyUnavailable(f"the per-run training key {path} cannot be read ({exc.strerror})") from None
    if not text.strip() or len(text) > MAX_KEY_FILE:
        raise KeyUnavailable(f"the per-run training key {path} is empty or too long")
    return text.decode("ascii", "replace").strip()


def _frames(items: Iterable[tuple[bytes, bytes | memoryview]]) -> Iterable[bytes | memoryview]:
    for kind, payload in items:
        yield _FRAME.pack(kind, len(memoryview(payload).cast("B")))
        yield payload


class _Joined(io.RawIOBase):
    """The frames as one readable stream, without joining them in memory."""

    def __init__(self, parts: Iterable[bytes | memoryview]) -> None:
        self._parts = iter(parts)
        self._current = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not len(self._current):
            try:
                self._current = memoryview(next(self._parts)).cast("B")
            except StopIteration:
                return 0
        size = min(len(buffer), len(self._current))
        buffer[:size] = self._current[:size]
        self._current = self._current[size:]
        return size


def _seal(path: Path, items: Iterable[tuple[bytes, bytes | memoryview]], key: RunKey) -> None:
    with atomic_write(path) as dst:
        encrypt_stream(io.BufferedReader(_Joined(_frames(items)), 1 << 20), dst, key)


def _open(path: Path, key: RunKey, what: str) -> list[tuple[bytes, bytes]]:
    out = io.BytesIO()
    try:
        with open(path, "rb") as src:
            decrypt_stream(src, out, key)
    except FileNotFoundError:
        raise IntegrityError(f"the training handover has no {what} ({path.name})") from None
    except Error as exc:
        raise type(exc)(f"the training handover's {what} ({path.name}): {exc}") from None
    data = memoryview(out.getbuffer())
    items: list[tuple[bytes, bytes]] = []
    at = 0
    while at < len(data):
        if len(data) - at < _FRAME.size:
            raise IntegrityError(f"the training handover's {what} is cut short")
        kind, length = _FRAME.unpack(data[at:at + _FRAME.size])
        at += _FRAME.size
        if len(data) - at < length:
            raise IntegrityError(f"the training handover's {what} is cut short")
        items.append((kind, bytes(data[at:at + length])))
        at += length
    return items


def _entry(entry: str) -> str:
    if entry not in RETURNS:  # the pod runs training or the replay, nothing named by anyone else
        raise BadInput(f"the training pod runs {' or '.join(RETURNS)}, not {entry!r}")
    return entry


# -- the step's side: the split out -------------------------------------------------------------
def write_split(run_dir: Path, header: Mapping[str, Any], blobs: Iterable[bytes | memoryview], key: str, *,
                entry: str = TRAIN_ENTRY) -> Path:
    """``run_dir/split.smle``: the job (its entry, header, then each blob) encrypted under the per-run key."""
    items = [(b"E", _entry(entry).encode()), (b"H", json.dumps(dict(header), sort_keys=True).encode()),
             *((b"B", blob) for blob in blobs)]
    run_dir.mkdir(parents=True, exist_ok=False, mode=0o700)
    (run_dir / OUT_DIR).mkdir(mode=0o770)
    _seal(run_dir / SPLIT_FILE, items, RunKey(key))
    return run_dir / SPLIT_FILE


# -- the pod's side -------------------------------------------------------------------------------
def read_job(run_dir: Path, key: str) -> tuple[str, dict[str, Any], list[bytes]]:
    """The job the step handed over: (entry, header, blobs). A wrong key or a changed or cut file raises."""
    items = _open(run_dir / SPLIT_FILE, RunKey(key), "training split")
    if len(items) < 2 or items[0][0] != b"E" or items[1][0] != b"H" or any(k != b"B" for k, _ in items[2:]):
        raise BadInput("the training handover's split is not a training job")
    entry = _entry(items[0][1].decode("ascii", "replace"))
    try:
        header = json.loads(items[1][1])
    except ValueError:
        raise BadInput("the training handover's job header is not JSON") from None
    return entry, header, [payload for _, payload in items[2:]]


def read_split(run_dir: Path, key: str) -> tuple[dict[str, Any], list[bytes]]:
    """The job's (header, blobs) (see :func:`read_job`)."""
    _, header, blobs = read_job(run_dir, key)
    return header, blobs


def write_returned(run_dir: Path, frames: Mapping[str, bytes], facts: Mapping[str, Any], key: str, *,
                   entry: str = TRAIN_ENTRY) -> None:
    """``run_dir/out/``: what the job returns (training: weights, chain, result; the replay: its result),
    and what the pod saw of itself, each encrypted."""
    run_key = RunKey(key)
    kinds = RETURNS[_entry(entry)]
    missing = [kind for kind in kinds if kind not in frames]
    if missing:
        raise IntegrityError(f"the pod's job ended without its {', '.join(missing)} frame(s)")
    out = run_dir / OUT_DIR
    for kind in kinds:
        _seal(out / RETURNED[kind], [(kind.encode(), frames[kind])], run_key)
    _seal(out / FACTS_FILE, [(b"P", json.dumps({"isolation": dict(facts)}, sort_keys=True).encode())], run_key)


# -- the step's side: the results back -----------------------------------------------------------
def read_returned(run_dir: Path, key: str, *, entry: str = TRAIN_ENTRY) -> dict[str, bytes]:
    """The pod's frames by kind (training: W, K, R, P; the replay: R, P), decrypted and verified. For
    training the weights must be the chain's final state and every state match the digest the result
    lists; the replay's result must be its list of segments. Raises IntegrityError otherwise."""
    run_key = RunKey(key)
    got: dict[str, bytes] = {}
    for kind in (*RETURNS[_entry(entry)], "P"):
        name = RETURNED.get(kind, FACTS_FILE)
        items = _open(run_dir / OUT_DIR / name, run_key, f"returned {name.split('.')[0]}")
        if len(items) != 1 or items[0][0] != kind.encode():
            raise IntegrityError(f"the returned {name} holds something other than its one frame")
        got[kind] = items[0][1]
    try:
        result = json.loads(got["R"])
        listed = list(result["chain"] if entry == TRAIN_ENTRY else result["segments"])
    except (ValueError, KeyError, TypeError):
        raise IntegrityError("the returned result is not the training loop's result") from None
    if entry == TRAIN_ENTRY:
        TrainingChain.from_bytes(got["K"]).verify(listed, got["W"])
    return got


def run_handed_over(header: Mapping[str, Any], blobs: Iterable[bytes | memoryview], *, run_dir: Path,
                    launch: Launch, on_frame: Callable[[str, bytes], None], key: str | None = None,
                    entry: str = TRAIN_ENTRY) -> dict[str, Any]:
    """Write the split, ``launch(run_dir, key)`` the pod, read back and verify what it returned, feed
    the frames to ``on_frame`` (P isolation facts, then W, K, R for training or R for the replay) and
    return the isolation facts. The per-run directory is removed whatever happens; a failure leaves
    nothing behind but its one line."""
    key = key or new_run_key()
    try:
        write_split(run_dir, header, blobs, key, entry=entry)
        launch(run_dir, key)
        got = read_returned(run_dir, key, entry=entry)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(run_dir)
    pod = dict(json.loads(got["P"]).get("isolation") or {})
    for kind in ("P", *RETURNS[entry]):
        on_frame(kind, got[kind])
    return pod


def pod_runner(run_dir: Path, launch: Launch) -> Callable[..., dict[str, Any]]:
    """A runner with run_isolated's keywords (secure_ml.training.trainer.fit, proof.verify_segments)
    that runs its job, training or the replay, in the pod ``launch`` starts."""

    def run(header: Mapping[str, Any], blobs: Iterable[bytes | memoryview], *, entry: str,
            on_frame: Callable[[str, bytes], None], **_: Any) -> dict[str, Any]:
        return run_handed_over(header, blobs, run_dir=run_dir, launch=launch, on_frame=on_frame, entry=_entry(entry))

    return run
