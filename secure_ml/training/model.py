"""The model: a tabular MLP whose weights live in safetensors (never a pickle).

    net = build_model(inputs=prep.width, hidden=[32, 16], dropout=0.1)   # torch.nn.Module
    net.state_dict().keys()   # layers.0.weight, layers.0.bias, ..., one logit out
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MODEL_FORMAT = "secure-ml-model/1"


def build_model(inputs: int, hidden: Sequence[int], dropout: float) -> Any:
    """Linear/ReLU/Dropout blocks and a single-logit head; state keys ``layers.N.weight``."""
    import torch

    class TabularMLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            blocks: list[torch.nn.Module] = []
            width = inputs
            for size in hidden:
                blocks += [torch.nn.Linear(width, size), torch.nn.ReLU(), torch.nn.Dropout(dropout)]
                width = size
            blocks.append(torch.nn.Linear(width, 1))
            self.layers = torch.nn.Sequential(*blocks)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x).squeeze(-1)  # type: ignore[no-any-return]

    return TabularMLP()

