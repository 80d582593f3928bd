"""secure-ml schema init DATA_FILE [--out FILE] [--label COL] [--protected A,B] [--name NAME] [--force]

Drafts a schema file (secure_ml/data/schema.py's format) from a trusted sample for a person to review:
columns, types, nulls, observed ranges and categories, row-count bounds. The data file is parsed
with the same strict reader as drops in the landing area. Without --out the draft goes to stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from secure_ml.custody.integrity import atomic_write
from secure_ml.errors import BadInput


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    schema = sub.add_parser("schema", help="per-dataset schema files")
    schema_sub = schema.add_subparsers(dest="schema_command", required=True)
    init = schema_sub.add_parser("init", help="draft a schema from a trusted sample, for review")
    init.add_argument("data_file", type=Path, help="a .csv or .parquet sample")
    init.add_argument("--out", type=Path, help="write the draft here (default: stdout)")
    init.add_argument("--label", help="the label column")
    init.add_argument("--protected", default="", help="comma-separated protected attributes")
    init.add_argument("--name", help="dataset name (default: the file's stem)")
    init.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    init.set_defaults(handler=cmd_schema_init)


def cmd_schema_init(args: argparse.Namespace) -> int:
    # pandas is imported only by this command, so every other command starts fast.
    from secure_ml.data import ingest
    from secure_ml.data.schema import dump_schema, infer_schema

    path: Path = args.data_file
    if not path.is_file():
        raise BadInput(f"no such data file: {path}")
    if path.suffix.lower() not in ingest.SUFFIXES:
        raise BadInput(f"{path.name} is neither .csv nor .parquet")
    frame, _ = ingest.read_drop(path)
    protected = [p.strip() for p in args.protected.split(",") if p.strip()]
    draft = infer_schema(frame, name=args.name or path.stem, label=args.label, protected=protected)
    text = dump_schema(draft, source=path.name)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    if args.out.exists() and not args.force:
        raise BadInput(f"{args.out} exists; pass --force to overwrite it")
    with atomic_write(args.out, mode=0o644) as out:
        out.write(text.encode("utf-8"))
    print(f"wrote draft schema {args.out} ({len(draft['columns'])} columns); review it before use", file=sys.stderr)
    return 0
