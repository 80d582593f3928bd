"""secure-ml k8s render OUTDIR [--image-digest sha256:…] [--model-digest HEX | --model NAME HEX ...]
[--chart DIR] [--k8s-dir DIR]

Writes every Kubernetes object the project would create, one file per object, after checking all
of them (secure_ml/release/platform/checks.py): the Helm values for the pinned Dagster chart
(``helm-values.yaml``), the namespaces, service accounts and NetworkPolicies, the Secrets (no
values: each names where its keys come from) and the artifacts volume claim, the code location's
Deployment and Service, the run worker's Job and each asset's step Job (built by dagster-k8s), and
the model server (one server for every model given, each pinned by digest). The image digest comes from ``build/image.digest`` (``make image``) unless
``--image-digest`` is given; it is never written by hand. Nothing is written if any check fails.
``--chart DIR``: the pinned Dagster chart as ``helm pull dagster/dagster --version V --untar`` left
it; the Helm values are then also checked against the chart's own values.schema.json (offline).
Without it, a line says that schema was not applied and what to run.
Once a trust policy exists, ``--model-digest`` (or ``--model``) renders only models whose signed deployment to
``kubernetes`` verifies (and no revocation does): the admission data comes from the statements.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from secure_ml.custody.integrity import SHA256_HEX, atomic_write_bytes
from secure_ml.errors import BadInput, ConfigurationError, VerificationError

REPO = Path(__file__).resolve().parents[2]
PLACEHOLDER_MODEL = "0" * 64


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    k8s = sub.add_parser("k8s", help="the pipeline on Kubernetes")
    k8s_sub = k8s.add_subparsers(dest="k8s_command", required=True)
    render = k8s_sub.add_parser("render", help="write and check every Kubernetes object, one file each")
    render.add_argument("outdir", type=Path, help="a new or empty directory (or one render wrote before)")
    render.add_argument("--image-digest", help="sha256:<hex> of the image (default: build/image.digest)")
    render.add_argument("--model-digest", help="the model server's signed model digest (64 hex; default: a "
                        "placeholder the init container refuses; `secure-ml deploy --target kubernetes` pins the real one)")
    render.add_argument("--model", nargs=2, action="append", metavar=("NAME", "DIGEST"),
                        help="a model the one server serves, pinned to DIGEST (64 hex); repeat per deployed model "
                             "(instead of --model-digest)")
    render.add_argument("--chart", type=Path, help="the pinned Dagster chart, pulled and untarred (`helm pull "
                        "dagster/dagster --version V --untar`): check the values against its values.schema.json")
    render.add_argument("--k8s-dir", type=Path, default=REPO / "k8s", help="the k8s/ directory")
    render.set_defaults(handler=cmd_k8s_render)


def image_digest(given: str | None, repo: Path = REPO) -> str:
    if given is None:
        path = repo / "build" / "image.digest"
        if not path.is_file():
            raise ConfigurationError("no image digest: run `make image` (writes build/image.digest) "
                                     "or pass --image-digest sha256:<hex>")
        given = path.read_text().strip()
    if not given.startswith("sha256:") or not SHA256_HEX.match(given.removeprefix("sha256:")):
        raise BadInput(f"not an image digest (sha256:<64 hex>): {given[:80]!r}")
    return given


def render_all(k8s_dir: Path, digest: str, model_digest: str,
               models: list[tuple[str, str]] | None = None,
               admitted: list[str] | None = None,
               chart: Path | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(Helm values, every object), checked; VerificationError lists what is wrong. ``models``: (name,
    digest) of every model the server serves; default one, ``model_digest``, under the configured name.

    ``admitted``: the model digests the admission policy may admit (from verified deployment
    statements, :func:`admitted_models`); None admits the digests rendered (no trust policy yet).
    ``chart``: the pulled chart directory, whose values.schema.json then checks the Helm values too."""
    from secure_ml.cli import _k8s_jobs
    from secure_ml.governance.policy import POLICY_DIR
    from secure_ml.release import k8s_render
    from secure_ml.release.platform import checks, helm_values, objects

    cfg = objects.RenderConfig.load(k8s_dir)
    values = helm_values.pin_images(cfg.load_yaml("values.yaml"), cfg.image_repository, digest)
    pulled = None if chart is None else helm_values.load_chart(chart, name=str(cfg.chart["name"]),
                                                               version=str(cfg.chart["version"]))
    helm_values.check_values(values, kubernetes_version=cfg.kubernetes_version, chart=pulled)
    image = helm_values.image_ref(cfg.image_repository, digest)
    executor = (cfg.load_yaml("job_executor.yaml") or {}).get("execution", {}).get("config") or {}
    release = yaml.safe_load((POLICY_DIR.parents[1] / "config" / "release.yaml").read_text())
    name = str((release.get("serving") or {}).get("model_name") or k8s_render.DEFAULT_MODEL_NAME)
    pinned = [k8s_render.PinnedModel(n, "rendered", d) for n, d in (models or [(name, model_digest)])]
    rendered = [
        *objects.static_manifests(cfg),
        *objects.training_manifests(cfg),
        *objects.network_policies(cfg),
        *objects.secrets_and_config_maps(cfg, values),
        *objects.code_location_objects(cfg, values),
        *_k8s_jobs.run_and_step_jobs(values, executor, image=image, namespace=cfg.namespace, steps=cfg.steps),
        *k8s_render.render({**release["kubernetes"], "image": image}, models=pinned),
        *objects.model_server_inputs(cfg, release["kubernetes"]),
    ]
    problems = checks.check_objects(rendered, kubernetes_version=cfg.kubernetes_version,
                                    signed_model_digests=[f"sha256:{d}" for d in
                                                          (admitted if admitted is not None
                                                           else [m.digest for m in pinned])],
                                    api_server_endpoints=cfg.api_server_endpoints, pipeline_namespace=cfg.namespace)
    # The chart renders the webserver, daemon and code location from these sections: their
    # Kubernetes parts must be valid Kubernetes too.
    import kubernetes_validate

    sections = {"dagsterWebserver": values["dagsterWebserver"], "dagsterDaemon": values["dagsterDaemon"],
                "codeLocation": helm_values.code_location(values)}
    for name, section in sections.items():
        pod = helm_values.kubernetes_parts_as_pod(section, name=name.lower(), namespace=cfg.namespace)
        try:
            kubernetes_validate.validate(pod, cfg.kubernetes_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"Helm values {name}: {'.'.join(str(p) for p in exc.path)}: {str(exc.message)[:200]}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise VerificationError(f"{problems[0]}{more}")
    return values, rendered


def admitted_models() -> list[str] | None:
    """With a trust policy, the digests whose signed deployment to ``kubernetes`` verifies (not registry rows)."""
    from secure_ml.release.signed import SignedDecisions
    from secure_ml.settings import Settings

    signed = SignedDecisions.for_settings(Settings.from_env())
    return None if signed is None else signed.admitted_digests("kubernetes")


def file_name(index: int, obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    step = (meta.get("labels") or {}).get("dagster/op")
    name = f"step-{step}" if step else meta["name"]
    return f"{index:02d}-{str(obj['kind']).lower()}-{meta.get('namespace', 'cluster')}-{name}.yaml"


def write_outdir(outdir: Path, values: dict[str, Any], rendered: list[dict[str, Any]]) -> list[str]:
    """Every file at once: built beside OUTDIR, then swapped in; a directory with other files is refused."""
    if outdir.exists() and (not outdir.is_dir() or any(not p.name.endswith(".yaml") or not p.is_file()
                                                        for p in outdir.iterdir())):
        raise BadInput(f"{outdir} holds files render did not write; give a new or empty directory")
    outdir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.parent))
    try:
        names = ["helm-values.yaml"]
        atomic_write_bytes(staging / names[0], yaml.safe_dump(values, sort_keys=False).encode(), mode=0o644)
        for index, obj in enumerate(rendered, start=1):
            names.append(file_name(index, obj))
            atomic_write_bytes(staging / names[-1], yaml.safe_dump(obj, sort_keys=False).encode(), mode=0o644)
        os.chmod(staging, 0o755)  # nosec B103: a directory of manifests holding no secret value (Secrets are references)
        if outdir.exists():
            shutil.rmtree(outdir)
        staging.rename(outdir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return names


def cmd_k8s_render(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    digest = image_digest(args.image_digest)
    model_digest = args.model_digest or PLACEHOLDER_MODEL
    models = [(name, d.removeprefix("sha256:")) for name, d in args.model or []]
    for given in [model_digest, *(d for _, d in models)]:
        if not SHA256_HEX.match(given.removeprefix("sha256:")):
            raise BadInput(f"not a model digest (64 hex): {given[:80]!r}")
    if models and args.model_digest:
        raise BadInput("give --model NAME DIGEST (repeated) or --model-digest, not both")
    admitted = admitted_models() if (args.model_digest or models) else None
    values, rendered = render_all(args.k8s_dir, digest, model_digest.removeprefix("sha256:"), models or None,
                                  admitted=admitted, chart=args.chart)
    names = write_outdir(args.outdir, values, rendered)
    chart_checked = "chart values (strict model, the chart's values.schema.json)" if args.chart else \
        "chart values (strict model)"
    print(f"{len(names)} files in {args.outdir} (image {digest[:19]}…), every object checked: "
          f"schema (strict), admission policy, pod rules, {chart_checked}; {time.perf_counter() - started:.1f} s")
    if args.chart is None:
        print(no_chart_note(args.k8s_dir))
    return 0


def no_chart_note(k8s_dir: Path) -> str:
    """One line: the chart's own schema was not applied, and what to run to apply it."""
    from secure_ml.release.platform import objects

    chart = objects.RenderConfig.load(k8s_dir).chart
    return (f"note: the chart's own values.schema.json was not applied (no --chart): `helm repo add dagster "
            f"{chart['repository']} && helm pull dagster/{chart['name']} --version {chart['version']} --untar "
            f"--untardir DIR`, then render again with --chart DIR/{chart['name']}")
