"""Sandbox children started before their job (sandbox.prepare, sandbox.warm) and the cheap determinism flag.

Touches: real sandboxed processes started exactly as training starts them (the probe entry point,
which skips torch, so these are fast); a real Python with torch for the determinism flag.
Does not touch: training itself through a prepared child (test_training.py and the pipeline tests
train through it, since train_model always starts its child first).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from secure_ml.training import sandbox
from secure_ml.training.child import PROBE_ENTRY
from secure_ml.training.loop import SEGMENT_ENTRY
from secure_ml.training.sandbox import IsolationPolicy, run_isolated

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]  # slow: starts real sandboxes
REPO = Path(__file__).resolve().parents[1]
needs_namespaces = pytest.mark.skipif(sandbox.namespace_prefix() is None, reason="this host cannot create namespaces")


def _probe(prepared: sandbox.Prepared | None = None, policy: IsolationPolicy | None = None) -> tuple[int, dict]:
    """Run the probe; (the pid run_isolated ran it in, what the probe reported)."""
    pids: list[int] = []
    report: dict = {}

    def keep(kind: str, payload: bytes) -> None:
        if kind == "R":
            report.update(json.loads(payload))

    facts = run_isolated({"probe": {}}, [], policy=policy or IsolationPolicy(), entry=PROBE_ENTRY, on_frame=keep,
                         on_start=pids.append, prepared=prepared)
    assert facts["level_met"] and report["interfaces"] in ([], ["lo"])
    return pids[0], report


@needs_namespaces
def test_a_prepared_child_gets_the_job_and_is_fully_isolated() -> None:
    ready = sandbox.prepare(IsolationPolicy(), entry=PROBE_ENTRY)
    assert ready.started.process.poll() is None  # started, waiting for its job
    pid, report = _probe(ready)
    assert pid == ready.started.process.pid and report["uid"] is not None
    ready.close()  # taken by the run: nothing left to end, no error


@needs_namespaces
def test_an_unused_prepared_child_is_ended_and_one_for_another_job_is_not_used() -> None:
    unused = sandbox.prepare(IsolationPolicy(), entry=PROBE_ENTRY)
    unused.close()
    assert unused.started.process.poll() is not None
    other = sandbox.prepare(IsolationPolicy(), entry=PROBE_ENTRY, threads=2)  # other threads: another job
    pid, _ = _probe(other)
    assert pid != other.started.process.pid and other.started.process.poll() is not None
    ended = sandbox.prepare(IsolationPolicy(), entry=PROBE_ENTRY)
    ended.close()
    pid, _ = _probe(ended)  # an ended child is never handed a job: a fresh one runs it
    assert pid != ended.started.process.pid


@needs_namespaces
def test_a_warmed_child_is_claimed_once_by_the_matching_run_only() -> None:
    policy = IsolationPolicy()
    warmed = sandbox.warm(policy, entry=PROBE_ENTRY)
    assert _probe(policy=IsolationPolicy(socket_guard=False))[0] != warmed.started.process.pid  # other policy
    assert _probe(policy=policy)[0] == warmed.started.process.pid
    assert _probe(policy=policy)[0] != warmed.started.process.pid  # claimed once; the next run starts its own


@needs_namespaces
def test_a_warmed_child_nobody_claims_is_ended_after_its_idle_time() -> None:
    warmed = sandbox.warm(IsolationPolicy(), entry=SEGMENT_ENTRY, idle_s=0.2)
    warmed.started.process.wait(timeout=20)
    assert warmed.started.process.returncode is not None and warmed not in sandbox._WARM


def test_the_determinism_flag_is_set_and_the_optimiser_built_without_importing_the_compiler() -> None:
    """torch.use_deterministic_algorithms would import torch._inductor, and the optimiser's first call
    torch._dynamo (seconds each); the eager flag is what training needs, and it must be on."""
    code = ("import sys, numpy as np; from secure_ml.training.loop import _engine; "
            "from secure_ml.training.config import TrainingConfig; import torch; "
            "_engine(np.zeros((2, 2), np.float32), np.zeros(2, np.float32), TrainingConfig(hidden=(2,)), 'cpu'); "
            "print(torch.are_deterministic_algorithms_enabled(), 'torch._inductor' in sys.modules, "
            "'torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.stdout.split() == ["True", "False", "False"]
