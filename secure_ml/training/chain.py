"""The training chain: checkpoint digests that let anyone re-check training without training again.

    chain = TrainingChain.from_bytes((model_dir / CHAIN_FILE).read_bytes())   # the segment start states
    chain.verify(record["result"]["chain"], weights)      # IntegrityError: a state, the record or the weights differ
    picks = choose_segments(len(chain.segments), k, run_id=run_id, data_sha256=train_sha256)
    detection_probability(0.1, k=3)                        # 1 - (1 - f)^k = 0.271

After Proof-of-Learning (Jia et al., IEEE S&P 2021). Training records the full state (weights
and Adam moments) at epoch 0, every ``segment_epochs`` epochs and at the end; each state's
digest (:func:`state_digest`: SHA-256 over every tensor's name, dtype, shape and bytes, in name
order) goes into the training record, which the model signature and the attestation cover. A
segment (one state to the next) is deterministic given its start state, the data and the seeds:
each epoch's shuffle and dropout come from (seed, epoch) alone. A verifier re-executes k segments
chosen by something the trainer cannot predict (the run id hashed with the data digest) and
compares the digest it reaches with the chain's. A trainer who faked a fraction f of the segments
is caught with probability at least 1 - (1 - f)^k (exactly 1 - C(n - m, k) / C(n, k) for m faked
of n segments, sampled without replacement).

Where the states live: ``training_chain.safetensors`` in the model directory (tensors named
``<epoch:06d>.<name>``; never a pickle), so the states travel, encrypted in the store and signed,
with the model they lead to, and ``secure-ml verify-training VERSION`` can re-check any segment of
a registered model later. For this MLP the states are a few tens of KiB.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from secure_ml.errors import IntegrityError

CHAIN_FILE = "training_chain.safetensors"
CHAIN_FORMAT = "secure-ml-training-chain/1"


def boundaries(epochs: int, every: int) -> list[int]:
    """The epochs whose end state the chain records: 0, every N, and the last."""
    marks = list(range(0, epochs, every)) if every > 0 else [0]
    return marks + [epochs]


def state_tensors(model: Any, optimiser: Any) -> dict[str, Any]:
    """A copy of the full training state as CPU tensors: ``model.<param>`` and ``optim.<index>.<name>``."""
    tensors = {f"model.{k}": v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    for index, state in optimiser.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = value.detach().to("cpu", copy=True).contiguous()
    return tensors


def load_state(model: Any, optimiser: Any, tensors: Mapping[str, Any], device: str) -> None:
    """Put a state from :func:`state_tensors` (torch tensors or numpy arrays) back into model and optimiser."""
    import torch

    def as_tensor(value: Any) -> Any:
        return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))

    model.load_state_dict({k[6:]: as_tensor(v).to(device) for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            # a copy: the optimiser updates its state in place, and the chain's states must not change
            state.setdefault(int(index), {})[name] = as_tensor(value).to(device, copy=True)
    groups = optimiser.state_dict()["param_groups"]
    # load_state_dict casts each value as this optimiser needs (a fused Adam keeps `step` on the device).
    optimiser.load_state_dict({"state": state, "param_groups": groups})


def state_digest(arrays: Mapping[str, Any]) -> str:
    """SHA-256 over each tensor's name, dtype, shape and bytes, in name order (numpy arrays or CPU tensors)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        value = arrays[name]
        array = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        array = np.ascontiguousarray(array)
        h.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode() + b"\0")
        h.update(array.tobytes())
    return h.hexdigest()


def pack(states: Mapping[int, Mapping[str, Any]], metadata: Mapping[str, str] | None = None) -> bytes:
    """States by epoch as one safetensors file (``<epoch:06d>.<name>``)."""
    from safetensors.torch import save as save_tensors

    tensors = {f"{epoch:06d}.{name}": value for epoch, state in states.items() for name, value in state.items()}
    return save_tensors(tensors, metadata={"format": CHAIN_FORMAT, **(metadata or {})})


