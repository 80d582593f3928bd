"""Training settings: hyper-parameters and the device to train on.

    config = TrainingConfig.from_mapping(settings.load_config("training")["training"])
    device, note = resolve_device(config)          # "cpu" or "cuda", and why when it differs

Unknown keys and wrong types are refused with one line (ConfigurationError).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from secure_ml.errors import ConfigurationError, refuse_unknown

DEVICES = ("cpu", "cuda", "auto")


@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters and run settings (``training:`` in training.yaml)."""

    hidden: tuple[int, ...] = (32, 16)
    dropout: float = 0.1
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 0.003
    weight_decay: float = 0.0001
    seed: int = 20261123
    threads: int = 1
    device: str = "cpu"
    cuda_fallback: bool = False
    checkpoint_every: int = 5
    segment_epochs: int = 1      # the training chain records the state every this many epochs
    threshold: float = 0.5

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> TrainingConfig:
        data = dict(data or {})
        refuse_unknown(data, cls.__dataclass_fields__, "training")
        try:
            config = cls(
                hidden=tuple(int(h) for h in data.get("hidden", cls.hidden)),
                dropout=float(data.get("dropout", cls.dropout)),
                epochs=int(data.get("epochs", cls.epochs)),
                batch_size=int(data.get("batch_size", cls.batch_size)),
                learning_rate=float(data.get("learning_rate", cls.learning_rate)),
                weight_decay=float(data.get("weight_decay", cls.weight_decay)),
                seed=int(data.get("seed", cls.seed)),
                threads=int(data.get("threads", cls.threads)),
                device=str(data.get("device", cls.device)),
                cuda_fallback=bool(data.get("cuda_fallback", cls.cuda_fallback)),
                checkpoint_every=int(data.get("checkpoint_every", cls.checkpoint_every)),
                segment_epochs=int(data.get("segment_epochs", cls.segment_epochs)),
                threshold=float(data.get("threshold", cls.threshold)),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"training: a setting has the wrong type ({exc})") from None
        return config.validated()

    def validated(self) -> TrainingConfig:
        problems = [
            (not self.hidden or any(h < 1 for h in self.hidden), "hidden must list positive layer widths"),
            (not 0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (self.epochs < 1, "epochs must be at least 1"),
            (self.batch_size < 1, "batch_size must be at least 1"),
            (not (self.learning_rate > 0 and math.isfinite(self.learning_rate)), "learning_rate must be positive"),
            (self.weight_decay < 0, "weight_decay must not be negative"),
            (self.threads < 1, "threads must be at least 1"),
            (self.device not in DEVICES, f"device must be one of {', '.join(DEVICES)}"),
            (self.checkpoint_every < 0, "checkpoint_every must be 0 (never) or more"),
            (self.segment_epochs < 1, "segment_epochs must be at least 1"),
            (not 0 < self.threshold < 1, "threshold must be in (0, 1)"),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigurationError(f"training: {message}")
        return self

    def hyperparameters(self) -> dict[str, Any]:
        """What determines the weights (the digest of this is part of the checkpoint binding)."""
        values = asdict(self)
        values["hidden"] = list(self.hidden)
        return values


def resolve_device(config: TrainingConfig, *, cuda_available: bool | None = None) -> tuple[str, str]:
    """(device, note). A GPU asked for but absent is an error unless ``cuda_fallback`` is set."""
    if config.device == "cpu":
        return "cpu", ""
    if cuda_available is None:
        import torch

        cuda_available = bool(torch.cuda.is_available())
    if cuda_available:
        return "cuda", ""
    if config.device == "auto":
        return "cpu", "device auto: no CUDA GPU here, trained on the CPU"
    if config.cuda_fallback:
        return "cpu", "device cuda asked for but no CUDA GPU is available: fell back to the CPU (cuda_fallback: true)"
    raise ConfigurationError("training.device is 'cuda' but no CUDA GPU is available on this machine "
                             "(torch.cuda.is_available() is False); set device: cpu, or cuda_fallback: true "
                             "to train on the CPU instead")

