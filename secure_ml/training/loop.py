"""The training loop, and the entry point the sandbox runs it through.

    fit_arrays(X, y, config, device="cpu", fingerprint=fp, resume=None, emit=send)   # in-process
    run_isolated(header, blobs, entry=ENTRY, policy=policy, on_frame=handle)         # isolated

:data:`ENTRY` (``module:function``) is what the parent names to the sandbox: the sandbox child
imports this module by name once its isolation is set up, calls :func:`preload` (every import
training needs, before privileges drop), then :func:`child_train` with the job it read.

Each epoch's shuffling and dropout are seeded from (seed, epoch) alone, so a run resumed from a
checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Mapping

import numpy as np

from secure_ml.errors import BadInput, ConfigurationError
from secure_ml.training.checkpoints import make_checkpoint, restore
from secure_ml.training.config import TrainingConfig
from secure_ml.training.model import MODEL_FORMAT, build_model

ENTRY = "secure_ml.training.loop:child_train"


def preload() -> None:
    """Import everything training needs (the sandbox drops privileges right after)."""
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    # A two-row, two-epoch run touches every lazily imported module (optimiser, checkpoint, weights).
    rows = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    warm = TrainingConfig(hidden=(2,), epochs=2, batch_size=2, checkpoint_every=1)
    checkpoint: list[bytes] = []
    fit_arrays(rows, np.array([0.0, 1.0], dtype=np.float32), warm, device="cpu", fingerprint="warm-up", resume=None,
               emit=lambda kind, payload: checkpoint.append(payload) if kind == "C" else None)
    fit_arrays(rows, np.array([0.0, 1.0], dtype=np.float32), warm, device="cpu", fingerprint="warm-up",
               resume=checkpoint[0], emit=lambda kind, payload: None)



def _deterministic(threads: int) -> None:
    import torch

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable before any inter-op work started
        torch.set_num_interop_threads(1)


def fit_arrays(X: np.ndarray, y: np.ndarray, config: TrainingConfig, *, device: str, fingerprint: str,
               resume: bytes | None, emit: Callable[[str, bytes], None]) -> None:
    """The training loop. Emits ``P`` (progress JSON), ``C`` (checkpoint bytes), ``W`` (weights)
    and ``R`` (result JSON). Each epoch's shuffle and dropout are seeded from (seed, epoch), so a
    resumed run repeats exactly what an uninterrupted one would have done."""
    import torch
    from safetensors.torch import save as save_tensors

    _deterministic(config.threads)
    torch.manual_seed(config.seed)
    model = build_model(X.shape[1], config.hidden, config.dropout).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    features = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)).to(device)
    targets = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)).to(device)
    losses: list[float] = []
    start = 0
    if resume is not None:
        start, losses = restore(resume, model, optimiser, fingerprint, config, device)
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="sum")
    n = len(features)
    started = time.perf_counter()
    for epoch in range(start, config.epochs):
        model.train()
        torch.manual_seed(config.seed + 1 + epoch)  # dropout masks of this epoch
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 1009 + epoch)).to(device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        epoch_start = time.perf_counter()
        for first in range(0, n, config.batch_size):
            batch = order[first:first + config.batch_size]
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(features[batch]), targets[batch])
            (loss / len(batch)).backward()
            optimiser.step()
            total += loss.detach().double()
        mean_loss = float(total.item()) / n
        if not math.isfinite(mean_loss):
            raise BadInput(f"training diverged at epoch {epoch + 1} (loss {mean_loss}); lower the learning rate")
        losses.append(mean_loss)
        seconds = time.perf_counter() - epoch_start
        emit("P", json.dumps({"epoch": epoch + 1, "epochs": config.epochs, "loss": mean_loss,
                              "seconds": seconds, "rows_per_s": n / seconds if seconds > 0 else None}).encode())
        done = epoch + 1
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.epochs:
            emit("C", make_checkpoint(model, optimiser, done, losses, fingerprint))
    model.eval()
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    emit("W", save_tensors(state, metadata={"format": MODEL_FORMAT}))
    emit("R", json.dumps({"losses": losses, "resumed_from_epoch": start or None, "device": device,
                          "seconds": time.perf_counter() - started}).encode())



def child_train(header: Mapping[str, Any], blobs: list[bytes], send: Callable[[str, bytes], None],
                facts: Mapping[str, Any]) -> None:
    """Entry point inside the sandbox: decode the job and train."""
    config = TrainingConfig.from_mapping(header["config"])
    rows, width = int(header["rows"]), int(header["width"])
    if len(blobs) < 2 or len(blobs[0]) != rows * width * 4 or len(blobs[1]) != rows * 4:
        raise BadInput("the training process received data of the wrong size")
    X = np.frombuffer(blobs[0], dtype=np.float32).reshape(rows, width)
    y = np.frombuffer(blobs[1], dtype=np.float32)
    resume = blobs[2] if len(blobs) > 2 and blobs[2] else None
    send("P", json.dumps({"isolation": dict(facts)}).encode())
    device = str(header["device"])
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigurationError("the training process sees no CUDA GPU")
    fit_arrays(X, y, config, device=device, fingerprint=str(header["fingerprint"]), resume=resume, emit=send)

