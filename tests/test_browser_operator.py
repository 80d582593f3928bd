"""The operator's view (issue 18) in a real browser: a rejected drop, its reason, the deployment, the plots.

Touches: a fresh SECURE_ML_HOME/DAGSTER_HOME with a signed trust policy (owner, pat who adds data
and trains, carol an approver, dave a deployer), the real `secure-ml` CLI (a whole pipeline run on
the sample with 6 training epochs: ingest, train, release as three named runs; then a 15%
label-flip drop, rejected at validation; carol's approval and dave's deploy), one real
``dagster-webserver`` and headless Debian chromium (Playwright). It checks, on the pages an
operator opens: the rejected drop's run names the failed check in one line, the model built
before it is neither failed nor unsynced, the rejected validation is a failed run and not a new
materialization, ``deployment`` is never materialised until dave deploys and then shows the
version and digest, and the evaluation's plots are inline images. Screenshots go to
test-artifacts/ (and, with ``SECURE_ML_UPDATE_SCREENSHOTS=1``, to docs/screenshots/ for the README).
Does not touch: the daemon (tests/test_automation.py runs the sensors), Kubernetes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest
import yaml

from tests._dagster_servers import CHROMIUM, Home, browser, make_home, webserver
from tests.conftest import SAMPLE_CSV

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (make system-deps)"),
    pytest.mark.timeout(900),
]

CLI = str(Path(sys.executable).parent / "secure-ml")
GROUPS = ("data", "training", "security", "release")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
KEYS: dict[str, Path] = {}


def cli(home: Home, *args: str, actor: str) -> subprocess.CompletedProcess[str]:
    env = {**home.environ, "SECURE_ML_IDENTITY": str(KEYS[actor])}
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A good model registered, then a poisoned drop rejected: the state the issue was filed on."""
    from _identities import trust_people

    from secure_ml.data.poisoning import flip_labels
    from secure_ml.settings import Settings

    base = tmp_path_factory.mktemp("operator")
    config = base / "config"
    shutil.copytree(Path(__file__).resolve().parents[1] / "secure_ml" / "config", config)
    training = yaml.safe_load((config / "training.yaml").read_text())
    training["training"].update({"epochs": 6, "checkpoint_every": 2})
    (config / "training.yaml").write_text(yaml.safe_dump(training))
    home = make_home(base, extra={"SECURE_ML_CONFIG": str(config)})
    KEYS.update(trust_people(Settings.from_env(home.environ), base / "identities", unauthenticated_may_train=False,
                             extra={"pat": ["data_steward", "ml_engineer"]}))
    good = cli(home, "pipeline", "run", "--json", actor="pat")
    assert good.returncode == 0, good.stderr[-3000:]
    poisoned, _ = flip_labels(pd.read_csv(SAMPLE_CSV), "risk", 0.15, seed=5)
    drop = base / "german_credit-flipped.csv"
    poisoned.to_csv(drop, index=False)
    bad = cli(home, "pipeline", "run", "--data", str(drop), "--json", actor="pat")
    # The CLI's one line names the failed check (the step's own "drop rejected: ..." is on the run page).
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr[-3000:]
    assert "poisoning_below_limit" in bad.stderr, bad.stderr[-3000:]
    return {"home": home, "good": json.loads(good.stdout), "bad": json.loads(bad.stdout)}


