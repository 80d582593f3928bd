"""secure-ml sandbox run [--show] [--] CMD ARGS...: run a command in exactly the sandbox training uses.

    secure-ml sandbox run -- python my_training.py < data.csv > weights.bin

The policy is ``isolation:`` from training.yaml and the code path is the one training goes
through (secure_ml.training.sandbox.start): new network, mount, PID and IPC namespaces (and a
user namespace when not root), SECURE_ML_HOME, keys, store, audit log and the user's home hidden,
resource limits, no capabilities, an allow-listed environment. stdin and stdout pass through and
CMD's exit status is returned. Where that sandbox cannot be set up the command is refused with
exit 1 and one line; it is never run bare. ``--show`` prints what was applied (JSON) on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from secure_ml.errors import BadInput
from secure_ml.settings import Settings
from secure_ml.training.sandbox import IsolationPolicy, run_command


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sandbox = sub.add_parser("sandbox", help="run a command in the training sandbox")
    sandbox_sub = sandbox.add_subparsers(dest="sandbox_command", required=True)
    run = sandbox_sub.add_parser("run", help="run CMD ARGS... sandboxed; its exit status is returned")
    run.add_argument("--show", action="store_true", help="print what the sandbox applied (JSON) on stderr")
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments (after --)")
    run.set_defaults(handler=cmd_sandbox_run)


def cmd_sandbox_run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise BadInput("sandbox run needs a command: secure-ml sandbox run -- CMD ARGS...")
    policy = IsolationPolicy.from_mapping(Settings.from_env().load_config("training").get("isolation"))

    def show(facts: dict[str, object]) -> None:
        if args.show:
            print(json.dumps(facts, sort_keys=True), file=sys.stderr, flush=True)

    sys.stdout.flush()
    return run_command(command, policy=policy, on_facts=show)
