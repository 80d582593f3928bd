"""Telling people when a run or a check failed: an audited JSON POST to a webhook.

    notifier = Notifier.from_config(settings)       # automation.yaml: webhook.url / webhook.url_env
    notifier.notify("check.failed", subject="dataset:ciphertext_authentic", details={...})

Every notification is audited (``notify.webhook`` with outcome ``ok``, ``fail`` or ``skipped``).
A webhook that is down never breaks the pipeline: the failure is audited and the call returns
False. Webhook URLs often embed a token (Slack, Teams), so only the scheme and host are ever
written to the audit log or returned in messages.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from secure_ml.custody.audit import AuditLog
from secure_ml.errors import ConfigurationError
from secure_ml.settings import Settings

DEFAULT_TIMEOUT_S = 5.0
MAX_BODY_BYTES = 64 << 10


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# No proxies from the environment either: an event must not detour through a host we did not name.
_OPENER = urllib.request.build_opener(_NoRedirects(), urllib.request.ProxyHandler({}))


def redacted_url(url: str) -> str:
    """``scheme://host[:port]`` only: paths and queries of webhook URLs are credentials."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"


@dataclass(frozen=True)
class Notifier:
    """Posts JSON events to ``url`` (empty: notifications are audited as skipped)."""

    url: str
    audit: AuditLog
    actor: str = "secure-ml-automation"
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.url:
            parts = urlsplit(self.url)
            # file://, ftp:// and friends would turn a config value into a local-file or SSRF primitive.
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigurationError(f"webhook URL must be http(s)://host/..., not {parts.scheme or 'no'} scheme")
            if parts.username or parts.password:
                raise ConfigurationError("webhook URL must not embed a user name or password")

    @classmethod
    def from_config(cls, settings: Settings, config: dict[str, Any] | None = None) -> Notifier:
        """The webhook in ``automation.yaml``: ``webhook.url``, else the variable named by ``webhook.url_env``."""
        webhook = dict((config if config is not None else settings.load_config("automation")).get("webhook") or {})
        url = str(webhook.get("url") or "")
        if not url and webhook.get("url_env"):
            url = settings.environ.get(str(webhook["url_env"]), "")
        return cls(url=url, audit=settings.audit_log(), actor=settings.actor(),
                   timeout_s=float(webhook.get("timeout_s", DEFAULT_TIMEOUT_S)))

    def notify(self, event: str, *, subject: str, details: dict[str, Any] | None = None) -> bool:
        """POST ``{"event", "subject", "time", "details"}``; audit the outcome; True if delivered."""
        payload = {"source": "secure-ml", "event": event, "subject": subject,
                   "time": datetime.now(UTC).isoformat(), "details": details or {}}
        audit_details: dict[str, Any] = {"event": event}
        if not self.url:
            self.audit.record(self.actor, "notify.webhook", subject=subject, outcome="skipped",
                              details={**audit_details, "reason": "no webhook URL configured"})
            return False
        audit_details["endpoint"] = redacted_url(self.url)
        body = json.dumps(payload, sort_keys=True, default=str).encode()[:MAX_BODY_BYTES]
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": "secure-ml-notify/1"})
        try:
            # Redirects are not followed (a 3xx is a failed delivery): the URL we checked is the only
            # place events go. The timeout bounds a hung endpoint.
            with _OPENER.open(request, timeout=self.timeout_s) as response:
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            status = int(exc.code)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            self.audit.record(self.actor, "notify.webhook", subject=subject, outcome="fail",
                              details={**audit_details, "reason": f"{type(exc).__name__}: {str(reason)[:200]}"})
            return False
        delivered = 200 <= status < 300
        self.audit.record(self.actor, "notify.webhook", subject=subject, outcome="ok" if delivered else "fail",
                          details={**audit_details, "http_status": status})
        return delivered
