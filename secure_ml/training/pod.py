"""The training pod's entry point: decrypt this run's job, run it, return what it computed.

    python -I -m secure_ml.training.pod --key-file /var/run/secrets/secure-ml-run/key --run-dir /exchange

It is what the Kubernetes Job the trained_model step (or the ``reproducible`` check) creates runs
(resources/training_pod.py). The job names one of two entry points of secure_ml.training.loop
(secure_ml.training.handover.RETURNS): ``child_train``, the same training entry point as the local
sandbox, so the same split gives the same weights, bit for bit; or ``child_segments``, the replay of
chain segments from their recorded start states, returning each end state's digest. Both run under
the same Python guard against the network and starting programs as in the local sandbox. It reads
only ``--run-dir/split.smle`` with the per-run key (secure_ml.training.handover) and writes only
``--run-dir/out/``. It also reports what it sees of
itself: uid, environment names, a service-account token, a writable root; ``level_met`` is true only
when it runs as a non-root user with no secret in its environment, no token and a read-only root.
Exit status 0, or 1 with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from secure_ml.errors import Error

TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def self_facts(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What this process can observe about its own confinement (reported, and judged as ``level_met``)."""
    from secure_ml.training.child import facts
    from secure_ml.training.policy import SECRET_ENV

    environ = os.environ if environ is None else environ
    seen = facts()
    secret_env = sorted(name for name in environ if SECRET_ENV.search(name))
    token = os.path.exists(TOKEN_DIR)
    try:
        read_only_root = bool(os.statvfs("/").f_flag & os.ST_RDONLY)
    except OSError:
        read_only_root = False
    met = seen["uid"] != 0 and not secret_env and not token and read_only_root
    return {**seen, "level": "pod" if met else "incomplete", "configured": "kubernetes", "level_met": met,
            "secret_environment": secret_env, "service_account_token": token, "read_only_root": read_only_root}


def train_handed_over(run_dir: Path, key: str) -> dict[str, Any]:
    """Decrypt the job in ``run_dir``, run it exactly as the local sandbox child does, write the results."""
    from secure_ml.training import handover, loop

    entry, header, blobs = handover.read_job(run_dir, key)
    job = {handover.TRAIN_ENTRY: loop.child_train, handover.REPLAY_ENTRY: loop.child_segments}[entry]
    frames: dict[str, bytes] = {}

    def send(kind: str, payload: bytes) -> None:
        if kind == "P":
            event = json.loads(payload)
            if "epoch" in event:
                print(f"epoch {event['epoch']}/{event['epochs']}: loss {event['loss']:.5f}", file=sys.stderr)
        elif kind in handover.RETURNED:
            frames[kind] = payload   # checkpoints (C) are not returned: a pod that dies starts again

    facts = self_facts()
    job(header, blobs, send, facts)
    handover.write_returned(run_dir, frames, facts, key, entry=entry)
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m secure_ml.training.pod", description=__doc__.splitlines()[0])
    parser.add_argument("--key-file", required=True, help="the per-run key (a file of the per-run Secret)")
    parser.add_argument("--run-dir", required=True, help="the per-run directory: split.smle in, out/ back")
    parser.add_argument("--no-guard", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from secure_ml.training import child, handover

    try:
        key = handover.read_key_file(args.key_file)
        if not args.no_guard:
            from secure_ml.training.loop import preload

            preload()  # every import first: the guard then refuses the network and starting programs
            sys.addaudithook(child._guard)
        train_handed_over(Path(args.run_dir), key)
    except Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
