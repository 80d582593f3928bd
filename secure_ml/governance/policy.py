"""Policy as code: the Rego policies shipped in secure_ml/governance/policies, evaluated with regopy.

    engine = PolicyEngine.from_settings(settings)          # loads policies/*.rego + release.yaml config
    decision = engine.decide("promotion", promotion_input)   # PolicyDecision(allowed, reasons, ...)
    decision.require()                                       # raises PolicyDenied naming every reason

Data (secure_ml/config/release.yaml) is ``data.secure_ml_config.promotion`` and
``data.secure_ml_config.admission``. Each package (``secure_ml.promotion``, ``secure_ml.approval``, ``secure_ml.deployment``,
``secure_ml.admission``) defines a set ``deny`` of human-readable reasons and ``allow`` (true only
when ``deny`` is empty). A decision is allowed only if the policy says ``allow == true`` AND gives
no reason: an undefined result, a policy error or a malformed answer is a denial (fail closed).

The interpreter is built once per engine (modules parsed once); evaluations are serialised by a
lock because a regopy interpreter holds its input as state.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from secure_ml.errors import ConfigurationError, PolicyDenied

POLICY_DIR = Path(__file__).parent / "policies"
PACKAGES = ("promotion", "approval", "deployment", "admission")


def _regopy() -> ModuleType:
    """regopy, loaded after torch when torch is installed.

    rego-cpp's shared library and libtorch_cpu cannot be loaded in that order in one process:
    glibc aborts ("double free or corruption") in torch's static initialisers. Torch first works,
    so a process that may need both (the deploy health check, a Dagster run) loads torch first.
    """
    if "regopy" not in sys.modules and "torch" not in sys.modules and importlib.util.find_spec("torch"):
        import torch  # noqa: F401
    import regopy

    return regopy


class _HasConfig(Protocol):
    def load_config(self, name: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class PolicyDecision:
    """What a policy said: allowed or not, and every reason it gave for a denial."""

    package: str
    allowed: bool
    reasons: tuple[str, ...]
    input_sha256: str
    seconds: float = field(default=0.0, compare=False)

    def require(self) -> PolicyDecision:
        if not self.allowed:
            raise PolicyDenied(f"{self.package} policy denies: " + "; ".join(self.reasons))
        return self

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reasons": list(self.reasons)}

    def markdown(self) -> str:
        """The decision as a short Markdown block for the Dagster UI."""
        head = f"**{self.package} policy: {'ALLOW' if self.allowed else 'DENY'}**"
        if not self.reasons:
            return head + "\n\nNo rule denied."
        return head + "\n\n" + "\n".join(f"- {reason}" for reason in self.reasons)


def canonical_sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


class PolicyEngine:
    """The project's Rego policies with their data, ready to decide."""

    def __init__(self, data: dict[str, Any] | None = None, *, policy_dir: Path | None = None,
                 lazy: bool = False) -> None:
        """``lazy``: compile on the first decision, so a command that decides nothing (a re-run
        demo's ``approve`` or ``deploy``) never loads rego-cpp, nor torch before it (seconds)."""
        self.policy_dir = Path(policy_dir or POLICY_DIR)
        self._files = sorted(self.policy_dir.glob("*.rego"))
        if not self._files:
            raise ConfigurationError(f"no Rego policies in {self.policy_dir}")
        self._data = data
        self._lock = threading.Lock()
        self._rego: Any = None
        if not lazy:
            self._compile()

    def _compile(self) -> None:
        files, data = self._files, self._data
        regopy = _regopy()
        self._regopy = regopy
        rego = regopy.Interpreter()
        try:
            for path in files:
                rego.add_module(path.stem, path.read_text())
            # Data lives beside the packages (data.secure_ml_config), never under them, so a
            # data key can not shadow a rule.
            rego.add_data({"secure_ml_config": data or {}})
        except regopy.RegoError as exc:
            first = " ".join(str(exc).split())[:200]
            raise ConfigurationError(f"Rego policies in {self.policy_dir} do not compile: {first}") from None
        self._rego = rego

    @classmethod
    def from_settings(cls, settings: _HasConfig, *, extra: dict[str, Any] | None = None,
                      lazy: bool = False) -> PolicyEngine:
        release = settings.load_config("release")
        data = {"promotion": release.get("promotion") or {}, "admission": release.get("admission") or {}}
        for key, value in (extra or {}).items():
            data[key] = {**data.get(key, {}), **value}
        return cls(data, lazy=lazy)

    def decide(self, package: str, policy_input: dict[str, Any]) -> PolicyDecision:
        """Evaluate ``data.secure_ml.<package>`` over ``policy_input``; fail closed on anything odd."""
        if package not in PACKAGES:
            raise ConfigurationError(f"unknown policy package {package!r}")
        started = time.perf_counter()
        digest = canonical_sha256(policy_input)
        with self._lock:
            if self._rego is None:
                self._compile()
            try:
                self._rego.set_input_term(json.dumps(policy_input, default=str))
                output = self._rego.query(f"x := {{\"allow\": data.secure_ml.{package}.allow, "
                                          f"\"deny\": data.secure_ml.{package}.deny}}")
                result = output[0]["x"] if output.ok() and len(output) else None
            except (self._regopy.RegoError, IndexError, KeyError, ValueError) as exc:
                result = None
                error = " ".join(str(exc).split())[:200]
            else:
                error = "the policy gave no result"
        elapsed = time.perf_counter() - started
        if not isinstance(result, dict):
            return PolicyDecision(package, False, (f"policy evaluation failed: {error}",), digest, elapsed)
        deny = result.get("deny", [])
        reasons = tuple(sorted(str(r) for r in deny)) if isinstance(deny, list) else ("malformed deny set",)
        allowed = result.get("allow") is True and not reasons
        if not allowed and not reasons:
            reasons = ("the policy did not allow it",)
        return PolicyDecision(package, allowed, reasons, digest, elapsed)
