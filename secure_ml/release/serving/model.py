"""The model a server serves: loaded only after the verification chain passes, with its input contract.

    model = load_deployment(location, trust=trust)     # the verification chain, pinned to the receipt's digest
    rows = [model.spec.validate(item, i) for i, item in enumerate(instances)]   # BadInput naming the field
    probabilities = model.predict(rows)
    result = health_probe(location, trust=trust)       # HealthResult: load as the server does, predict one row

What it refuses: a model directory that fails the verification chain
(secure_ml.security.verification: signature against trusted signers, files hashing to the pinned
digest, attestation and its subjects when present), that holds any file other than the model's
safetensors and JSON/Markdown files (nothing is ever unpickled), or symlinks; and instances that do
not match the model's preprocessing (unknown or missing features, wrong types, numbers that are not
finite or do not fit a float, unseen categories), each with one line naming the field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_ml.errors import BadInput, IntegrityError, VerificationError
from secure_ml.release.deployed import ATTESTATION_FILE, RECEIPT_FILE, SIGNATURE_FILE, HealthResult
from secure_ml.security import verification
from secure_ml.security.verification import TrustPolicy
from secure_ml.training.predictor import load_predictor

FLOAT32_MAX = 3.4028234663852886e38
ALLOWED_FILES = re.compile(r"^(model\.safetensors|config\.json|preprocessing\.json|training_record\.json|training_chain\.safetensors|MODEL_CARD\.md)$")


# -- the model ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureSpec:
    """What an instance must look like, from the model's preprocessing.json."""

    numeric: dict[str, tuple[float, float]]          # name -> (mean, scale)
    categorical: dict[str, tuple[str, ...]]          # name -> known categories, in encoding order
    order: tuple[str, ...]

    @classmethod
    def from_preprocessing(cls, prep: Mapping[str, Any]) -> FeatureSpec:
        try:
            numeric_raw = prep.get("numeric") or {}
            means = prep.get("means") or prep.get("mean") or {}
            scales = prep.get("scales") or prep.get("stds") or prep.get("std") or prep.get("scale") or {}
            numeric: dict[str, tuple[float, float]] = {}
            if isinstance(numeric_raw, Mapping):
                for name, spec in numeric_raw.items():
                    spec = spec if isinstance(spec, Mapping) else {}
                    numeric[str(name)] = (float(spec.get("mean", means.get(name, 0.0))),
                                          float(spec.get("std", spec.get("scale", scales.get(name, 1.0)))) or 1.0)
            else:
                for name in numeric_raw:
                    numeric[str(name)] = (float(means.get(name, 0.0)), float(scales.get(name, 1.0)) or 1.0)
            categorical_raw = prep.get("categorical") or prep.get("categories") or {}
            categorical = {str(name): tuple(str(c) for c in (spec.get("categories", []) if isinstance(spec, Mapping)
                                                              else spec))
                           for name, spec in dict(categorical_raw).items()}
        except (TypeError, ValueError, AttributeError) as exc:
            raise IntegrityError(f"the model's preprocessing.json is not usable ({exc})") from None
        order = tuple(str(f) for f in (prep.get("features") or [*numeric, *categorical]))
        if not numeric and not categorical:
            raise IntegrityError("the model's preprocessing.json names no features")
        return cls(numeric, categorical, order)

    def validate(self, instance: Any, index: int) -> dict[str, Any]:
        where = f"instance {index}"
        if not isinstance(instance, Mapping):
            raise BadInput(f"{where} is not an object")
        known = set(self.numeric) | set(self.categorical)
        unknown = sorted(set(map(str, instance)) - known)
        if unknown:
            raise BadInput(f"{where}: unknown field {unknown[0]!r}")
        missing = sorted(known - set(map(str, instance)))
        if missing:
            raise BadInput(f"{where}: missing field {missing[0]!r}")
        row = dict(instance)
        for name in self.numeric:
            value = instance[name]
            try:
                # An integer too large for a float (json accepts any) raises OverflowError: a 400, not a 500.
                number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
            except OverflowError:
                number = math.nan
            if not math.isfinite(number):
                raise BadInput(f"{where}: field {name!r} must be a finite number")
            mean, scale = self.numeric[name]
            if abs(number) > FLOAT32_MAX or abs((number - mean) / scale) > FLOAT32_MAX:
                # The model computes in float32: a larger value would become inf and answer NaN
                # (found by schemathesis: a 500).
                raise BadInput(f"{where}: field {name!r} is out of the model's range")
            row[name] = number
        for name, categories in self.categorical.items():
            value = instance[name]
            if not isinstance(value, str):
                raise BadInput(f"{where}: field {name!r} must be a string")
            if value not in categories:
                raise BadInput(f"{where}: field {name!r} has unseen category {value[:40]!r}")
        return row

    def example(self) -> dict[str, Any]:
        """One representative instance (means, first categories), for health checks."""
        return {**{n: m for n, (m, _) in self.numeric.items()},
                **{n: c[0] for n, c in self.categorical.items() if c}}


