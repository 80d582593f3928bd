"""Model files from elsewhere, scanned without loading them, failing closed.

    findings = scan_foreign(path)                          # a file or a directory
    findings = scan_foreign_file(path, "evil.pt", limits=UnpackLimits(max_depth=4), external=False)

Content is sniffed, never the name. Zip, tar, gzip, bz2 and xz are opened recursively within
:class:`UnpackLimits` (a bomb is refused). Every pickle stream is walked to its STOP, at the start
of every file and member, after every STOP (stacked pickles), and at every PROTO opcode anywhere
in every file and member (not the bytes of a container, whose members are probed, nor a torch zip's
tensor storages, which torch reads as numbers), and its imports are judged against the allow-list in ``scan_pickle``. NumPy object
arrays, Keras (``.keras`` config, ``.h5`` model_config), ONNX external-data paths and GGUF chat
templates are checked. A file that no reader recognises blocks, with the reason. modelscan,
picklescan and fickling run too; what they flag is added, what they cannot read is noted, and the
verdict is ours: an error of theirs never passes a file, our own checks decide.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from secure_ml.custody.integrity import list_tree
from secure_ml.errors import BadInput, PolicyDenied
from secure_ml.security.scan_archive import Blob, Unpacker, UnpackLimits, container_kind, mapped, proto_offsets
from secure_ml.security.scan_findings import SEVERITIES, Finding, dedupe
from secure_ml.security.scan_formats import (
    check_gguf,
    check_hdf5,
    check_npy,
    check_onnx,
    identify,
    keras_config_problems,
)
from secure_ml.security.scan_pickle import (
    ALLOWED_IMPORTS,
    RENAMED_MODULES,
    PickleStream,
    TruncatedPickle,
    UnreadablePickle,
    disallowed,
    walk_pickle,
    walk_stacked,
)
from secure_ml.security.scan_safetensors import read_safetensors_header_from

_OPCODE_BYTES = frozenset(b"()*-.0123456789BCFGIJKLMNPQRSTUVXabcdeghijlmopqrstu}~\x80\x81\x82\x83\x84\x85\x86"
                          b"\x87\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f\x90\x91\x92\x93\x94\x95\x96\x97\x98")
_FICKLING_LIMIT = 64 << 20
_PROBE_WINDOW = 4096


def scan_foreign(path: Path | str, *, limits: UnpackLimits = UnpackLimits(), external: bool = True) -> list[Finding]:
    """Scan a foreign model file or every file of a directory; nothing is loaded or extracted."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"not found: {path}")
    files = [(path, path.name)] if path.is_file() else [(path / n, n) for n in list_tree(path)]
    findings: list[Finding] = []
    for file, where in files:
        findings += scan_foreign_file(file, where, limits=limits, external=external)
    return findings


def scan_foreign_file(path: Path, where: str | None = None, *, limits: UnpackLimits = UnpackLimits(),
                      external: bool = True) -> list[Finding]:
    """Scan one file; every way it fails to be read is a blocking finding."""
    blob = Blob.of_file(Path(path), where)
    scan = _Scan()
    try:
        with Unpacker(limits) as unpacker:
            scan.blob(blob, unpacker)
    except PolicyDenied as exc:
        scan.add("critical", blob.where, "archive-bomb", exc.explain())
    except BadInput as exc:
        scan.add("high", blob.where, "unreadable", f"cannot be read, so it cannot be judged: {exc.explain()}")
    except Exception as exc:  # noqa: BLE001 - fail closed: a reader that breaks on these bytes cannot judge them
        scan.add("high", blob.where, "scanner-error", f"a reader broke on it, so it cannot be judged: "
                                                      f"{type(exc).__name__}: {str(exc)[:160]}")
    if external:
        scan.findings += [_second_opinion(f) for f in external_findings(Path(path), blob.where, scan.top_kind,
                                                                         scan.streams)]
    return dedupe(scan.findings)


_FROM_IMPORT = re.compile(r"from ([\w.]+) import ([\w.]+)")


def _second_opinion(finding: Finding) -> Finding:
    """A scanner's finding about an import our allow-list holds is noted (low), not a block: the
    verdict is ours. A finding about anything else keeps its severity: two readers disagree."""
    named = str(finding.details.get("operator", ""))
    match = _FROM_IMPORT.search(finding.why)
    if match:
        named = f"{RENAMED_MODULES.get(match.group(1), match.group(1))}.{match.group(2)}"
    if named and named in ALLOWED_IMPORTS:
        return replace(finding, severity="low", why=f"{finding.why[:240]} (on our allow-list: noted, not blocking)")
    return finding


