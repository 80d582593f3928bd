"""Loading a trained model directory (safetensors + JSON only) and predicting with it.

    predict = load_predictor(model_dir)      # rows (dicts of feature values) -> P(label = 1)
    loaded = load_model(model_dir)           # .model (torch), .preprocessing, .config, .threshold
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from secure_ml.errors import IntegrityError
from secure_ml.training.features import Preprocessing
from secure_ml.training.model import MODEL_FORMAT, build_model


@dataclass
class LoadedModel:
    model: Any
    preprocessing: Preprocessing
    config: dict[str, Any]

    @property
    def threshold(self) -> float:
        return float(self.config.get("threshold", 0.5))

    def logits(self, X: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).numpy()

    def probabilities(self, X: np.ndarray) -> np.ndarray:
        from scipy.special import expit  # the logistic without overflow for large logits

        return expit(self.logits(X).astype(np.float64))


def load_model(model_dir: Path | str) -> LoadedModel:
    """Model, preprocessing and config from a model directory (safetensors + JSON only)."""
    import torch
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "config.json").read_text())
        prep = Preprocessing.from_json(json.loads((model_dir / "preprocessing.json").read_text()))
    except FileNotFoundError as exc:
        raise IntegrityError(f"model directory lacks {Path(str(exc.filename)).name}") from None
    except ValueError:
        raise IntegrityError("the model's config.json or preprocessing.json is not JSON") from None
    if config.get("format") != MODEL_FORMAT or int(config.get("inputs", -1)) != prep.width:
        raise IntegrityError("config.json does not describe this model's inputs")
    model = build_model(prep.width, [int(h) for h in config["hidden"]], float(config.get("dropout", 0.0)))
    try:
        state = load_file(str(model_dir / "model.safetensors"))
        model.load_state_dict(state)
    except (RuntimeError, OSError, ValueError) as exc:
        raise IntegrityError(f"model.safetensors does not fit config.json ({str(exc).splitlines()[0][:120]})") from None
    model.eval()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return LoadedModel(model, prep, config)


def load_predictor(model_dir: Path | str) -> Callable[[list[dict[str, Any]]], list[float]]:
    """rows (dicts of feature values) -> P(label = 1); what the model server calls."""
    import pandas as pd

    loaded = load_model(model_dir)

    def predict(rows: list[dict[str, Any]]) -> list[float]:
        X, _ = loaded.preprocessing.transform(pd.DataFrame(rows), where="request")
        return [float(p) for p in loaded.probabilities(X)]

    return predict

