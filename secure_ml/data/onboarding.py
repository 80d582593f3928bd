"""A new model from a sample file: the spec, the schema, the pinned reference and the source, drafted.

    drafted = draft_model(config_dir, "breast_cancer", Path("breast_cancer.csv"), label="target",
                          no_protected="tumour measurements: no attribute of a person")
    drafted.written        # [models/breast_cancer.yaml, schemas/breast_cancer.yaml, ...]
    drafted.review         # what a person must look at before the first run

What ``secure-ml model add`` runs. The sample is parsed with the same strict reader as a drop, the
schema is drafted by :func:`secure_ml.data.schema.infer_schema` (``schema init``), the sample is
copied beside it byte for byte and pinned by its SHA-256, the source (default pattern ``NAME*``) is
appended to sources.yaml, and the spec names all of it. Everything is checked before anything is
written (the spec as :class:`secure_ml.config.ModelSpec` validates it, the schema as the
pipeline parses it, the sources as the ingest gate reads them); a failure while writing removes what
this call wrote and restores sources.yaml, so a refused ``model add`` leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from secure_ml.config import Config
from secure_ml.config.model_spec import MODELS_DIR, NAME, spec_path
from secure_ml.custody.integrity import atomic_write, sha256_bytes
from secure_ml.data import ingest
from secure_ml.data.schema import dump_schema, infer_schema, parse_schema
from secure_ml.errors import BadInput, ConfigurationError, Error
from secure_ml.governance.sources import ApprovedSources


@dataclass
class Drafted:
    name: str
    written: list[Path] = field(default_factory=list)
    review: list[str] = field(default_factory=list)
    reference_sha256: str = ""


def draft_model(config_dir: Path, name: str, sample: Path, *, label: str, protected: list[str] | None = None,
                no_protected: str | None = None, pattern: str | None = None, owner: str = "team:data-stewards",
                classification: str = "internal") -> Drafted:
    """Draft model ``name`` from ``sample`` into ``config_dir``; BadInput/ConfigurationError on any problem."""
    config_dir = Path(config_dir)
    if not NAME.match(name or ""):
        raise BadInput(f"model name must be lower-case letters, digits and _ (at most 40), not {name!r}")
    if bool(protected) == bool(no_protected):
        raise BadInput("say which attributes are protected (--protected A,B) or why none are (--no-protected REASON)")
    config = Config(config_dir)
    if name in config.models() or name == config.default_model:
        raise BadInput(f"model {name!r} already exists ({spec_path(config_dir, name)})")
    if any(s.name == name for s in config.sources.sources):
        raise BadInput(f"sources.yaml already has a source named {name!r}")
    if not sample.is_file():
        raise BadInput(f"no such sample file: {sample}")
    suffix = sample.suffix.lower()
    if suffix not in ingest.SUFFIXES:
        raise BadInput(f"{sample.name} is neither .csv nor .parquet")
    data = sample.read_bytes()
    frame, _ = ingest.read_drop(sample)
    if label not in frame.columns:
        raise BadInput(f"--label {label!r} is not a column of {sample.name}")
    missing = [p for p in (protected or []) if p not in frame.columns]
    if missing:
        raise BadInput(f"--protected {missing[0]!r} is not a column of {sample.name}")

    schema_rel, reference_name = f"schemas/{name}.yaml", f"{name}.reference{suffix}"
    draft = infer_schema(frame, name=name, label=label, protected=list(protected or []))
    columns = draft.pop("columns")
    digest = sha256_bytes(data)
    # The digest pins the exact bytes the schema was drafted from: a swapped sample is refused on load.
    draft["reference"] = {"file": reference_name, "sha256": digest}
    draft["columns"] = columns
    schema_text = dump_schema(draft, source=sample.name)
    parse_schema(yaml.safe_load(schema_text), path=config_dir / schema_rel)

    spec = {
        "name": name, "description": f"Drafted by `secure-ml model add` from {sample.name}; review.",
        "owner": owner, "sources": [name], "schema": schema_rel, "label": label,
        "protected": list(protected) if protected else {"none": no_protected},
        "training": {}, "evaluation": {}, "promotion": {}, "deploy": {},
    }
    spec_text = ("# DRAFT written by `secure-ml model add`. Review: training, evaluation and promotion are empty,\n"
                 "# so the shared training.yaml and release.yaml values apply; promotion overrides must also be\n"
                 "# signed into the trust policy (`secure-ml trust models`).\n"
                 + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, default_flow_style=None, width=110))
    source = {"name": name, "description": f"Drops of model {name} (drafted by `secure-ml model add`).",
              "patterns": [pattern or f"{name}*"], "formats": ["csv", "parquet"], "owner": owner,
              "classification": classification}
    sources_path = config_dir / "sources.yaml"
    sources_before = sources_path.read_bytes()
    entry = yaml.safe_dump([source], sort_keys=False, default_flow_style=None, width=110)
    # Appended as text, so the file's comments stay; then read back to prove it is what was meant.
    sources_after = sources_before.rstrip(b"\n") + b"\n" + "".join(
        f"  {line}" for line in entry.splitlines(True)).encode()
    updated = yaml.safe_load(sources_after)
    before = yaml.safe_load(sources_before) or {}
    if not isinstance(updated, dict) or updated.get("sources") != [*(before.get("sources") or []), source]:
        raise ConfigurationError(f"{sources_path}: cannot append source {name!r} (is `sources:` the last key?); "
                                 "add it by hand")
    overlaps = _overlaps(updated, roles=config.roles.classifications, sample=sample, name=name)
    if overlaps:
        raise BadInput(overlaps)

    targets = [config_dir / "schemas" / reference_name, config_dir / schema_rel, spec_path(config_dir, name)]
    for target in targets:
        if target.exists():
            raise BadInput(f"{target} exists; remove it or choose another model name")
    written: list[Path] = []
    try:
        (config_dir / MODELS_DIR).mkdir(exist_ok=True)
        for target, content in zip(targets, (data, schema_text.encode(), spec_text.encode()), strict=True):
            with atomic_write(target, mode=0o644) as out:
                out.write(content)
            written.append(target)
        with atomic_write(sources_path, mode=0o644) as out:
            out.write(sources_after)
        written.append(sources_path)
        Config(config_dir).models()  # the whole configuration, as the pipeline will read it
    except BaseException as exc:
        for path in written:
            if path == sources_path:
                with atomic_write(sources_path, mode=0o644) as out:
                    out.write(sources_before)
            else:
                path.unlink(missing_ok=True)
        if isinstance(exc, Error):
            raise ConfigurationError(f"model {name!r} was not added: {exc.explain()}") from None
        raise
    review = [
        f"{config_dir / schema_rel}: ranges and categories are only what {sample.name} contained; widen what "
        "legitimately varies, tighten what must not",
        f"{spec_path(config_dir, name)}: owner, training settings, evaluation thresholds, promotion parameters, "
        "deploy target",
        f"{sources_path}: source {name!r} accepts drops named {source['patterns'][0]} "
        f"({classification}, owner {owner})",
        f"{config_dir / 'schemas' / reference_name}: the trusted reference (sha256:{digest[:16]}…) the first drop "
        "is screened against",
    ]
    if no_protected:
        review.append(f"no protected attributes ({no_protected}): the promotion policy will not demand bias metrics; "
                      "with a trust policy, sign that with `secure-ml trust models --owner-key FILE`")
    return Drafted(name=name, written=written, review=review, reference_sha256=digest)


def _overlaps(updated: Any, *, roles: list[str], sample: Path, name: str) -> str:
    """Why the new source cannot go in: unreadable, the sample would not be routed to it, or its
    pattern matches names another source's patterns accept (so a drop would match two models)."""
    try:
        sources = ApprovedSources(updated, classifications=roles, origin="sources.yaml")
    except ConfigurationError as exc:
        return exc.explain()
    ours = next(s for s in sources.sources if s.name == name)
    landed = f"{sample.stem}-{'0' * 12}{sample.suffix.lower()}"  # what `pipeline run` lands it as
    if not ours.matches(landed):
        return f"a drop of {sample.name} (landed as {landed}) would not match the pattern {' | '.join(ours.patterns)}"
    # Names each other source accepts, and the sample's: none may match two sources.
    examples = [landed] + [p.replace("*", "x").replace("?", "x") + ext for s in sources.sources if s is not ours
                           for p in s.patterns for ext in ("", ".csv")]
    for example in examples:
        found = [s.name for s in sources.sources if s.matches(example)]
        if len(found) > 1:
            return (f"a drop named {example} would match sources {', '.join(found)}; choose --pattern so that only "
                    f"source {name!r} matches this model's drops")
    return ""