@pytest.fixture(scope="module")
def ui(state: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with webserver(state["home"], tmp_path_factory.mktemp("logs")) as url:
        yield url


@pytest.fixture(scope="module")
def page(ui: str) -> Iterator[Any]:
    with browser(viewport=(1400, 900)) as opened:
        yield opened


def shoot(page: Any, artifacts: Path, name: str, *, full_page: bool = False) -> None:
    path = artifacts / f"operator-{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    if os.environ.get("SECURE_ML_UPDATE_SCREENSHOTS") == "1":  # small PNGs for the README: 64 colours
        from PIL import Image

        DOCS.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            image.convert("RGB").quantize(colors=64).save(DOCS / f"{name}.png", optimize=True)


def body_after(page: Any, url: str, text: str) -> str:
    page.goto(url, wait_until="networkidle")
    page.get_by_text(text, exact=False).first.wait_for()
    return str(page.inner_text("body"))


def test_the_rejected_drop_touches_only_its_own_run(page: Any, ui: str, state: dict[str, Any],
                                                      artifacts_dir: Path) -> None:
    good, bad = state["good"], state["bad"]
    assert [r["job"] for r in good["runs"]] == ["ingest", "train", "release"]
    assert [(r["job"], r["success"]) for r in bad["runs"]] == [("ingest", False)]
    instance = dg.DagsterInstance.from_config(str(state["home"].dagster_home))
    try:
        latest = instance.fetch_materializations(dg.AssetKey("validated_dataset"), limit=1).records[0]
    finally:
        instance.dispose()
    assert latest.run_id == good["runs"][0]["run_id"]  # the accepted version is still the latest

    # Dagster opens a graph of several groups collapsed (no `expanded` URL parameter); the README's URL
    # opens every group of ours on the first open of a fresh browser.
    page.goto(f"{ui}/asset-groups", wait_until="networkidle")
    for group in GROUPS:
        page.get_by_text(group, exact=True).first.wait_for(timeout=60_000)
    page.wait_for_timeout(2500)
    assert page.locator('[class*="AssetNode_assetName"]').count() == 0
    page.goto(f"{ui}/asset-groups?expanded={','.join(f'global@global:{g}' for g in GROUPS)}", wait_until="networkidle")
    page.locator('[class*="AssetNode_assetName"]').first.wait_for(timeout=60_000)
    page.wait_for_timeout(6000)                      # the nodes' statuses load after the layout
    assert page.locator('[class*="AssetNode_assetName"]').count() >= 9
    shoot(page, artifacts_dir, "rejected-drop-graph")

    trained = body_after(page, f"{ui}/assets/trained_model", "Latest materialization")
    assert "Unsynced" not in trained and "Failed" not in trained, trained[:2000]
    shoot(page, artifacts_dir, "trained-model-after-rejection")


def test_the_run_page_gives_the_reason_in_one_line(page: Any, ui: str, state: dict[str, Any],
                                                   artifacts_dir: Path) -> None:
    run_id = state["bad"]["runs"][0]["run_id"]
    body = body_after(page, f"{ui}/runs/{run_id}", "drop rejected: poisoning_below_limit")
    assert "ingest" in body
    # The reason is the error's first line; Dagster always appends the recorded stack (README, "A rejected drop").
    reason = body.index("drop rejected: poisoning_below_limit")
    assert "Stack Trace" not in body or reason < body.index("Stack Trace")
    shoot(page, artifacts_dir, "rejected-run-reason")
    instance = dg.DagsterInstance.from_config(str(state["home"].dagster_home))
    try:
        run = instance.get_run_by_id(run_id)
    finally:
        instance.dispose()
    assert run is not None and run.job_name == "ingest"
    assert run.tags["secure_ml/trigger"] == "cli" and run.tags["secure_ml/identity"] == "pat"
    assert run.tags["secure_ml/drop"].startswith("german_credit-flipped-") and len(run.tags["secure_ml/drop_sha256"]) == 64
    assert run.tags["secure_ml/model"] == "german_credit"


def test_deployment_is_materialised_only_once_something_is_deployed(page: Any, ui: str, state: dict[str, Any],
                                                                    artifacts_dir: Path) -> None:
    before = body_after(page, f"{ui}/assets/deployment", "deployment")
    page.wait_for_timeout(1000)
    before = str(page.inner_text("body"))
    assert "Never materialized" in before, before[:2000]
    shoot(page, artifacts_dir, "deployment-before")

    home = state["home"]
    approved = cli(home, "approve", "v1", actor="carol")
    assert approved.returncode == 0, approved.stderr
    deployed = cli(home, "deploy", actor="dave")
    assert deployed.returncode == 0, deployed.stderr
    deadline = time.monotonic() + 30
    after = ""
    while time.monotonic() < deadline:
        after = body_after(page, f"{ui}/assets/deployment", "deployment")
        if "Never materialized" not in after and "v1" in after:
            break
        page.wait_for_timeout(1000)
    assert "Never materialized" not in after and "deployed_version" in after and "v1" in after, after[:2000]
    assert re.search(r"model_digest", after)
    shoot(page, artifacts_dir, "deployment-after")


def test_each_evaluation_plot_is_its_own_entry(page: Any, ui: str, artifacts_dir: Path) -> None:
    """One named row per plot (Dagster shows long markdown behind its own [Show Markdown] link)."""
    body = body_after(page, f"{ui}/assets/model_evaluation", "plot_roc")
    for name in ("plot_roc", "plot_confusion", "plot_calibration", "plot_groups", "verdicts"):
        assert name in body, name
    # ...and each plot's text chart is shown inline, without a click (markdown under 1,000 characters)
    for text in ("ROC AUC", "false positive rate", "bad risk", "good risk", "selection rate",
                 "expected calibration error", "█"):
        assert text in body, text
    row = page.locator("tr", has_text="ROC AUC").first
    row.evaluate("tr => tr.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(500)
    shoot(page, artifacts_dir, "evaluation-entries")
    for name in ("plot_confusion", "plot_groups"):
        row = page.locator("tr", has_text=name).first
        row.get_by_text("[Show Markdown]").first.click()
        image = page.locator('[role="dialog"] img[src^="data:image/png"]').first
        image.wait_for()
        assert image.evaluate("img => img.naturalWidth") > 200
        page.wait_for_timeout(500)
        shoot(page, artifacts_dir, f"evaluation-{name}")
        page.keyboard.press("Escape")
        page.locator('[role="dialog"]').first.wait_for(state="detached")