Predictor = Callable[[list[dict[str, Any]]], list[float]]


@dataclass
class LoadedModel:
    directory: Path
    model_digest: str
    version: str
    spec: FeatureSpec
    predict: Predictor
    threshold: float = 0.5
    details: dict[str, Any] = field(default_factory=dict)
    name: str = "model"        # what the Open Inference Protocol routes call it (/v2/models/{name})


def load_verified(model_dir: Path | str, *, trust: TrustPolicy, expected_digest: str, bundle: bytes | Path,
                  envelope: bytes | Path | None = None, version: str = "") -> LoadedModel:
    """Load ``model_dir`` only after the verification chain passes: signature against ``trust``, files
    hashing to ``expected_digest``, and the attestation with its subjects when one is given."""
    model_dir = Path(model_dir)
    verified = verification.verify_model(model_dir, bundle, envelope, trust=trust, expected_digest=expected_digest)
    strays = [n for n in verified.files if not ALLOWED_FILES.match(n)]
    if strays:
        # Only safetensors and JSON are ever loaded: anything else (a pickle by any name) is refused.
        raise VerificationError(f"model directory holds an unexpected file: {strays[0]}")
    try:
        prep = json.loads((model_dir / "preprocessing.json").read_text())
        config = json.loads((model_dir / "config.json").read_text())
    except FileNotFoundError as exc:
        raise VerificationError(f"model directory lacks {Path(str(exc.filename)).name}") from None
    except ValueError:
        raise VerificationError("the model's config.json or preprocessing.json is not JSON") from None
    spec = FeatureSpec.from_preprocessing(prep)
    threshold = float(config.get("threshold", 0.5)) if isinstance(config, Mapping) else 0.5
    details = {"signer": verified.signer, "method": verified.method, **verified.attestation}
    # The training stage's loader is the one loader (safetensors: no code runs on load).
    return LoadedModel(model_dir, verified.model_digest, version, spec, load_predictor(model_dir), threshold, details)


def load_deployment(location: Path | str, *, trust: TrustPolicy, expected_digest: str | None = None) -> LoadedModel:
    """Load a deployed directory (model/, model.sig, attestation, DEPLOYMENT.json) after the chain passes.

    The digest is pinned to the receipt's (and to ``expected_digest`` when given). An attestation the
    receipt names must be there: removing it does not downgrade the check to signature-only.
    """
    location = Path(location)
    try:
        receipt = json.loads((location / RECEIPT_FILE).read_text())
    except (FileNotFoundError, ValueError):
        raise VerificationError(f"{location} is not a deployment (no readable {RECEIPT_FILE})") from None
    digest = str(receipt.get("model_digest", ""))
    if expected_digest is not None and digest != expected_digest:
        raise VerificationError(f"deployment {location.name} is {digest[:16]}…, not the expected {expected_digest[:16]}…")
    bundle = location / str(receipt.get("signature_file") or SIGNATURE_FILE)
    if not bundle.is_file():
        raise VerificationError(f"deployment {location.name} has no signature bundle")
    named = receipt.get("attestation_file")
    envelope = location / str(named or ATTESTATION_FILE)
    if named and not envelope.is_file():
        raise VerificationError(f"deployment {location.name} lacks its attestation {envelope.name}")
    return load_verified(location / "model", trust=trust, expected_digest=digest, bundle=bundle,
                         envelope=envelope if envelope.is_file() else None, version=str(receipt.get("version", "")))


def health_probe(location: Path | str, *, trust: TrustPolicy) -> HealthResult:
    """Load a deployment the way the server does and predict one row: healthy only if that works."""
    model = load_deployment(location, trust=trust)
    example = model.spec.example()
    probabilities = model.predict([model.spec.validate(example, 0)])
    if len(probabilities) != 1 or not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in probabilities):
        return HealthResult(False, f"the model answered {probabilities!r} for a representative row, "
                                   "not one probability in [0, 1]")
    return HealthResult(True, f"predicted {probabilities[0]:.4f} for a representative row",
                        {"probability": probabilities[0]})


