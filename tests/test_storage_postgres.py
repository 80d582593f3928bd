"""Production storage: the Dagster instance on a real PostgreSQL server started by the test.

Touches: `secure-ml init` and `secure-ml pipeline run` with SECURE_ML_ENV=production (dagster.yaml
on dagster-postgres, the KEK from SECURE_ML_KEK), then reads the run and materialization back
through PostgreSQL. Does not touch Kubernetes (see tests for k8s manifests).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts a PostgreSQL server and runs the pipeline on it

BIN = Path(sys.executable).parent
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None) if Path("/usr/lib/postgresql").exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(args: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; run it as the postgres system user when we are root.
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@pytest.fixture(scope="module")
def postgres() -> Iterator[dict[str, str]]:
    if PG_BIN is None or not (PG_BIN / "initdb").exists():
        pytest.skip("PostgreSQL server binaries are not installed (make system-deps installs them)")
    root = Path(tempfile.mkdtemp(prefix="secure-ml-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
    password = base64.urlsafe_b64encode(os.urandom(18)).decode()
    pwfile = root / "pw"
    pwfile.write_text(password)
    if os.geteuid() == 0:
        shutil.chown(pwfile, "postgres")
    subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", "dagster", "-A", "scram-sha-256",
                                 f"--pwfile={pwfile}"]), check=True, capture_output=True)
    port = _free_port()
    subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"),
                                 "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"]),
                   check=True, capture_output=True)
    env = {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(port), "DAGSTER_PG_USER": "dagster",
           "DAGSTER_PG_PASSWORD": password, "DAGSTER_PG_DB": "postgres"}
    try:
        yield env
    finally:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _env(tmp_path: Path, postgres: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SECURE_ML_", "DAGSTER_"))}
    env.update(postgres)
    env.update({
        "SECURE_ML_ENV": "production",
        "SECURE_ML_HOME": str(tmp_path / "home"),
        "DAGSTER_HOME": str(tmp_path / "home" / "dagster"),
        "SECURE_ML_KEK": base64.b64encode(os.urandom(32)).decode(),
        "SECURE_ML_ACTOR": "ci-runner",
    })
    return env


def test_production_refuses_a_local_keyring(tmp_path: Path, postgres: dict[str, str]) -> None:
    env = _env(tmp_path, postgres)
    del env["SECURE_ML_KEK"]
    result = subprocess.run([BIN / "secure-ml", "init"], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "production needs its key-encryption key from a secret" in result.stderr
    assert "Traceback" not in result.stderr


def test_pipeline_runs_on_postgres_and_reads_back(tmp_path: Path, postgres: dict[str, str]) -> None:
    env = _env(tmp_path, postgres)
    init = subprocess.run([BIN / "secure-ml", "init"], env=env, capture_output=True, text=True)
    assert init.returncode == 0, init.stderr
    dagster_yaml = (tmp_path / "home" / "dagster" / "dagster.yaml").read_text()
    assert "postgres" in dagster_yaml and postgres["DAGSTER_PG_PASSWORD"] not in dagster_yaml
    run = subprocess.run([BIN / "secure-ml", "pipeline", "run", "--select", "dataset", "--json"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout)
    digest = summary["assets"][0]["sha256"]

    # Read the materialization back through a fresh instance on the same PostgreSQL database.
    probe = (
        "import json, dagster as dg\n"
        "inst = dg.DagsterInstance.get()\n"
        "ev = inst.get_latest_materialization_event(dg.AssetKey('dataset'))\n"
        "print(json.dumps({'storage': type(inst.event_log_storage).__name__,"
        " 'sha256': ev.asset_materialization.metadata['sha256'].value,"
        " 'run': ev.run_id}))\n"
    )
    read = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert read.returncode == 0, read.stderr[-2000:]
    stored = json.loads(read.stdout.strip().splitlines()[-1])
    assert stored["storage"] == "PostgresEventLogStorage"
    assert stored["sha256"] == digest
    assert stored["run"] == summary["run_id"]
    # The password never reaches the Dagster event log or the audit log.
    audit = (tmp_path / "home" / "audit" / "audit.jsonl").read_text()
    assert postgres["DAGSTER_PG_PASSWORD"] not in audit and env["SECURE_ML_KEK"] not in audit
