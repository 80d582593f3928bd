"""secure-ml model add NAME --data SAMPLE --label COL (--protected A,B | --no-protected REASON)
                       [--pattern GLOB] [--owner TEAM] [--classification LEVEL]

Drafts a new model into the configuration directory ($SECURE_ML_CONFIG, else the shipped one):
``models/NAME.yaml`` (the spec), ``schemas/NAME.yaml`` (drafted from the sample as ``schema init``
does), ``schemas/NAME.reference.EXT`` (the sample, pinned by its SHA-256) and a source in
sources.yaml (default pattern ``NAME*``). Prints what to review. Then ``secure-ml pipeline run
--data SAMPLE`` takes the sample to a signed candidate: the drop is routed to the model by its source.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from secure_ml.settings import Settings


def register(model_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    add = model_sub.add_parser("add", help="draft a new model (spec, schema, pinned reference, source) from a sample")
    add.add_argument("name", help="the model's name (lower-case letters, digits, _)")
    add.add_argument("--data", type=Path, required=True, help="a trusted .csv or .parquet sample")
    add.add_argument("--label", required=True, help="the column the model predicts")
    which = add.add_mutually_exclusive_group(required=True)
    which.add_argument("--protected", help="comma-separated protected attributes (bias is measured on them)")
    which.add_argument("--no-protected", metavar="REASON", help="why the data has no protected attributes")
    add.add_argument("--pattern", help="file-name pattern of the model's drops (default: NAME*)")
    add.add_argument("--owner", default="team:data-stewards", help="who answers for the data")
    add.add_argument("--classification", default="internal", help="the data's classification (roles.yaml)")
    add.set_defaults(handler=cmd_model_add)


def cmd_model_add(args: argparse.Namespace) -> int:
    from secure_ml.data.onboarding import draft_model

    settings = Settings.from_env()
    protected = [p.strip() for p in (args.protected or "").split(",") if p.strip()]
    drafted = draft_model(settings.config_dir, args.name, args.data, label=args.label, protected=protected,
                          no_protected=args.no_protected, pattern=args.pattern, owner=args.owner,
                          classification=args.classification)
    settings.audit_log().record(settings.actor(), "model.add", subject=args.name,
                                details={"sample_sha256": drafted.reference_sha256,
                                         "written": [str(p) for p in drafted.written]})
    print(f"drafted model {args.name}:")
    for path in drafted.written:
        print(f"  wrote {path}")
    print("review before the first run:")
    for line in drafted.review:
        print(f"  - {line}")
    print(f"then: secure-ml pipeline run --data {args.data}")
    return 0
