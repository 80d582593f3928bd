"""Scale figures (issue 17): the sample inside Dagster, and large drops end to end.

    python -m bench --only scale              # the scan cache; the sample end to end (seconds, per step)
    python -m bench.bench_scale --large       # make bench-large: 1M and 10M rows, drop -> registered candidate
    python -m bench.bench_scale --rows 20000  # one size, up to training (the smoke in make test)
    python -m bench.bench_scale --rows 20000 --select +registered_model   # one size, end to end

Each size runs ``secure-ml pipeline run --select SEL`` in a fresh process on a fresh SECURE_ML_HOME:
``--large`` selects ``+registered_model`` (ingest, encryption, DVC, validation, PII, poisoning screen,
split, isolated training with its ``reproducible`` replay, evaluation, scan, signature, attestation,
registration, and every blocking check on them: the ingest, train and release runs), ``--rows`` by
default ``+validated_dataset`` (up to training). Its wall time and peak RSS (the largest of the CLI
process and its children, the training sandbox among them, from wait4) are measured, and each step's
seconds come from the runs' event logs. Training runs the shipped training.yaml (20 epochs) unless
``--epochs N``. The large drops are generated outside the repository (``$BENCH_DIR``, default the
system temp dir) by bench/large_drop.py and deleted afterwards. The 10M figure's baseline is the 1M run
of the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import Figure
from bench.large_drop import write_drop

ISSUE = 17
REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "german_credit.csv"
UP_TO_TRAINING = "+validated_dataset"
END_TO_END = "+registered_model"
GIB = 2**30


def pipeline_run(drop: Path, home: Path, *, select: str | None = UP_TO_TRAINING,
                 config: Path | None = None, force: bool = False) -> dict[str, Any]:
    """``secure-ml pipeline run`` in a child process: wall seconds, its peak RSS (wait4's: the largest of
    the CLI process and the descendants it reaped, the training sandbox among them), its CPU seconds (all
    of them), its summary. ``config``: a SECURE_ML_CONFIG folder."""
    env = {**os.environ, "SECURE_ML_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"),
           "PYTHONPATH": str(REPO), "DAGSTER_DISABLE_TELEMETRY": "1", "DVC_NO_ANALYTICS": "1"}
    env.pop("SECURE_ML_IDENTITY", None)
    if config is not None:
        env["SECURE_ML_CONFIG"] = str(config)
    command = [sys.executable, "-m", "secure_ml", "pipeline", "run", "--data", str(drop), "--json"]
    if select:
        command += ["--select", select]
    if force:
        command.append("--force")
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if child.returncode != 0:
        raise RuntimeError(f"pipeline run on {drop.name} failed ({child.returncode}): "
                           f"{' | '.join(stderr.strip().splitlines()[-3:])}")
    summary = json.loads(stdout)
    return {"seconds": seconds, "peak_rss": usage.ru_maxrss * 1024, "summary": summary,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,  # the CLI process and every child it reaped
            "steps": {s["step"]: s["seconds"] for s in summary.get("steps", [])}}


def measure_rows(rows: int, workdir: Path, *, select: str = UP_TO_TRAINING, epochs: int = 0) -> dict[str, Any]:
    """Generate ``rows`` rows, run the pipeline's ``select`` on them (``epochs``: training's, 0 = shipped),
    delete the drop."""
    drop = write_drop(rows, workdir / f"german_credit_{rows}.csv")
    try:
        result = pipeline_run(drop, workdir / f"home-{rows}", select=select, config=_config(workdir, epochs))
    finally:
        drop.unlink(missing_ok=True)
    result["rows"] = rows
    return result


def _config(workdir: Path, epochs: int) -> Path | None:
    """A copy of the shipped configuration with training's epochs set (None: the shipped one as it is)."""
    if not epochs:
        return None
    import shutil

    import yaml

    folder = workdir / f"config-{epochs}-epochs"
    if not folder.exists():
        shutil.copytree(REPO / "secure_ml" / "config", folder)
        training = yaml.safe_load((folder / "training.yaml").read_text())
        training["training"]["epochs"] = epochs
        (folder / "training.yaml").write_text(yaml.safe_dump(training))
    return folder


