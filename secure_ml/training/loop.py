"""The training loop, and the entry points the sandbox runs it through.

    fit_arrays(X, y, config, device="cpu", fingerprint=fp, resume=None, emit=send)   # in-process
    run_isolated(header, blobs, entry=ENTRY, policy=policy, on_frame=handle)         # isolated
    replay_segments(X, y, config, chain_bytes, [(5, 10)], device="cpu")   # [state digest at 10]

:data:`ENTRY` (``module:function``) is what the parent names to the sandbox to train;
:data:`SEGMENT_ENTRY` re-executes chosen segments of a recorded chain (the ``reproducible`` check,
``secure-ml verify-training``), all in one sandbox start. The sandbox child imports this module by
name once its isolation is set up, calls :func:`preload` (every import training needs, before
privileges drop), then the entry point with the job it read.

Each epoch's shuffling and dropout are seeded from (seed, epoch) alone, so a run resumed from a
checkpoint, or a segment replayed from its recorded start state, ends with the same state as an
uninterrupted run (secure_ml.training.engine runs the epochs; secure_ml.training.chain holds the states).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from secure_ml.errors import BadInput, ConfigurationError, IntegrityError
from secure_ml.training import chain as chain_
from secure_ml.training.checkpoints import make_checkpoint, restore
from secure_ml.training.config import TrainingConfig
from secure_ml.training.engine import Engine, skip_compiler_wrappers
from secure_ml.training.model import MODEL_FORMAT, build_model

ENTRY = "secure_ml.training.loop:child_train"
SEGMENT_ENTRY = "secure_ml.training.loop:child_segments"


def preload() -> None:
    """Import everything training needs (the sandbox drops privileges right after)."""
    import safetensors.numpy  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    # A two-row, two-epoch run touches every lazily imported module (optimiser, checkpoint, weights, replay).
    rows = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    labels = np.array([0.0, 1.0], dtype=np.float32)
    warm = TrainingConfig(hidden=(2,), epochs=2, batch_size=2, checkpoint_every=1)
    frames: dict[str, bytes] = {}
    fit_arrays(rows, labels, warm, device="cpu", fingerprint="warm-up", resume=None,
               emit=lambda kind, payload: frames.setdefault(kind, payload))
    fit_arrays(rows, labels, warm, device="cpu", fingerprint="warm-up", resume=frames["C"],
               emit=lambda kind, payload: None)
    replay_segments(rows, labels, warm, frames["K"], [(0, 1)], device="cpu")


def _deterministic(threads: int) -> None:
    import torch

    # torch.use_deterministic_algorithms(True) also imports torch._inductor (dynamo, sympy: about as long as
    # torch itself) only to set the compiler's flag; nothing here compiles, so the eager kernels' flag is set
    # directly (torch.are_deterministic_algorithms_enabled() is then True, as with the public call).
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:  # pragma: no cover - another torch: the public call
        torch.use_deterministic_algorithms(True)
    else:
        setter(True, warn_only=False)
    skip_compiler_wrappers()  # nor torch._dynamo for the optimiser (secure_ml.training.engine)
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable before any inter-op work started
        torch.set_num_interop_threads(1)


def _engine(X: np.ndarray, y: np.ndarray, config: TrainingConfig, device: str) -> tuple[Any, Engine]:
    import torch

    _deterministic(config.threads)
    torch.manual_seed(config.seed)
    model = build_model(X.shape[1], config.hidden, config.dropout).to(device)
    model.train()
    features = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)).to(device)
    targets = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)).to(device)
    return model, Engine(model, features, targets, config, device=device)


def fit_arrays(X: np.ndarray, y: np.ndarray, config: TrainingConfig, *, device: str, fingerprint: str,
               resume: bytes | None, emit: Callable[[str, bytes], None]) -> None:
    """The training loop. Emits ``P`` (progress JSON), ``C`` (checkpoint bytes), ``W`` (weights),
    ``K`` (the chain's states, secure_ml.training.chain) and ``R`` (result JSON, with the chain's
    digests). Each epoch's shuffle and dropout are seeded from (seed, epoch), so a resumed run
    repeats exactly what an uninterrupted one would have done."""
    from safetensors.torch import save as save_tensors

    model, engine = _engine(X, y, config, device)
    optimiser = engine.optimiser
    marks = set(chain_.boundaries(config.epochs, config.segment_epochs))
    losses: list[float] = []
    states: dict[int, dict[str, Any]] = {}
    start = 0
    if resume is not None:
        start, losses, states = restore(resume, model, optimiser, fingerprint, config, device)
    else:
        states[0] = chain_.state_tensors(model, optimiser)
    started = time.perf_counter()
    for epoch in range(start, config.epochs):
        epoch_start = time.perf_counter()
        mean_loss = engine.epoch(epoch)
        if not math.isfinite(mean_loss):
            raise BadInput(f"training diverged at epoch {epoch + 1} (loss {mean_loss}); lower the learning rate")
        losses.append(mean_loss)
        seconds = time.perf_counter() - epoch_start
        emit("P", json.dumps({"epoch": epoch + 1, "epochs": config.epochs, "loss": mean_loss,
                              "seconds": seconds, "rows_per_s": engine.n / seconds if seconds > 0 else None}).encode())
        done = epoch + 1
        if done in marks:
            states[done] = chain_.state_tensors(model, optimiser)
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.epochs:
            now = states[done] if done in marks else chain_.state_tensors(model, optimiser)
            emit("C", make_checkpoint({**states, done: now}, done, losses, fingerprint))
    model.eval()
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    emit("W", save_tensors(weights, metadata={"format": MODEL_FORMAT}))
    emit("K", chain_.pack(states))
    emit("R", json.dumps({"losses": losses, "resumed_from_epoch": start or None, "device": device,
                          "seconds": time.perf_counter() - started, "runtime": runtime(device),
                          "chain": [{"epoch": e, "state_sha256": chain_.state_digest(states[e])}
                                    for e in sorted(states)]}).encode())


def runtime(device: str) -> dict[str, Any]:
    """The torch build that trained (the record's environment; the caller need not import torch for it)."""
    import torch

    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}


