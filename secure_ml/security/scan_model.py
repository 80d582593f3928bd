"""Our own model directory: safetensors, JSON and Markdown only, each exactly that.

    findings = scan_model_dir(model_dir)
    findings = scan_model_dir(model_dir, allowed_types=(".safetensors", ".json"), limits=SafetensorsLimits())

A file that holds a pickle (raw, inside a zip like a torch checkpoint, or in a NumPy array file)
is a blocking finding whatever it is called, and so is a file that is two formats at once (a
valid safetensors file that is also a zip or tar archive, or a JSON file that parses as a pickle).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from secure_ml.custody.integrity import list_tree
from secure_ml.errors import BadInput
from secure_ml.security.scan_findings import Finding
from secure_ml.security.scan_foreign import scan_foreign_file
from secure_ml.security.scan_safetensors import SafetensorsLimits, _no_duplicate_keys, check_safetensors
from secure_ml.security.scan_sniff import sniff

def scan_model_dir(model_dir: Path | str, *, allowed_types: Sequence[str] = (".safetensors", ".json", ".md"),
                   limits: SafetensorsLimits = SafetensorsLimits()) -> list[Finding]:
    """Scan one of our model directories: only safetensors, JSON and Markdown, each exactly that."""
    model_dir = Path(model_dir)
    try:
        names = list_tree(model_dir)
    except BadInput as exc:
        return [Finding("model", "critical", str(model_dir), "model-dir", exc.explain())]
    if not names:
        return [Finding("model", "high", str(model_dir), "model-dir", "the model directory is empty")]
    findings: list[Finding] = []
    config: Any = None
    if "config.json" in names:
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            config = json.loads((model_dir / "config.json").read_text())
    for name in names:
        path = model_dir / name
        info = sniff(path)
        suffix = Path(name).suffix.lower()
        if info["kinds"] and ("pickle" in info["kinds"] or info["pickles_inside"] or "npy" in info["kinds"]):
            # Our models never hold a pickle: whatever the name, loading one can run code.
            what = "a pickle" if "pickle" in info["kinds"] else (
                f"a zip archive holding pickles ({', '.join(info['pickles_inside'][:3])})" if info["pickles_inside"]
                else "a NumPy array file (object arrays are pickles)")
            findings.append(Finding("model", "critical", name, "pickle-in-model-dir",
                                    f"{name} is {what}; our models are safetensors and JSON only",
                                    {"kinds": info["kinds"]}))
            findings += scan_foreign_file(path, name)
        elif suffix not in allowed_types:
            findings.append(Finding("model", "high", name, "model-file-type",
                                    f"{name}: {suffix or 'no extension'} is not an allowed model file type "
                                    f"({', '.join(allowed_types)})"))
        container = [k for k in info["kinds"] if k in ("zip", "tar")]
        if container:
            # A polyglot: a loader that sniffs content may read a different model than we scanned.
            findings.append(Finding("model", "critical", name, "polyglot",
                                    f"{name} is also a {' and '.join(container)} archive: one file, two formats",
                                    {"kinds": info["kinds"], "zip_members": info["zip_members"][:20]}))
        if suffix == ".safetensors":
            findings += check_safetensors(path, name, config=config, limits=limits)
        elif suffix == ".json":
            try:
                json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
            except (UnicodeDecodeError, ValueError) as exc:
                findings.append(Finding("model", "high", name, "json", f"{name} is not valid JSON: {exc}"))
        elif suffix == ".md":
            data = path.read_bytes()
            if b"\0" in data:
                findings.append(Finding("model", "high", name, "text", f"{name} holds NUL bytes: not a text file"))
            else:
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:
                    findings.append(Finding("model", "high", name, "text", f"{name} is not UTF-8 text"))
    return findings


# -- in the sandbox ------------------------------------------------------------------------------
SANDBOX_ENTRY = "secure_ml.security.scan_model:sandboxed_scan"


def sandboxed_scan(header: dict[str, Any], blobs: list[bytes], send: Any, facts: dict[str, Any]) -> None:
    """Entry point the sandbox runs (secure_ml.training.sandbox, named by the scan step): the model files
    arrive as blobs (the sandbox's /tmp is its own), are written there and scanned; the findings go back
    as one ``R`` frame, with what this process saw of itself (uid, environment names)."""
    import tempfile

    names = [str(n) for n in header.get("files") or []]
    if len(names) != len(blobs) or any(n.startswith("/") or ".." in Path(n).parts for n in names):
        raise BadInput("the sandboxed model scan received a malformed job")
    limits = SafetensorsLimits(**{k: (frozenset(v) if k == "allowed_dtypes" else int(v))
                                  for k, v in (header.get("limits") or {}).items()})
    with tempfile.TemporaryDirectory(prefix="scan-") as tmp:
        root = Path(tmp) / "model"
        for name, blob in zip(names, blobs, strict=True):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(blob)
        findings = scan_model_dir(root, allowed_types=tuple(header.get("allowed_types") or (".safetensors", ".json", ".md")),
                                  limits=limits)
    send("R", json.dumps({"findings": [f.to_dict() for f in findings],
                          "seen": {"uid": facts.get("uid"), "env": facts.get("env"),
                                   "reach": _reach([str(p) for p in header.get("must_not_reach") or []])}},
                         sort_keys=True).encode())


def _reach(paths: list[str]) -> dict[str, str]:
    """From inside the sandbox: whether each secret the step holds (a key file, the keys directory, the
    parent's /proc/<pid>/environ) can be read or listed here. The caller refuses the verdict otherwise."""
    import os

    out: dict[str, str] = {}
    for path in paths:
        try:
            if os.path.isdir(path):
                out[path] = "listed" if os.listdir(path) else "empty"
            else:
                with open(path, "rb") as handle:
                    handle.read(1)
                out[path] = "read"
        except OSError as exc:
            out[path] = f"blocked: {type(exc).__name__}"
    return out
