"""The Dagster UI in a real browser: headless Debian chromium driven by Playwright.

Touches: one real ``dagster-webserver`` per module (a fresh 127.0.0.1 port, a test
SECURE_ML_HOME/DAGSTER_HOME, automation off, runs launched directly by the webserver) and the
UI as an engineer uses it: the global lineage graph with every group expanded (every asset the
code defines, at test time, and every lineage edge, read from the rendered SVG edges and node
boxes); the asset page (description, owners, kinds, group); the Materialize button (a real run
that must succeed, seen on its run page); a blocking check failure for a tampered ciphertext
(one flipped bit in the stored dataset, the checks executed from the UI, the failure and its
reason shown); the training sensor on the Automation page and the deployment's freshness policy.
Screenshots go to test-artifacts/. Does not touch: the daemon (the sensors run in the proof in
tests/test_automation.py), the evaluation plots (they need a trained model: a full chain run
here would double this module's time), Dagster+ features, or other browsers.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from secure_ml.definitions import build_definitions
from tests._dagster_servers import CHROMIUM, Home, browser, make_home, webserver
from tests.conftest import SAMPLE_CSV

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (make system-deps)"),
    pytest.mark.timeout(240),
]

# Rendered-node and edge geometry, read from the page (class names are CSS-module prefixes).
GRAPH_JS = """() => {
  const nodes = [];
  for (const el of document.querySelectorAll('[class*="AssetNode_assetName"]')) {
    const box = el.closest('[class*="AssetNode_assetNodeContainer"]') || el;
    const r = box.getBoundingClientRect();
    if (r.width > 0) nodes.push({name: el.textContent.trim(), x0: r.left, y0: r.top, x1: r.right, y1: r.bottom});
  }
  const edges = [];
  for (const p of document.querySelectorAll('svg path[marker-end]')) {
    const m = p.getScreenCTM(), n = p.getTotalLength();
    const a = p.getPointAtLength(0).matrixTransform(m), b = p.getPointAtLength(n).matrixTransform(m);
    edges.push([a.x, a.y, b.x, b.y]);
  }
  return {nodes, edges};
}"""


@pytest.fixture(scope="module")
def ui_home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    home = make_home(tmp_path_factory.mktemp("ui"))
    target = home.settings.landing_dir / "german_credit.csv"
    shutil.copyfile(SAMPLE_CSV, target)
    old = time.time() - 3600
    import os

    os.utime(target, (old, old))
    return home


@pytest.fixture(scope="module")
def ui(ui_home: Home, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with webserver(ui_home, tmp_path_factory.mktemp("logs")) as url:
        yield url


@pytest.fixture(scope="module")
def page(ui: str) -> Iterator[Any]:
    with browser() as opened:
        yield opened


@pytest.fixture(scope="module")
def graph(ui_home: Home) -> dg.AssetGraph:
    """The asset graph as the code defines it right now (it grows as stages land)."""
    return build_definitions(ui_home.settings).resolve_asset_graph()  # type: ignore[return-value]


def shoot(page: Any, artifacts: Path, name: str) -> Path:
    path = artifacts / f"browser-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def _distance(x: float, y: float, node: dict[str, float]) -> float:
    dx = max(node["x0"] - x, 0.0, x - node["x1"])
    dy = max(node["y0"] - y, 0.0, y - node["y1"])
    return float((dx * dx + dy * dy) ** 0.5)


def rendered_graph(page: Any) -> tuple[set[str], set[tuple[str, str]]]:
    """Asset names drawn, and edges drawn (each edge's ends matched to the node boxes they touch)."""
    data = page.evaluate(GRAPH_JS)
    nodes: dict[str, dict[str, float]] = {}
    for node in data["nodes"]:
        known = nodes.get(node["name"])
        if known is None or (node["x1"] - node["x0"]) > (known["x1"] - known["x0"]):
            nodes[node["name"]] = node
    edges = set()
    for x0, y0, x1, y1 in data["edges"]:
        source = min(nodes, key=lambda n: _distance(x0, y0, nodes[n]))
        target = min(nodes, key=lambda n: _distance(x1, y1, nodes[n]))
        edges.add((source, target))
    return set(nodes), edges


def test_the_lineage_graph_shows_every_asset_and_every_edge(page: Any, ui: str, graph: dg.AssetGraph,
                                                            artifacts_dir: Path) -> None:
    expected_assets = {key.to_user_string() for key in graph.get_all_asset_keys()}
    expected_edges = {(parent.to_user_string(), node.key.to_user_string())
                      for node in graph.asset_nodes for parent in node.parent_keys}
    page.goto(f"{ui}/asset-groups", wait_until="networkidle")
    groups = {node.group_name for node in graph.asset_nodes if node.group_name}
    for group in groups:
        page.get_by_text(group, exact=True).first.wait_for()
    page.keyboard.press("Alt+e")                      # "Expand all groups" (also in the graph's gear menu)
    page.locator('[class*="AssetNode_assetName"]').first.wait_for()
    deadline = time.monotonic() + 30
    while True:
        assets, edges = rendered_graph(page)
        if (assets >= expected_assets and edges >= expected_edges) or time.monotonic() > deadline:
            break
        page.wait_for_timeout(500)
    shoot(page, artifacts_dir, "lineage")
    assert expected_assets - assets == set(), f"assets missing from the UI graph: {expected_assets - assets}"
    assert expected_edges - edges == set(), f"lineage edges missing from the UI graph: {expected_edges - edges}"
    assert edges <= expected_edges, f"the UI draws edges the code does not define: {edges - expected_edges}"


def test_an_asset_page_explains_the_asset(page: Any, ui: str, graph: dg.AssetGraph, artifacts_dir: Path) -> None:
    node = graph.get(dg.AssetKey("dataset"))
    page.goto(f"{ui}/assets/dataset", wait_until="networkidle")
    first_sentence = re.split(r"(?<=[.,:])\s", (node.description or "").strip())[0]
    page.get_by_text(first_sentence, exact=False).first.wait_for()
    body = page.inner_text("body")
    assert node.group_name and node.group_name in body
    for owner in node.owners:
        assert owner.split(":")[-1] in body
    for kind in node.kinds:
        assert kind.lower() in body.lower()
    for child in graph.get(dg.AssetKey("dataset")).child_keys:
        assert child.to_user_string() in body                # lineage card: downstream assets
    shoot(page, artifacts_dir, "asset-dataset")


def _launch_from_materialize_button(page: Any, ui: str) -> None:
    page.goto(f"{ui}/assets/dataset", wait_until="networkidle")
    button = page.locator("button", has_text=re.compile(r"^\s*Materialize\s*$"))
    button.first.wait_for()
    button.first.click()


def test_materialize_from_the_ui_succeeds(page: Any, ui: str, artifacts_dir: Path) -> None:
    _launch_from_materialize_button(page, ui)
    shoot(page, artifacts_dir, "materialize-clicked")
    # The launch is done when Dagster's toast offers the new run; without a toast, find it in Runs.
    toast = page.get_by_role("button", name=re.compile(r"^View$")).or_(page.get_by_text("Launched run"))
    try:
        toast.first.wait_for(timeout=30_000)
    except Exception:  # noqa: BLE001 - the Runs page below is the fallback
        pass
    run_href = re.compile(r"/runs/[0-9a-f]{8}-[0-9a-f-]{27}")
    deadline = time.monotonic() + 60
    hrefs: list[str] = []
    while not hrefs and time.monotonic() < deadline:
        page.goto(f"{ui}/runs", wait_until="networkidle")
        hrefs = [h for h in page.locator('a[href*="/runs/"]').evaluate_all("els => els.map(e => e.getAttribute('href'))")
                 if h and run_href.search(h)]
        if not hrefs:
            page.wait_for_timeout(1000)
    assert hrefs, "no run was launched by the Materialize button"
    page.goto(f"{ui}{run_href.search(hrefs[0]).group(0)}", wait_until="networkidle")  # type: ignore[union-attr]
    deadline = time.monotonic() + 150
    status = ""
    while time.monotonic() < deadline:
        text = page.inner_text("body")
        status = next((s for s in ("Success", "Failure", "Canceled") if re.search(rf"\b{s}\b", text)), "")
        if status:
            break
        page.wait_for_timeout(1000)
    shoot(page, artifacts_dir, "materialize-run")
    assert status == "Success", f"the run launched from the UI ended as {status or 'still running'}"
    page.goto(f"{ui}/assets/dataset", wait_until="networkidle")
    page.get_by_text("Latest materialization").wait_for()
    assert "Never materialized" not in page.inner_text("body")
    shoot(page, artifacts_dir, "materialized-dataset")


def test_a_tampered_ciphertext_shows_as_a_failed_blocking_check_with_its_reason(
        page: Any, ui: str, ui_home: Home, artifacts_dir: Path) -> None:
    instance = dg.DagsterInstance.from_config(str(ui_home.dagster_home))
    try:
        records = instance.fetch_materializations(dg.AssetKey("dataset"), limit=1).records
    finally:
        instance.dispose()
    if not records:
        _launch_from_materialize_button(page, ui)
        pytest.fail("dataset was not materialised by the previous test; run the module, not this test alone")
    digest = records[0].asset_materialization.metadata["sha256"].value  # type: ignore[union-attr]
    stored = ui_home.settings.artifact_store().path_for(str(digest))
    blob = bytearray(stored.read_bytes())
    blob[len(blob) // 2] ^= 0x01                              # one flipped bit in the stored ciphertext
    stored.write_bytes(bytes(blob))

    page.goto(f"{ui}/assets/dataset?view=checks", wait_until="networkidle")
    page.get_by_role("button", name=re.compile("Execute all")).click()
    row = page.get_by_text("ciphertext_authentic", exact=True).first
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        page.reload(wait_until="networkidle")
        row = page.get_by_text("ciphertext_authentic", exact=True).first
        row.wait_for()
        if "Failed" in page.inner_text("body"):
            break
        page.wait_for_timeout(1500)
    row.click()
    page.get_by_text("This is a blocking asset check").wait_for()
    page.get_by_text("reason", exact=True).first.wait_for()
    body = page.inner_text("body")
    shoot(page, artifacts_dir, "tampered-check")
    assert "Failed" in body
    details = body.split("ciphertext_authentic")[-1]
    assert re.search(r"authenticat|tamper|corrupt|integrity", details, re.I), details[:1500]


def test_automation_and_freshness_are_visible_on_the_asset_pages(page: Any, ui: str, graph: dg.AssetGraph,
                                                                 artifacts_dir: Path) -> None:
    """Training follows by a sensor of the named `train` job (no asset carries a condition that would run as
    the anonymous __ASSET_JOB), listed on the Automation page; the deployed model shows its freshness policy."""
    assert not [node.key for node in graph.asset_nodes if node.automation_condition]
    page.goto(f"{ui}/automation", wait_until="networkidle")
    page.get_by_text("train_on_accepted_data").first.wait_for()
    shoot(page, artifacts_dir, "automation-sensors")
    if not graph.has(dg.AssetKey("deployment")):
        pytest.skip("the release stage (deployment) is not defined yet")
    page.goto(f"{ui}/assets/deployment", wait_until="networkidle")
    page.get_by_text("Fails if more than 7 days since last materialization").first.wait_for()
    page.get_by_text("Warns if more than 5 days since last materialization").first.wait_for()
    shoot(page, artifacts_dir, "freshness-deployment")


def test_switched_off_every_sensor_and_schedule_is_listed_and_stopped(page: Any, ui: str, ui_home: Home,
                                                                      artifacts_dir: Path) -> None:
    """SECURE_ML_AUTOMATION=off (this module's webserver): everything listed, every toggle off."""
    definitions = build_definitions(ui_home.settings)
    names = sorted([s.name for s in definitions.sensors or []] + [s.name for s in definitions.schedules or []])
    page.goto(f"{ui}/automation", wait_until="networkidle")
    for name in names:
        page.get_by_text(name, exact=True).first.wait_for()
    boxes = page.locator('input[type="checkbox"]')
    states = [boxes.nth(i).is_checked() for i in range(boxes.count())]
    shoot(page, artifacts_dir, "automation-off")
    assert len(states) == 1 + 2 * len(names)      # "select all", then a select box and a toggle per row
    assert not any(states), "a sensor or schedule is running although SECURE_ML_AUTOMATION=off"