def table(results: list[dict[str, Any]]) -> str:
    """A markdown table of per-step seconds (rows: steps; columns: sizes), with wall time and peak RSS."""
    steps: list[str] = []
    for result in results:
        steps += [s for s in result["steps"] if s not in steps]
    head = "| step | " + " | ".join(f"{r['rows']:,} rows" for r in results) + " |"
    lines = [head, "|" + " --- |" * (len(results) + 1)]
    for step in steps:
        lines.append(f"| {step} | " + " | ".join(f"{r['steps'].get(step, 0):.1f} s" for r in results) + " |")
    lines.append("| process wall time | " + " | ".join(f"{r['seconds']:.1f} s" for r in results) + " |")
    lines.append("| peak RSS | " + " | ".join(f"{r['peak_rss'] / 2**20:,.0f} MiB" for r in results) + " |")
    return "\n".join(lines)


def sample_figures() -> list[Figure]:
    """The whole pipeline on the sample: the runs' span in the event log against the goal (8 s); and the
    CPU the span's work takes (the process tree's CPU seconds less a CLI start that builds the same
    definitions and stops), divided by the cores: no schedule on this machine finishes in less."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        first = pipeline_run(SAMPLE, Path(tmp) / "home", select=None)
        second = pipeline_run(SAMPLE, Path(tmp) / "home", select=None, force=True)
        start = _cli_start_cpu(Path(tmp) / "home")
        print(table([{**first, "rows": 1000}, {**second, "rows": 1000}]), file=sys.stderr)
    cores = os.cpu_count() or 1
    span = min(first["steps"]["run"], second["steps"]["run"])
    work = min(first["cpu_seconds"], second["cpu_seconds"]) - start
    print(f"# sample: spans {first['steps']['run']:.1f} / {second['steps']['run']:.1f} s; CPU "
          f"{first['cpu_seconds']:.1f} / {second['cpu_seconds']:.1f} s, of which a CLI start {start:.1f} s; "
          f"{cores} cores", file=sys.stderr)
    return [
        Figure(ISSUE, "sample, whole pipeline inside Dagster (event-log span, best of 2)", span, "s", "goal (s)", 8.0,
               "<= 1.0x", span <= 8.0),
        Figure(ISSUE, "sample, `secure-ml pipeline run` process", second["seconds"], "s", "Dagster span (s)",
               second["steps"]["run"], "report", True),
        Figure(ISSUE, f"sample, the span's CPU work / {cores} cores (the shortest any schedule could take)",
               work / cores, "s", "goal (s)", 8.0, "report", True),
    ]


def _cli_start_cpu(home: Path) -> float:
    """CPU seconds of a `secure-ml pipeline run` that imports everything, builds the definitions and stops
    (an unknown asset selected): what the process spends before its first run."""
    env = {**os.environ, "SECURE_ML_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"),
           "PYTHONPATH": str(REPO), "DAGSTER_DISABLE_TELEMETRY": "1", "DVC_NO_ANALYTICS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "secure_ml", "pipeline", "run", "--select", "no_such_asset"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    _, _, usage = os.wait4(child.pid, 0)
    return usage.ru_utime + usage.ru_stime


def large_figures(sizes: tuple[int, int] = (1_000_000, 10_000_000), *, select: str = END_TO_END,
                  epochs: int = 0) -> list[Figure]:
    """The 1M run is the 10M run's baseline; peak RSS against 4 GiB."""
    results = []
    what = {END_TO_END: "drop -> registered candidate", UP_TO_TRAINING: "up to training"}.get(select, select)
    what += f", {epochs} epochs" if epochs else ""
    with tempfile.TemporaryDirectory(prefix="bench-large-", dir=os.environ.get("BENCH_DIR")) as tmp:
        for rows in sizes:  # each size's drop and home (GBs of ciphertext at 10M) go with the folder
            print(f"# scale: {rows:,} rows ...", file=sys.stderr, flush=True)
            results.append(measure_rows(rows, Path(tmp), select=select, epochs=epochs))
            print(f"# scale: {rows:,} rows: {results[-1]['seconds']:.1f}s, peak RSS "
                  f"{results[-1]['peak_rss'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    print(table(results), file=sys.stderr)
    small, big = results
    factor = big["rows"] / small["rows"]
    return [
        Figure(ISSUE, f"{big['rows']:,} rows {what}, wall", big["seconds"], "s",
               f"{small['rows']:,} rows (s)", small["seconds"], f"<= {1.1 * factor:g}x",
               big["seconds"] <= 1.1 * factor * small["seconds"]),
        Figure(ISSUE, f"{big['rows']:,} rows {what}, peak RSS", big["peak_rss"] / GIB, "GiB",
               "budget (GiB)", 4.0, "<= 1.0x", big["peak_rss"] <= 4 * GIB),
        Figure(ISSUE, f"{small['rows']:,} rows {what}, peak RSS", small["peak_rss"] / GIB, "GiB",
               "budget (GiB)", 2.0, "<= 1.0x", small["peak_rss"] <= 2 * GIB),
    ]


def scan_cache_figures() -> list[Figure]:
    """release_scan of the demo model, warm: cache hits (lock, advisories, code unchanged) against no cache."""
    import yaml

    from bench.bench_security import _best, _demo_model
    from secure_ml.security import scanning
    from secure_ml.settings import Settings, init_home

    config = yaml.safe_load((REPO / "secure_ml" / "config" / "security.yaml").read_text())
    with tempfile.TemporaryDirectory(prefix="bench-scan-cache-") as tmp:
        settings = Settings.from_env({"SECURE_ML_HOME": str(Path(tmp) / "home"), "SECURE_ML_ACTOR": "bench"})
        init_home(settings)
        model = _demo_model(Path(tmp) / "model")
        cache = scanning.ScanCache(settings.artifact_store(), settings.home / "cache" / "scans")
        scanning.release_scan(model, config, repo_root=REPO, cache=cache)  # imports, and fills the cache
        plain = _best(lambda: scanning.release_scan(model, config, repo_root=REPO), 2)
        cached = _best(lambda: scanning.release_scan(model, config, repo_root=REPO, cache=cache), 2)
    return [Figure(ISSUE, "release scan, warm, pip-audit + bandit from the cache", cached, "s",
                   "no cache (s)", plain, "<= 0.5x", cached <= 0.5 * plain)]


def run(quick: bool) -> list[Figure]:
    return scan_cache_figures() + sample_figures()


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.bench_scale")
    parser.add_argument("--large", action="store_true", help="1M and 10M rows, drop -> registered candidate")
    parser.add_argument("--rows", type=int, nargs="*", help="these sizes only (default: up to training)")
    parser.add_argument("--select", help=f"what to run (--large: {END_TO_END}, --rows: {UP_TO_TRAINING})")
    parser.add_argument("--epochs", type=int, default=0, help="training epochs (default: training.yaml's)")
    args = parser.parse_args()
    if args.rows:
        with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=os.environ.get("BENCH_DIR")) as tmp:
            results = [measure_rows(rows, Path(tmp), select=args.select or UP_TO_TRAINING, epochs=args.epochs)
                       for rows in args.rows]
        print(table(results))
        return 0
    figures = (large_figures(select=args.select or END_TO_END, epochs=args.epochs) if args.large
               else scan_cache_figures() + sample_figures())
    for f in figures:
        print(f"{f.issue:>5}  {f.name:<58} {f.value:>10.4g} {f.unit:<4} {f.baseline} {f.baseline_value:.4g}  "
              f"ratio {f.ratio:.3f}  {f.goal}  {'yes' if f.ok else 'NO'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
