"""The ``secure-ml`` command line.

    secure-ml init                      set up $SECURE_ML_HOME (keys, dirs, Dagster home)
    secure-ml keys init | rotate        key-encryption keys
    secure-ml encrypt IN OUT            streaming authenticated encryption ('-' = stdin/stdout)
    secure-ml decrypt IN OUT
    secure-ml audit verify | tail       the hash-chained audit log
    secure-ml identity | trust          identity keys; the signed trust policy
    secure-ml pipeline run              materialise the pipeline on the Dagster instance
    secure-ml sandbox run -- CMD ...    run CMD in the training sandbox (no network, keys or secrets)
    secure-ml verify-training VERSION   re-execute K segments of its training chain (--segments K)
    secure-ml k8s render OUTDIR         every Kubernetes object the project would create, checked

Exit codes: 0 ok; 1 verification failed or denied; 2 bad usage or bad input. Errors are one
line on stderr; ``--debug`` shows the traceback too.

Each command group is a module in this package with a ``register(subparsers)`` function, listed
in ``COMMAND_GROUPS`` (a new group is a new module, added there).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from secure_ml.cli import (cmd_audit, cmd_data, cmd_identity, cmd_k8s, cmd_keys, cmd_model, cmd_pipeline,
                           cmd_release, cmd_sandbox, cmd_schema, cmd_training, cmd_trust)
from secure_ml.errors import Error

COMMAND_GROUPS = (cmd_audit, cmd_data, cmd_identity, cmd_k8s, cmd_keys, cmd_model, cmd_pipeline, cmd_release,
                  cmd_sandbox, cmd_schema, cmd_training, cmd_trust)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: usage error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="secure-ml", description="A secure-by-construction ML pipeline.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except Error as exc:
        if args.debug:
            traceback.print_exc()
        print(f"secure-ml: {exc.explain()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("secure-ml: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except OSError as exc:
        if args.debug:
            traceback.print_exc()
        where = f": {exc.filename}" if exc.filename else ""
        print(f"secure-ml: error: {exc.strerror or type(exc).__name__}{where}", file=sys.stderr)
        return 2
    except Exception as exc:  # the contract: one line, never a traceback (unless --debug)
        if args.debug:
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        print(f"secure-ml: internal error: {type(exc).__name__}: {first} (rerun with --debug)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
