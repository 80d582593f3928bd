"""secure_ml.governance.notify against a real HTTP server on 127.0.0.1 started by each test.

Touches: the Notifier's POST (body, headers), its audit entries (ok / fail / skipped, endpoint
redacted to scheme://host:port), refused connections, error statuses, redirects (never followed),
a hung endpoint (bounded by the timeout), and configuration refusals (file://, user:password@).
Does not touch: HTTPS (no certificates here) or a real chat service.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from secure_ml.errors import ConfigurationError
from secure_ml.governance.notify import Notifier, redacted_url
from secure_ml.settings import Settings


class Hook:
    """A webhook receiver: records every request; the path decides the answer."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                hook.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if self.path.startswith("/hang"):
                    time.sleep(3)
                status = {"/fail": 500, "/moved": 302}.get(self.path.split("?")[0], 204)
                self.send_response(status)
                if status == 302:
                    self.send_header("Location", f"http://127.0.0.1:{hook.port}/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802
                hook.requests.append({"path": self.path, "method": "GET"})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def hook() -> Iterator[Hook]:
    receiver = Hook()
    receiver.thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


def audit_entries(settings: Settings, action: str = "notify.webhook") -> list[dict[str, Any]]:
    return [e for e in settings.audit_log().entries() if e["action"] == action]


def test_posts_the_event_as_json_and_audits_delivery_without_the_token(settings: Settings, hook: Hook) -> None:
    secret_path = "/hooks/T000/B000/s3cr3t-token"
    notifier = Notifier(url=hook.url(secret_path), audit=settings.audit_log(), actor="automation")
    assert notifier.notify("check.failed", subject="check:dataset:ciphertext_authentic",
                           details={"reason": "chunk 0 failed authentication"}) is True
    [request] = hook.requests
    assert request["path"] == secret_path
    assert request["headers"]["Content-Type"] == "application/json"
    payload = json.loads(request["body"])
    assert payload["event"] == "check.failed" and payload["source"] == "secure-ml"
    assert payload["subject"] == "check:dataset:ciphertext_authentic"
    assert payload["details"] == {"reason": "chunk 0 failed authentication"}
    [entry] = audit_entries(settings)
    assert entry["outcome"] == "ok" and entry["details"]["http_status"] == 204
    assert entry["details"]["endpoint"] == f"http://127.0.0.1:{hook.port}"
    assert "s3cr3t" not in settings.audit_path.read_text()


def test_server_error_is_a_failed_delivery_audited_not_raised(settings: Settings, hook: Hook) -> None:
    notifier = Notifier(url=hook.url("/fail"), audit=settings.audit_log())
    assert notifier.notify("run.failed", subject="run:abc") is False
    [entry] = audit_entries(settings)
    assert entry["outcome"] == "fail" and entry["details"]["http_status"] == 500


def test_redirects_are_not_followed(settings: Settings, hook: Hook) -> None:
    notifier = Notifier(url=hook.url("/moved"), audit=settings.audit_log())
    assert notifier.notify("run.failed", subject="run:abc") is False
    assert [r["path"] for r in hook.requests] == ["/moved"]  # nothing went to /elsewhere
    assert audit_entries(settings)[0]["details"]["http_status"] == 302


def test_refused_connection_is_audited_and_returns_false(settings: Settings) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    notifier = Notifier(url=f"http://127.0.0.1:{port}/x?token=abc", audit=settings.audit_log(), timeout_s=2)
    assert notifier.notify("run.failed", subject="run:abc") is False
    [entry] = audit_entries(settings)
    assert entry["outcome"] == "fail" and "refused" in entry["details"]["reason"].lower()
    assert "token=abc" not in settings.audit_path.read_text()


def test_a_hung_endpoint_is_bounded_by_the_timeout(settings: Settings, hook: Hook) -> None:
    notifier = Notifier(url=hook.url("/hang"), audit=settings.audit_log(), timeout_s=0.5)
    started = time.monotonic()
    assert notifier.notify("run.failed", subject="run:abc") is False
    assert time.monotonic() - started < 2.5
    assert audit_entries(settings)[0]["outcome"] == "fail"


def test_no_url_is_audited_as_skipped(settings: Settings) -> None:
    assert Notifier(url="", audit=settings.audit_log()).notify("run.failed", subject="run:abc") is False
    [entry] = audit_entries(settings)
    assert entry["outcome"] == "skipped"


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.org/x", "gopher://h/", "http://",
                                 "http://user:pw@127.0.0.1/hook"])
def test_unsafe_urls_are_refused_at_configuration(settings: Settings, url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Notifier(url=url, audit=settings.audit_log())
    assert "pw" not in str(caught.value)


def test_from_config_reads_the_url_from_the_named_variable(settings: Settings, hook: Hook) -> None:
    environ = {**settings.environ, "SECURE_ML_WEBHOOK_URL": hook.url("/from-env")}
    notifier = Notifier.from_config(Settings.from_env(environ))
    assert notifier.notify("run.failed", subject="run:abc") is True
    assert hook.requests[0]["path"] == "/from-env"
    explicit = Notifier.from_config(settings, {"webhook": {"url": hook.url("/explicit"), "url_env": "UNSET_X"}})
    assert explicit.url.endswith("/explicit")


def test_redacted_url_keeps_only_scheme_host_and_port() -> None:
    assert redacted_url("https://hooks.example.org/services/T/B/XYZ?x=1") == "https://hooks.example.org"
    assert redacted_url("http://127.0.0.1:8080/a/b") == "http://127.0.0.1:8080"