class _Scan:
    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.streams: list[tuple[str, bytes]] = []   # (where, bytes) of each pickle, for fickling
        self.top_kind: str | None = None

    def add(self, severity: str, where: str, rule: str, why: str, **details: Any) -> None:
        self.findings.append(Finding("model", severity, where, rule, why, details))

    def blob(self, blob: Blob, unpacker: Unpacker, *, raw_data: bool = False) -> None:
        """Judge one blob: a container's members, a format's checks, and every pickle in it."""
        # A torch storage is numbers: four bytes that look like a magic number there mean nothing.
        kind = None if raw_data else container_kind(blob)
        walked: list[PickleStream] = []
        start_error: str | None = None
        try:
            with blob.open() as region:
                walked = walk_stacked(region, 0, blob.length)
        except UnreadablePickle as exc:
            start_error = exc.explain()
        recognised = bool(walked) or raw_data
        if kind is not None:
            recognised = True
            if blob.depth == 0:
                self.top_kind = kind
            self._container(blob, kind, unpacker)
        else:
            fmt = identify(blob)
            if blob.depth == 0:
                self.top_kind = fmt or ("pickle" if walked else None)
            if fmt is not None:
                recognised = True
                walked += self._format(blob, fmt)
        if not raw_data and kind is None:
            # Probed: every file and member that is not a container (its members are probed) and not
            # a torch storage (numbers torch reads as numbers, never as a pickle).
            walked += self._probe(blob, {s.start for s in walked})
        for stream in walked:
            self._judge(blob, stream)
        if not recognised:
            self.add("high", blob.where, "unreadable",
                     "no reader recognises these bytes (not an archive, compressed stream, pickle, NumPy, "
                     f"HDF5, GGUF, safetensors, ONNX, JSON or text): {start_error or 'unknown format'}")

    def _container(self, blob: Blob, kind: str, unpacker: Unpacker) -> None:
        members = list(unpacker.children(blob, kind))
        names = {m.name: m for m in members}
        torch_prefixes = {name[:-len("data.pkl")] for name in names if name == "data.pkl" or name.endswith("/data.pkl")}
        if kind == "zip" and "config.json" in names and ({"metadata.json", "model.weights.h5"} & set(names)):
            self._keras_zip(names["config.json"])
            if blob.depth == 0:
                self.top_kind = "keras"
        if torch_prefixes and blob.depth == 0:
            self.top_kind = "torch"  # modelscan picks its scanner by name: a torch zip is a .pt
        for member in members:
            name = member.name
            # torch keeps each storage as raw bytes in <prefix>/data/<key>: data, never unpickled.
            raw = any(name.startswith(prefix + "data/") for prefix in torch_prefixes)
            self.blob(member, unpacker, raw_data=raw)

    def _keras_zip(self, config_blob: Blob) -> None:
        try:
            config = json.loads(config_blob.read())
        except (ValueError, RecursionError) as exc:
            raise BadInput(f"{config_blob.where}: Keras config is not JSON ({str(exc)[:120]})") from None
        for problem in keras_config_problems(config):
            self.add("critical", config_blob.where, "keras-code", problem)

    def _format(self, blob: Blob, fmt: str) -> list[PickleStream]:
        if fmt == "npy":
            _, pickle_at = check_npy(blob)
            if pickle_at is not None:
                self.add("info", blob.where, "npy-object-array",
                         "NumPy object array: its elements are a pickle (judged below)")
                with blob.open() as region:
                    return walk_stacked(region, pickle_at, blob.length)
        elif fmt == "hdf5":
            for problem in check_hdf5(blob):
                self.add("critical", blob.where, "keras-code", problem)
        elif fmt == "onnx":
            for problem in check_onnx(blob):
                self.add("critical", blob.where, "onnx-external-data", problem)
        elif fmt == "gguf":
            for problem in check_gguf(blob):
                self.add("critical", blob.where, "gguf-chat-template", problem)
        elif fmt == "safetensors":
            with blob.open() as region:
                _, problems = read_safetensors_header_from(region, blob.length)
            for problem in problems:
                self.add("high", blob.where, "safetensors-header", f"invalid safetensors file: {problem}")
        return []

    def _probe(self, blob: Blob, known: set[int]) -> list[PickleStream]:
        """Pickles hidden at any offset: every PROTO 2-5 opcode is a candidate start."""
        found: list[PickleStream] = []
        if blob.length < 3:
            return found
        with mapped(blob) as view:
            base, end = blob.offset, blob.offset + blob.length
            for offset in proto_offsets(blob):
                if offset in known or offset + 2 >= blob.length or view[base + offset + 2] not in _OPCODE_BYTES \
                        or any(s.start < offset < s.end for s in found):
                    continue
                # Most candidates are tensor bytes that fail within a few opcodes: walk a small copy
                # first, and the whole mapping only when the stream runs past it.
                start = base + offset
                try:
                    head = view[start:min(end, start + _PROBE_WINDOW)]
                    try:
                        stream = walk_pickle(head)
                        stream = replace(stream, start=start, end=start + stream.end)
                    except TruncatedPickle:
                        if start + len(head) >= end:
                            raise
                        stream = walk_pickle(view, start, end)
                except UnreadablePickle:
                    continue  # data that merely looks like a PROTO opcode
                found.append(replace(stream, start=offset, end=stream.end - base))
        return found

    def _judge(self, blob: Blob, stream: PickleStream) -> None:
        where = blob.where if stream.start == 0 else f"{blob.where}@{stream.start}"
        if stream.end - stream.start <= _FICKLING_LIMIT:
            with blob.open() as region:
                region.seek(stream.start)
                self.streams.append((where, region.read(stream.end - stream.start)))
        for problem in disallowed(stream):
            # Loading it would import (and may call) something no tensor needs: code execution.
            self.add("critical", where, "pickle-import",
                     f"pickle {problem}: not a tensor rebuilder, numpy reconstruction or plain container",
                     protocol=stream.protocol)


