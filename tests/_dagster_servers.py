"""Real Dagster processes for tests: the webserver, the daemon, and a headless chromium.

    home = make_home(tmp_path)                       # SECURE_ML_HOME + DAGSTER_HOME, initialised
    with webserver(home) as url: ...                 # dagster-webserver on a free 127.0.0.1 port
    with daemon(home): ...                           # dagster-daemon run (sensors, schedules, automation)
    with browser() as page: page.goto(url)           # Debian chromium via Playwright, fresh profile

Every process runs from the repository root against ``workspace.yaml`` with telemetry off, and
is stopped by its own process group id when the block ends (never by name).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_ml.settings import Settings, init_home

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
CHROMIUM = "/usr/bin/chromium"
# The network is closed: without these chromium keeps trying to reach Google's services.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The webserver launches runs itself (no queue, so no daemon needed to dequeue them).
DIRECT_RUNS = ("run_coordinator:\n  module: dagster._core.run_coordinator\n"
               "  class: DefaultRunCoordinator\n")


@dataclass(frozen=True)
class Home:
    root: Path
    environ: dict[str, str]

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.environ)

    @property
    def dagster_home(self) -> Path:
        return self.settings.dagster_home


def make_home(base: Path, *, automation: str = "off", direct_runs: bool = True,
              extra: dict[str, str] | None = None) -> Home:
    root = base / "secure_ml_home"
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("SECURE_ML_", "DAGSTER_", "PYTEST_"))}
    environ.update({
        "SECURE_ML_HOME": str(root), "DAGSTER_HOME": str(root / "dagster"),
        "SECURE_ML_ACTOR": "ui-engineer", "SECURE_ML_AUTOMATION": automation,
        "DAGSTER_DISABLE_TELEMETRY": "1", "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1",
        **(extra or {}),
    })
    home = Home(root, environ)
    init_home(home.settings)
    if direct_runs:
        with (home.dagster_home / "dagster.yaml").open("a") as config:
            config.write(DIRECT_RUNS)
    return home


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def _process(args: list[str], home: Home, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(args, cwd=REPO, env=home.environ, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def _graphql(url: str, query: str) -> dict[str, Any]:
    import json

    request = urllib.request.Request(f"{url}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - our own 127.0.0.1 server
        return dict(json.loads(response.read()))


def wait_for_location(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 150) -> None:
    """Until the webserver answers and the secure_ml code location has loaded (or failed: raise)."""
    query = ("{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
             "locationOrLoadError { __typename ... on PythonError { message } } } } } }")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dagster exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            entries = _graphql(url, query)["data"]["workspaceOrError"]["locationEntries"]
        except (OSError, KeyError, TypeError, ValueError):
            time.sleep(1)
            continue
        for entry in entries:
            if entry["loadStatus"] == "LOADED" and entry["locationOrLoadError"]:
                if entry["locationOrLoadError"]["__typename"] == "PythonError":
                    raise RuntimeError(f"code location failed to load: {entry['locationOrLoadError']['message']}")
                return
        time.sleep(1)
    raise TimeoutError(f"dagster at {url} not ready after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def webserver(home: Home, log_dir: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = log_dir / "webserver.log"
    args = [str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)]
    with _process(args, home, log) as process:
        wait_for_location(url, process, log)
        yield url


@contextlib.contextmanager
def daemon(home: Home, log_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``dagster-daemon run``: sensors, schedules, the automation sensor, run monitoring."""
    log = log_dir / "daemon.log"
    with _process([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], home, log) as process:
        yield process


def read_log(log_dir: Path, name: str = "daemon.log") -> str:
    path = log_dir / name
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


@contextlib.contextmanager
def dagster_dev(home: Home, log_dir: Path) -> Iterator[str]:
    """``dagster dev`` (webserver + daemon: sensors, schedules, automation) as ``make ui`` runs it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = log_dir / "dagster-dev.log"
    args = [str(BIN / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)]
    with _process(args, home, log) as process:
        wait_for_location(url, process, log)
        yield url


@contextlib.contextmanager
def browser(viewport: tuple[int, int] = (1600, 1000)) -> Iterator[Any]:
    """A page in headless Debian chromium with a fresh profile (deleted afterwards)."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": viewport[0], "height": viewport[1]})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(30_000)
            yield page
        finally:
            context.close()
