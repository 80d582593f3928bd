"""Today's training loop before issue 17, kept verbatim as the benchmark's baseline (never used by the pipeline).

    train_baseline(X, y, config)     # -> (weights safetensors bytes, losses, rows/s per epoch)

One indexed gather per step, ``zero_grad(set_to_none=True)``, autograd, the single-tensor Adam:
what bench_training measures the new loop (secure_ml.training.loop) against, in the same run.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from secure_ml.training.config import TrainingConfig
from secure_ml.training.model import MODEL_FORMAT, build_model


def train_baseline(X: np.ndarray, y: np.ndarray, config: TrainingConfig, *, device: str = "cpu",
                   epochs: int | None = None) -> tuple[bytes, list[float], list[float]]:
    import torch
    from safetensors.torch import save as save_tensors

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model: Any = build_model(X.shape[1], config.hidden, config.dropout).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    features = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)).to(device)
    targets = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)).to(device)
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="sum")
    n = len(features)
    losses: list[float] = []
    rates: list[float] = []
    for epoch in range(epochs if epochs is not None else config.epochs):
        model.train()
        torch.manual_seed(config.seed + 1 + epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 1009 + epoch)).to(device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        started = time.perf_counter()
        for first in range(0, n, config.batch_size):
            batch = order[first:first + config.batch_size]
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(features[batch]), targets[batch])
            (loss / len(batch)).backward()
            optimiser.step()
            total += loss.detach().double()
        rates.append(n / (time.perf_counter() - started))
        losses.append(float(total.item()) / n)
    model.eval()
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return save_tensors(state, metadata={"format": MODEL_FORMAT}), losses, rates