def replay_segments(X: np.ndarray, y: np.ndarray, config: TrainingConfig, chain_bytes: bytes,
                    segments: Sequence[tuple[int, int]], *, device: str) -> list[str]:
    """Re-execute each (start, end) segment from its recorded start state; the digest of each end state."""
    states, _ = chain_.unpack(chain_bytes)
    digests: list[str] = []
    for start, end in segments:
        if start not in states or not 0 <= start < end <= config.epochs:
            raise IntegrityError(f"the training chain has no segment from epoch {start} to {end}")
        model, engine = _engine(X, y, config, device)
        chain_.load_state(model, engine.optimiser, states[start], device)
        for epoch in range(start, end):
            engine.epoch(epoch)
        digests.append(chain_.state_digest(chain_.state_tensors(model, engine.optimiser)))
    return digests


def _arrays(header: Mapping[str, Any], blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray, str]:
    rows, width = int(header["rows"]), int(header["width"])
    if len(blobs) < 2 or len(blobs[0]) != rows * width * 4 or len(blobs[1]) != rows * 4:
        raise BadInput("the training process received data of the wrong size")
    device = str(header["device"])
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigurationError("the training process sees no CUDA GPU")
    X = np.frombuffer(blobs[0], dtype=np.float32).reshape(rows, width)
    return X, np.frombuffer(blobs[1], dtype=np.float32), device


def child_train(header: Mapping[str, Any], blobs: list[bytes], send: Callable[[str, bytes], None],
                facts: Mapping[str, Any]) -> None:
    """Entry point inside the sandbox: decode the job and train."""
    config = TrainingConfig.from_mapping(header["config"])
    X, y, device = _arrays(header, blobs)
    resume = bytes(blobs[2]) if len(blobs) > 2 and blobs[2] else None
    send("P", json.dumps({"isolation": dict(facts)}).encode())
    fit_arrays(X, y, config, device=device, fingerprint=str(header["fingerprint"]), resume=resume, emit=send)


def child_segments(header: Mapping[str, Any], blobs: list[bytes], send: Callable[[str, bytes], None],
                   facts: Mapping[str, Any]) -> None:
    """Entry point inside the sandbox: replay the named segments of the chain (third blob)."""
    config = TrainingConfig.from_mapping(header["config"])
    X, y, device = _arrays(header, blobs)
    if len(blobs) < 3:
        raise BadInput("the segment replay received no training chain")
    send("P", json.dumps({"isolation": dict(facts)}).encode())
    segments = [(int(a), int(b)) for a, b in header["segments"]]
    digests = replay_segments(X, y, config, bytes(blobs[2]), segments, device=device)
    send("R", json.dumps({"segments": [[a, b, d] for (a, b), d in zip(segments, digests, strict=True)]}).encode())