def unpack(data: bytes) -> tuple[dict[int, dict[str, np.ndarray]], dict[str, str]]:
    """(states by epoch as numpy arrays, metadata) of a file :func:`pack` wrote; IntegrityError otherwise."""
    from safetensors import SafetensorError
    from safetensors.numpy import load as load_arrays

    try:
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + size]).get("__metadata__") or {}
        if meta.get("format") != CHAIN_FORMAT:
            raise ValueError("not a training chain")
        arrays = load_arrays(data)
    except (ValueError, AttributeError, SafetensorError) as exc:
        raise IntegrityError(f"the training chain file is unreadable ({str(exc)[:80]})") from None
    states: dict[int, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        epoch, _, name = key.partition(".")
        if not epoch.isdigit() or not name:
            raise IntegrityError(f"the training chain file has a malformed tensor name {key[:60]!r}")
        states.setdefault(int(epoch), {})[name] = value
    return states, {str(k): str(v) for k, v in meta.items()}


@dataclass(frozen=True)
class TrainingChain:
    """The recorded states of one training run, epoch by epoch."""

    states: dict[int, dict[str, np.ndarray]]

    @classmethod
    def from_bytes(cls, data: bytes) -> TrainingChain:
        return cls(unpack(data)[0])

    @property
    def epochs(self) -> list[int]:
        return sorted(self.states)

    @property
    def segments(self) -> list[tuple[int, int]]:
        """(start epoch, end epoch) of each segment, in order."""
        marks = self.epochs
        return list(zip(marks[:-1], marks[1:], strict=True))

    def entries(self) -> list[dict[str, Any]]:
        """What the training record holds: each state's epoch and digest."""
        return [{"epoch": epoch, "state_sha256": state_digest(self.states[epoch])} for epoch in self.epochs]

    def verify(self, recorded: Sequence[Mapping[str, Any]], weights: bytes) -> None:
        """Each stored state matches the record's digest for its epoch, and the last state's weights are
        the model's weights. Raises IntegrityError naming the first thing that differs."""
        from safetensors.numpy import load as load_arrays

        wanted = {int(e["epoch"]): str(e["state_sha256"]) for e in recorded}
        if sorted(wanted) != self.epochs or len(wanted) < 2:
            raise IntegrityError(f"the training chain holds states for epochs {self.epochs}, the training record "
                                 f"names {sorted(wanted)}")
        for epoch in self.epochs:
            if state_digest(self.states[epoch]) != wanted[epoch]:
                raise IntegrityError(f"the training chain's state at epoch {epoch} does not match the digest "
                                     "the training record holds (tampered chain)")
        final = self.states[self.epochs[-1]]
        model = {k[6:]: v for k, v in final.items() if k.startswith("model.")}
        if state_digest(model) != state_digest(load_arrays(weights)):
            raise IntegrityError("the training chain's final state is not the model's weights (model.safetensors)")


def choose_segments(total: int, k: int, *, run_id: str, data_sha256: str) -> list[int]:
    """k distinct segment indexes (all when k >= total), seeded by the run id hashed with the data digest:
    the trainer, who finished before the run id of the check is known, cannot predict them."""
    seed = hashlib.sha256(f"secure-ml-segments\0{run_id}\0{data_sha256}".encode()).digest()
    return sorted(random.Random(seed).sample(range(total), min(max(k, 0), total)))


def detection_probability(f: float, k: int) -> float:
    """Chance that k checked segments include at least one of a fraction f faked: 1 - (1 - f)^k."""
    return 1.0 - (1.0 - f) ** k


def exact_detection(total: int, faked: int, k: int) -> float:
    """The same, exactly, for ``faked`` of ``total`` segments sampled without replacement."""
    k = min(k, total)
    return 1.0 - math.comb(total - faked, k) / math.comb(total, k) if total else 0.0
