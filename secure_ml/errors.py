"""One exception hierarchy for secure-ml; each error explains itself in one line.

    try:
        store.get_bytes(digest)
    except secure_ml.errors.Error as exc:
        print(exc.explain())          # one clear line for a person
        raise SystemExit(exc.exit_code)

Exit codes follow the CLI contract: 1 for a failed verification or a denial, 2 for bad usage,
bad input or bad configuration.
"""

from __future__ import annotations

from collections.abc import Iterable


class Error(Exception):
    """Base class for every error secure-ml raises on purpose."""

    exit_code = 2
    label = "error"

    def explain(self) -> str:
        """The one line a person sees: what failed, and what to check."""
        message = " ".join(str(self).split())  # never more than one line
        return f"{self.label}: {message}"


class BadInput(Error):
    """Input that is malformed, missing, empty, or hostile."""

    label = "bad input"


class ConfigurationError(Error):
    """A setting, key file or environment that cannot be used as it is."""

    label = "configuration error"


def refuse_unknown(data: Iterable[str], known: Iterable[str], where: str) -> None:
    """Raise ``ConfigurationError`` naming the first key of ``data`` not in ``known`` (``where``: the section)."""
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigurationError(f"{where}: unknown setting {unknown[0]!r}")


class KeyUnavailable(ConfigurationError):
    """A key-encryption key that is missing, unreadable or unsafely stored."""

    label = "key error"


class IntegrityError(Error):
    """Bytes that do not authenticate or do not match their recorded digest."""

    exit_code = 1
    label = "integrity failure"


class VerificationError(Error):
    """A signature, attestation or check that did not verify."""

    exit_code = 1
    label = "verification failed"


class PolicyDenied(Error):
    """An action that policy or separation of duties does not allow."""

    exit_code = 1
    label = "denied"