# -- the field's scanners: what they flag is added; the verdict stays ours ------------------------
_MODELSCAN_SUFFIX = {"pickle": ".pkl", "torch": ".pt", "keras": ".keras", "zip": ".zip", "npy": ".npy", "hdf5": ".h5"}
_FICKLING_SEVERITY = {
    "LIKELY_SAFE": None, "POSSIBLY_UNSAFE": "low", "SUSPICIOUS": "medium", "LIKELY_UNSAFE": "high",
    "LIKELY_OVERTLY_MALICIOUS": "critical", "OVERTLY_MALICIOUS": "critical",
}


def external_findings(path: Path, where: str, kind: str | None, streams: list[tuple[str, bytes]]) -> list[Finding]:
    findings = []
    if kind in _MODELSCAN_SUFFIX:
        findings += modelscan_findings(path, where, _MODELSCAN_SUFFIX[kind])
    findings += picklescan_findings(path, where)
    for stream_where, data in streams:
        findings += fickling_findings(data, stream_where)
    return findings


def modelscan_findings(path: Path, where: str, suffix: str) -> list[Finding]:
    """modelscan picks scanners by extension: give it a name that matches the content."""
    from modelscan.modelscan import ModelScan
    from modelscan.settings import DEFAULT_SETTINGS

    with tempfile.TemporaryDirectory(prefix="secure-ml-modelscan-") as tmp:
        alias = Path(tmp) / f"model{suffix}"
        os.symlink(path.absolute(), alias)
        logging.getLogger("modelscan").setLevel(logging.CRITICAL)
        report = ModelScan(settings=DEFAULT_SETTINGS).scan(alias)
    findings = []
    for issue in report.get("issues", []):
        severity = str(issue.get("severity", "HIGH")).lower()
        operator = f"{issue.get('module', '')}.{issue.get('operator', '')}".strip(".")
        findings.append(Finding("model", severity if severity in SEVERITIES else "high", where,
                                "modelscan:unsafe-operator",
                                f"loading it would call {operator} ({issue.get('description', 'unsafe operator')})",
                                {"operator": operator, "scanner": issue.get("scanner", "")}))
    for error in report.get("errors", []):
        findings.append(Finding("model", "info", where, "modelscan:error",
                                f"modelscan could not scan it: {str(error.get('description', error))[:200]}"))
    return findings


def picklescan_findings(path: Path, where: str) -> list[Finding]:
    from picklescan.scanner import SafetyLevel, scan_file_path

    logging.getLogger("picklescan").setLevel(logging.CRITICAL)
    try:
        result = scan_file_path(str(path))
    except Exception as exc:  # noqa: BLE001 - a third-party scanner's failure is noted, never a pass
        return [Finding("model", "info", where, "picklescan:error", f"picklescan failed: {str(exc)[:200]}")]
    findings = []
    for found in result.globals:
        if found.safety == SafetyLevel.Dangerous:
            findings.append(Finding("model", "critical", where, "picklescan:dangerous-import",
                                    f"picklescan: dangerous import {found.module}.{found.name}",
                                    {"operator": f"{found.module}.{found.name}"}))
    if result.scan_err:
        findings.append(Finding("model", "info", where, "picklescan:error", "picklescan could not read all of it"))
    return findings


def fickling_findings(data: bytes, where: str) -> list[Finding]:
    """fickling's ML allow-list plus its structural analyses over one pickle stream (parsed, never run)."""
    from fickling import analysis as fa
    from fickling.fickle import StackedPickle
    from fickling.ml import MLAllowlist

    analyzer = fa.Analyzer([
        MLAllowlist(), fa.UnsafeImports(), fa.BadCalls(), fa.InvalidOpcode(), fa.ExpansionAttackAnalysis(),
        fa.DuplicateProtoAnalysis(), fa.MisplacedProtoAnalysis(), fa.ResourceExhaustionAnalysis(),
        fa.ScannerDeactivation(),
    ])
    findings: list[Finding] = []
    try:
        stacked = StackedPickle.load(io.BytesIO(data), fail_on_decode_error=True)
        for pickled in stacked:
            for result in fa.check_safety(pickled, analyzer=analyzer).results:
                severity = _FICKLING_SEVERITY.get(result.severity.name)
                if severity:
                    findings.append(Finding("model", severity, where, f"fickling:{result.analysis_name}",
                                            str(result)[:300], {"trigger": str(result.trigger or "")[:200]}))
    except Exception as exc:  # noqa: BLE001 - our walker read it; fickling's trouble is noted only
        findings.append(Finding("model", "info", where, "fickling:error", f"fickling could not analyse it: "
                                                                          f"{str(exc)[:160]}"))
    return findings

