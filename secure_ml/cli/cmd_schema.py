"""secure-ml schema init DATA_FILE [--out FILE] [--label COL] [--protected A,B] [--name NAME] [--force]
                                   [--no-reference]

Drafts a schema file (secure_ml/data/schema.py's format) from a trusted sample for a person to review:
columns, types, nulls, observed ranges and categories, row-count bounds. The data file is parsed
with the same strict reader as drops in the landing area. Without --out the draft goes to stdout.

With --out the sample is also pinned as the schema's trusted reference: a byte-for-byte copy
``NAME.reference.csv`` (or .parquet) beside the schema, its SHA-256 in the schema, so the data
set's first drop is screened against it (and later references cannot drift far from it).
``--no-reference`` opts out, with a warning: the first drop then needs a data steward's sign-off.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from secure_ml.custody.integrity import atomic_write
from secure_ml.errors import BadInput
from secure_ml.custody.integrity import atomic_write, sha256_bytes


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
    init.add_argument("--no-reference", action="store_true",
                      help="do not pin the sample as the trusted reference (the first drop then needs a sign-off)")
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
    data = path.read_bytes()
    frame, _ = ingest.read_drop(path)
    protected = [p.strip() for p in args.protected.split(",") if p.strip()]
    name = args.name or path.stem
    draft = infer_schema(frame, name=name, label=args.label, protected=protected)
    reference = None
    if args.out is not None and not args.no_reference:
        reference = args.out.parent / f"{name}.reference{path.suffix.lower()}"
        # The digest pins the exact bytes the schema was drafted from: a swapped sample is refused on load.
        columns = draft.pop("columns")
        draft["reference"] = {"file": reference.name, "sha256": sha256_bytes(data)}
        draft["columns"] = columns
    text = dump_schema(draft, source=path.name)
    if args.out is None:
        sys.stdout.write(text)
        if not args.no_reference:
            print("secure-ml: warning: no --out, so no trusted reference was pinned; the data set's first drop "
                  "will need a data steward's sign-off", file=sys.stderr)
        return 0
    for target in (args.out, reference):
        if target is not None and target.exists() and not args.force:
            raise BadInput(f"{target} exists; pass --force to overwrite it")
    if reference is not None:
        with atomic_write(reference, mode=0o644) as out:
            out.write(data)
    with atomic_write(args.out, mode=0o644) as out:
        out.write(text.encode("utf-8"))
    pinned = f", trusted reference {reference.name} pinned" if reference is not None else ""
    print(f"wrote draft schema {args.out} ({len(draft['columns'])} columns{pinned}); review it before use",
          file=sys.stderr)
    if args.no_reference:
        print("secure-ml: warning: --no-reference: nothing to screen the first drop against; it will need a data "
              "steward's sign-off (secure-ml data sign-off)", file=sys.stderr)
    return 0
