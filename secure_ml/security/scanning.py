"""Security scans for a model release: model files, dependencies, pipeline code.

    findings = scan_model_dir(model_dir)                       # our own model: safetensors + JSON only
    findings = scan_foreign(path)                              # a checkpoint from elsewhere: modelscan + fickling
    findings = audit_dependencies(lock, OfflineOsvDatabase(db))  # pip-audit over the lock file
    findings = scan_code([repo / "secure_ml", repo / "assets"])  # bandit
    report = ScanPolicy.from_config(cfg).report(findings)      # counts by severity, blocking, summary

A :class:`Finding` says what was found (``rule``), where (a file, ``package==version`` or
``file:line``), why it matters, and how severe it is. Severities are ``critical``, ``high``,
``medium``, ``low``, ``info``; everything at or over the blocking severity blocks the release.

Our own models are ``model.safetensors`` plus JSON and the Markdown model card. A file that holds
a pickle (raw, inside a zip like a torch checkpoint, or in a NumPy object array) is a blocking
finding in a model directory whatever it is called, and so is a file that is two formats at once
(a valid safetensors file that is also a zip or tar archive, or a JSON file that parses as a
pickle). The safetensors header is validated without loading a tensor: size bounds, dtypes,
shapes times dtype sizes against the offsets, offsets contiguous and non-overlapping, no bytes
after the last tensor, and the shapes against ``config.json`` where it names them.

Files from elsewhere are never loaded: modelscan and fickling (with its ML allow-list) read the
pickle opcodes, and a finding at or over the blocking severity blocks.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import struct
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from secure_ml.custody.integrity import list_tree
from secure_ml.errors import BadInput, ConfigurationError

SEVERITIES = ("critical", "high", "medium", "low", "info")
_RANK = {name: len(SEVERITIES) - i for i, name in enumerate(SEVERITIES)}

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
PICKLE_SUFFIXES = {".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib", ".npy", ".npz", ".dill", ".mar"}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finding:
    """One thing a scan found: what (rule), where, why, how severe."""

    category: str      # model | dependency | code | sbom
    severity: str      # critical | high | medium | low | info
    where: str
    rule: str
    why: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rank(severity: str) -> int:
    try:
        return _RANK[severity.lower()]
    except KeyError:
        raise ConfigurationError(f"unknown severity {severity!r}: use one of {', '.join(SEVERITIES)}") from None


# -- content sniffing ---------------------------------------------------------------------------
def _head(path: Path, size: int = 64) -> bytes:
    with path.open("rb") as handle:
        return handle.read(size)


def looks_like_pickle(data: bytes) -> bool:
    """A pickle stream: protocol 2+ starts with PROTO; protocol 0/1 is recognised by parsing it.

    Parsing (never loading) is done with fickling, which reads opcodes without executing any.
    """
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return True
    return data[:1] in _OPCODE_STARTS and _parses_as_pickle(data)


# First opcodes of protocol 0/1 pickles (MARK, GLOBAL, EMPTY_LIST/DICT, INT, STRING, ...).
_OPCODE_STARTS = {b"(", b"c", b"]", b"}", b"I", b"S", b"V", b"N", b"K", b"X", b"\x8c", b"G", b"F", b"L", b"U", b"T"}


def _parses_as_pickle(data: bytes) -> bool:
    from fickling.fickle import Pickled

    try:
        pickled = Pickled.load(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - not a pickle, whatever the parser's complaint
        return False
    # A real pickle has at least one opcode before STOP and nothing invalid.
    return len(pickled) > 1 and not getattr(pickled, "has_invalid_opcode", False)


def _zip_members(path: Path) -> list[str] | None:
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, RuntimeError):
        return ["<unreadable zip>"]


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, tarfile.TarError):
        return False


_PARSE_LIMIT = 64 * 1024 * 1024


def sniff(path: Path) -> dict[str, Any]:
    """What a file's bytes say it is, independent of its name."""
    head = _head(path, 4096)
    members = _zip_members(path)
    kinds: list[str] = []
    # Protocol 0/1 pickles have no magic: they are recognised by parsing, which needs the whole
    # stream (up to a bound; a parse stops at the first byte that is not an opcode).
    if looks_like_pickle(head) or (head[:1] in _OPCODE_STARTS and len(head) == 4096
                                   and looks_like_pickle(_head(path, _PARSE_LIMIT))):
        kinds.append("pickle")
    if members is not None:
        kinds.append("zip")
    if _is_tar(path):
        kinds.append("tar")
    if head.startswith(b"\x93NUMPY"):
        kinds.append("npy")
    pickles_inside = [m for m in (members or []) if m.endswith((".pkl", ".pickle")) or m.endswith("/data.pkl")]
    return {"kinds": kinds, "zip_members": members or [], "pickles_inside": pickles_inside}


# -- safetensors --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SafetensorsLimits:
    max_header_bytes: int = 16 * 1024 * 1024
    max_tensors: int = 100_000
    allowed_dtypes: frozenset[str] = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"})


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            # Two readers may pick different duplicates: one file, two models.
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def read_safetensors_header(path: Path, limits: SafetensorsLimits = SafetensorsLimits()) -> tuple[dict[str, Any], list[str]]:
    """(tensor table, problems): the header is read and checked without reading tensor data."""
    problems: list[str] = []
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) < 8:
            return {}, [f"file is {size} bytes: too short for a safetensors header"]
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > limits.max_header_bytes:
            return {}, [f"header claims {header_len} bytes (limit {limits.max_header_bytes})"]
        if 8 + header_len > size:
            return {}, [f"header claims {header_len} bytes but the file has only {size - 8} after the length"]
        raw = handle.read(header_len)
    try:
        text = raw.decode("utf-8")
        if not text.lstrip().startswith("{"):
            raise ValueError("header is not a JSON object")
        header = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        return {}, [f"header is not valid JSON: {exc}"]
    if not isinstance(header, dict):
        return {}, ["header is not a JSON object"]
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        problems.append("__metadata__ must map strings to strings")
    if len(header) > limits.max_tensors:
        return {}, [f"header lists {len(header)} tensors (limit {limits.max_tensors})"]
    data_len = size - 8 - header_len
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"}:
            problems.append(f"tensor {name!r}: entry must hold only dtype, shape, data_offsets")
            continue
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in limits.allowed_dtypes:
            problems.append(f"tensor {name!r}: dtype {dtype!r} is not allowed")
            continue
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            problems.append(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
            continue
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            problems.append(f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end] with begin <= end")
            continue
        numel = 1
        for dim in shape:
            numel *= dim
        expected = numel * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != expected:
            problems.append(f"tensor {name!r}: {dtype}{shape} needs {expected} bytes but its offsets span "
                            f"{offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin < position:
            problems.append(f"tensor {name!r} overlaps the tensor before it (offset {begin} < {position})")
        elif begin > position:
            problems.append(f"unaccounted bytes {position}..{begin} before tensor {name!r}")
        position = max(position, end)
    if position > data_len:
        problems.append(f"tensors end at byte {position} of the data but the file holds only {data_len}")
    elif position < data_len:
        # Hidden payloads (an appended zip, a second model) live in bytes no tensor claims.
        problems.append(f"{data_len - position} trailing bytes after the last tensor")
    return header, problems


def _expected_shapes(config: Any) -> dict[str, list[int]]:
    """Tensor shapes a model config implies: an explicit ``tensors`` table ({name: shape} or
    {name: {"shape": ...}}), or the training stage's ``tabular-mlp`` (inputs, hidden, outputs):
    ``layers.{3i}`` Linear blocks (Linear, ReLU, Dropout) and a final Linear."""
    if not isinstance(config, dict):
        return {}
    if config.get("architecture") == "tabular-mlp" and "tensors" not in config:
        try:
            width, hidden, outputs = int(config["inputs"]), [int(h) for h in config["hidden"]], int(config["outputs"])
        except (KeyError, TypeError, ValueError):
            return {}
        shapes: dict[str, list[int]] = {}
        for index, size in enumerate([*hidden, outputs]):
            shapes[f"layers.{3 * index}.weight"] = [size, width]
            shapes[f"layers.{3 * index}.bias"] = [size]
            width = size
        return shapes
    table = config.get("tensors") or config.get("tensor_shapes") or {}
    shapes = {}
    if isinstance(table, dict):
        for name, value in table.items():
            shape = value.get("shape") if isinstance(value, dict) else value
            if isinstance(shape, list):
                shapes[str(name)] = shape
    return shapes


def check_safetensors(path: Path, where: str, *, config: Any = None,
                      limits: SafetensorsLimits = SafetensorsLimits()) -> list[Finding]:
    header, problems = read_safetensors_header(path, limits)
    findings = [Finding("model", "high", where, "safetensors-header", f"invalid safetensors file: {p}")
                for p in problems]
    expected = _expected_shapes(config)
    if header and expected:
        actual = {name: info.get("shape") for name, info in header.items() if isinstance(info, dict)}
        for name in sorted(set(expected) | set(actual)):
            if name not in actual:
                findings.append(Finding("model", "high", where, "safetensors-shape",
                                        f"config.json names tensor {name!r} but the weights do not hold it"))
            elif name not in expected:
                findings.append(Finding("model", "high", where, "safetensors-shape",
                                        f"tensor {name!r} is not in config.json"))
            elif list(actual[name]) != list(expected[name]):
                findings.append(Finding("model", "high", where, "safetensors-shape",
                                        f"tensor {name!r} has shape {actual[name]} but config.json says {expected[name]}"))
    return findings


# -- foreign model files: modelscan + fickling --------------------------------------------------
_FICKLING_SEVERITY = {
    "LIKELY_SAFE": None, "POSSIBLY_UNSAFE": "low", "SUSPICIOUS": "medium", "LIKELY_UNSAFE": "high",
    "LIKELY_OVERTLY_MALICIOUS": "critical", "OVERTLY_MALICIOUS": "critical",
}


def _fickling_findings(data: bytes, where: str) -> list[Finding]:
    """fickling's ML allow-list plus its structural analyses over one pickle stream (parsed, never run).

    fickling's generic "non-standard import" and "eval" analyses flag every torch checkpoint; the
    ML allow-list is the precise test (only known tensor-rebuilding callables may be imported).
    """
    from fickling import analysis as fa
    from fickling.fickle import StackedPickle
    from fickling.ml import MLAllowlist

    analyzer = fa.Analyzer([
        MLAllowlist(), fa.UnsafeImports(), fa.BadCalls(), fa.InvalidOpcode(), fa.ExpansionAttackAnalysis(),
        fa.DuplicateProtoAnalysis(), fa.MisplacedProtoAnalysis(), fa.ResourceExhaustionAnalysis(),
        fa.ScannerDeactivation(),
    ])
    check_safety = fa.check_safety
    findings: list[Finding] = []
    try:
        stacked = StackedPickle.load(io.BytesIO(data), fail_on_decode_error=True)
    except Exception as exc:  # noqa: BLE001 - an unparseable pickle is itself suspicious
        return [Finding("model", "high", where, "fickling-parse", f"pickle cannot be parsed safely: {exc}")]
    for pickled in stacked:
        results = check_safety(pickled, analyzer=analyzer)
        for result in results.results:
            severity = _FICKLING_SEVERITY.get(result.severity.name)
            if severity:
                findings.append(Finding("model", severity, where, f"fickling:{result.analysis_name}",
                                        str(result), {"trigger": result.trigger or ""}))
    return findings


def _modelscan_findings(path: Path, where: str, suffix: str) -> list[Finding]:
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
        findings.append(Finding("model", severity if severity in _RANK else "high", where, "modelscan:unsafe-operator",
                                f"loading it would call {operator} ({issue.get('description', 'unsafe operator')})",
                                {"operator": operator, "scanner": issue.get("scanner", "")}))
    for error in report.get("errors", []):
        findings.append(Finding("model", "medium", where, "modelscan:error",
                                f"modelscan could not scan it: {error.get('description', error)}"))
    return findings


def scan_foreign_file(path: Path, where: str | None = None) -> list[Finding]:
    """Scan one file from elsewhere without loading it: pickles with modelscan and fickling."""
    where = where or path.name
    info = sniff(path)
    findings: list[Finding] = []
    if "pickle" in info["kinds"]:
        findings += _modelscan_findings(path, where, ".pkl")
        findings += _fickling_findings(path.read_bytes(), where)
    if "zip" in info["kinds"]:
        findings += _modelscan_findings(path, where, ".pt")
        with contextlib.suppress(zipfile.BadZipFile, OSError, RuntimeError), zipfile.ZipFile(path) as archive:
            for member in info["zip_members"]:
                if member.endswith("/") or archive.getinfo(member).file_size > 512 * 1024 * 1024:
                    continue
                data = archive.read(member)
                if looks_like_pickle(data[:4096] if len(data) > 4096 else data):
                    findings += _fickling_findings(data, f"{where}:{member}")
    if "npy" in info["kinds"]:
        findings += _modelscan_findings(path, where, ".npy")
    return _dedupe(findings)


def scan_foreign(path: Path | str) -> list[Finding]:
    """Scan a foreign model file or directory (modelscan + fickling; safetensors headers validated)."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"not found: {path}")
    files = [(path, path.name)] if path.is_file() else [(path / n, n) for n in list_tree(path)]
    findings: list[Finding] = []
    for file, where in files:
        if file.suffix == ".safetensors":
            findings += check_safetensors(file, where)
        findings += scan_foreign_file(file, where)
    return findings


# -- our own model directory --------------------------------------------------------------------
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


def _dedupe(findings: Iterable[Finding]) -> list[Finding]:
    seen: set[tuple[str, str, str]] = set()
    unique = []
    for finding in findings:
        key = (finding.where, finding.rule, finding.why)
        if key not in seen:
            seen.add(key)
            unique.append(finding)
    return unique


# -- dependencies (pip-audit) -------------------------------------------------------------------
def _pip_audit_service_base() -> type:
    from pip_audit._service.interface import VulnerabilityService

    return VulnerabilityService


class OfflineOsvDatabase:
    """pip-audit's VulnerabilityService over an OSV-format file: a JSON list of OSV records
    (or ``{"vulns": [...]}``), matched by PyPI name and ECOSYSTEM ranges or explicit versions."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            raise ConfigurationError(f"offline vulnerability database not found: {self.path}") from None
        except ValueError:
            raise ConfigurationError(f"offline vulnerability database {self.path} is not JSON") from None
        records = raw.get("vulns") if isinstance(raw, dict) else raw
        if not isinstance(records, list):
            raise ConfigurationError(f"offline vulnerability database {self.path} holds no list of OSV records")
        from packaging.utils import canonicalize_name

        self.by_package: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            if not isinstance(record, dict) or "id" not in record:
                raise ConfigurationError(f"offline vulnerability database {self.path}: a record has no id")
            for affected in record.get("affected", []):
                package = affected.get("package", {})
                if package.get("ecosystem") == "PyPI" and package.get("name"):
                    self.by_package.setdefault(canonicalize_name(package["name"]), []).append(record)

    def service(self) -> Any:
        """The pip-audit VulnerabilityService view of this database."""
        return _make_offline_service(self)


def _affected(record: dict[str, Any], name: str, version: Any) -> tuple[bool, list[str]]:
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version

    hit, fixes = False, []
    plain = Version(version.public)  # a local label (+cpu) does not change which release it is
    for affected in record.get("affected", []):
        package = affected.get("package", {})
        if package.get("ecosystem") != "PyPI" or canonicalize_name(package.get("name", "")) != name:
            continue
        if str(plain) in {str(v) for v in affected.get("versions", [])} or str(version) in affected.get("versions", []):
            hit = True
        for rng in affected.get("ranges", []):
            if rng.get("type") != "ECOSYSTEM":
                continue
            introduced: Version | None = None
            for event in rng.get("events", []):
                try:
                    if "introduced" in event:
                        introduced = Version("0") if event["introduced"] == "0" else Version(event["introduced"])
                    elif "fixed" in event and introduced is not None:
                        fixed = Version(event["fixed"])
                        fixes.append(str(fixed))
                        hit = hit or introduced <= plain < fixed
                        introduced = None
                    elif "last_affected" in event and introduced is not None:
                        hit = hit or introduced <= plain <= Version(event["last_affected"])
                        introduced = None
                except InvalidVersion:
                    continue
            if introduced is not None and introduced <= plain:
                hit = True  # introduced and never fixed
    return hit, fixes


def _make_offline_service(database: OfflineOsvDatabase) -> Any:
    from packaging.version import Version
    from pip_audit._service.interface import ResolvedDependency, VulnerabilityResult, VulnerabilityService

    class _OfflineOsvService(VulnerabilityService):  # type: ignore[misc]
        def query(self, spec: Any) -> tuple[Any, list[Any]]:
            if spec.is_skipped():
                return spec, []
            if not isinstance(spec, ResolvedDependency):
                return spec, []
            results = []
            for record in database.by_package.get(spec.canonical_name, []):
                if record.get("withdrawn"):
                    continue
                hit, fixes = _affected(record, spec.canonical_name, spec.version)
                if hit:
                    description = (record.get("summary") or record.get("details") or "N/A").replace("\n", " ")
                    results.append(VulnerabilityResult.create(
                        ids=[record["id"], *record.get("aliases", [])], description=description,
                        fix_versions=sorted(Version(f) for f in fixes), published=None))
            return spec, results

    return _OfflineOsvService()


def vulnerability_service(source: str, *, offline_db: Path | None = None, timeout: int = 15) -> Any:
    """``offline`` (an OSV-format file) or ``osv`` (pip-audit's online OSV service)."""
    if source == "offline":
        if offline_db is None:
            raise ConfigurationError("dependency audit source 'offline' needs scan.dependencies.offline_db")
        return OfflineOsvDatabase(offline_db).service()
    if source == "osv":
        from pip_audit._service.osv import OsvService

        return OsvService(timeout=timeout)
    raise ConfigurationError(f"dependency audit source must be 'offline' or 'osv', not {source!r}")


def read_lock(lock: Path | str) -> list[tuple[str, str]]:
    """(name, version) of every pinned requirement, parsed by pip-audit (no pip, no network)."""
    from pip_audit._dependency_source import RequirementSource
    from pip_audit._dependency_source.interface import DependencySourceError

    source = RequirementSource([Path(lock)], disable_pip=True, no_deps=True)
    try:
        return [(d.name, str(d.version)) for d in source.collect() if not d.is_skipped()]
    except DependencySourceError as exc:
        raise BadInput(f"lock file {lock}: {exc}") from None


def audit_dependencies(lock: Path | str, service: Any, *, severity: str = "high") -> list[Finding]:
    """pip-audit of a hashed, pinned lock file; one finding per (package, advisory)."""
    from pip_audit._audit import Auditor
    from pip_audit._dependency_source import RequirementSource
    from pip_audit._dependency_source.interface import DependencySourceError
    from pip_audit._service.interface import ServiceError

    lock = Path(lock)
    if not lock.is_file():
        raise BadInput(f"lock file not found: {lock}")
    source = RequirementSource([lock], disable_pip=True, no_deps=True)
    findings: list[Finding] = []
    try:
        for dependency, vulns in Auditor(service).audit(source):
            if dependency.is_skipped():
                findings.append(Finding("dependency", "low", dependency.name, "not-audited",
                                        f"not audited: {dependency.skip_reason}"))
                continue
            for vuln in vulns:
                fixed = ", ".join(str(v) for v in vuln.fix_versions) or "none yet"
                findings.append(Finding(
                    "dependency", severity, f"{dependency.name}=={dependency.version}", str(vuln.id),
                    f"{vuln.id}: {vuln.description[:300]} (fixed in {fixed})",
                    {"package": dependency.name, "version": str(dependency.version), "advisory": str(vuln.id),
                     "aliases": sorted(vuln.aliases), "fixed_versions": [str(v) for v in vuln.fix_versions]},
                ))
    except DependencySourceError as exc:
        raise BadInput(f"lock file {lock}: {exc}") from None
    except (ServiceError, ConnectionError) as exc:
        raise ConfigurationError(f"vulnerability service unavailable: {exc}") from None
    return findings


# -- code (bandit) ------------------------------------------------------------------------------
def scan_code(paths: Sequence[Path | str], *, root: Path | str | None = None) -> list[Finding]:
    """bandit over the pipeline code; bandit's own severity, confidence in details."""
    from bandit.core import config as b_config
    from bandit.core import manager as b_manager

    targets = [str(p) for p in paths if Path(p).exists()]
    if not targets:
        return []
    logging.getLogger("bandit").setLevel(logging.ERROR)
    manager = b_manager.BanditManager(b_config.BanditConfig(), "file", quiet=True)
    manager.discover_files(targets, recursive=True)
    manager.run_tests()
    base = Path(root) if root else None
    findings = []
    for issue in manager.get_issue_list():
        filename = Path(issue.fname)
        if base is not None:
            with contextlib.suppress(ValueError):
                filename = filename.absolute().relative_to(base.absolute())
        findings.append(Finding(
            "code", str(issue.severity).lower(), f"{filename}:{issue.lineno}", f"bandit:{issue.test_id}",
            f"{issue.test} ({issue.test_id}): {issue.text}",
            {"confidence": str(issue.confidence).lower(), "cwe": getattr(issue.cwe, "id", None)},
        ))
    for fname, reason in manager.skipped:
        findings.append(Finding("code", "medium", str(fname), "bandit:skipped", f"bandit could not scan it: {reason}"))
    return findings


# -- the report ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanPolicy:
    blocking_severity: str = "high"
    code_blocking_severity: str = "medium"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ScanPolicy:
        scan = config.get("scan", config)
        policy = cls(str(scan.get("blocking_severity", "high")),
                     str(scan.get("code", {}).get("blocking_severity", "medium")))
        rank(policy.blocking_severity), rank(policy.code_blocking_severity)
        return policy

    def blocks(self, finding: Finding) -> bool:
        threshold = self.code_blocking_severity if finding.category == "code" else self.blocking_severity
        return rank(finding.severity) >= rank(threshold)

    def report(self, findings: Sequence[Finding], **extra: Any) -> dict[str, Any]:
        ordered = sorted(findings, key=lambda f: (-rank(f.severity), f.category, f.where, f.rule))
        rows = [{**f.to_dict(), "blocking": self.blocks(f)} for f in ordered]
        counts = {s: sum(1 for f in findings if f.severity == s) for s in SEVERITIES}
        blocking = [r for r in rows if r["blocking"]]
        return {
            "format": "secure-ml-scan/1",
            "blocking": bool(blocking),
            "blocking_count": len(blocking),
            "blocking_severity": self.blocking_severity,
            "code_blocking_severity": self.code_blocking_severity,
            "counts": counts,
            "counts_by_category": {c: sum(1 for f in findings if f.category == c)
                                   for c in ("model", "dependency", "code", "sbom")},
            "findings": rows,
            **extra,
        }


def summary_markdown(report: dict[str, Any], *, limit: int = 40) -> str:
    """The readable summary for the UI: counts by severity, then each finding with where and why."""
    counts = report.get("counts", {})
    verdict = ("**BLOCKED**: " + f"{report.get('blocking_count', 0)} finding(s) at or over the blocking severity"
               if report.get("blocking") else "**clear**: nothing at or over the blocking severity")
    lines = [verdict, "", "| severity | count |", "| --- | --- |"]
    lines += [f"| {s} | {counts.get(s, 0)} |" for s in SEVERITIES]
    findings = report.get("findings", [])
    if findings:
        lines += ["", "| | severity | category | where | why |", "| --- | --- | --- | --- | --- |"]
        for row in findings[:limit]:
            why = str(row["why"]).replace("|", "\\|").replace("\n", " ")[:240]
            where = str(row["where"]).replace("|", "\\|")
            lines.append(f"| {'⛔' if row.get('blocking') else ''} | {row['severity']} | {row['category']} "
                         f"| `{where}` | {why} |")
        if len(findings) > limit:
            lines.append(f"\n… and {len(findings) - limit} more in the full report (stored JSON).")
    return "\n".join(lines)


def iter_blocking(report: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from (row for row in report.get("findings", []) if row.get("blocking"))


# -- everything, for a release ------------------------------------------------------------------
REPO_ROOT = Path(__file__).resolve().parents[2]


def _repo_path(value: str | Path, repo_root: Path) -> Path:
    path = Path(value)
    return path if path.is_absolute() else repo_root / path


def release_scan(model_dir: Path | str, config: dict[str, Any], *, repo_root: Path = REPO_ROOT,
                 datasets: Sequence[Any] = (), model_name: str = "secure-ml-model",
                 code: bool = True) -> tuple[dict[str, Any], str]:
    """Model files, dependency audit, code scan and SBOM: (report, CycloneDX JSON).

    ``config`` is the parsed security.yaml. The SBOM's validation failure is itself a finding.
    """
    from secure_ml.security import sbom

    scan = config.get("scan", {})
    policy = ScanPolicy.from_config(config)
    limits_cfg = scan.get("safetensors", {})
    limits = SafetensorsLimits(
        max_header_bytes=int(limits_cfg.get("max_header_bytes", SafetensorsLimits.max_header_bytes)),
        max_tensors=int(limits_cfg.get("max_tensors", SafetensorsLimits.max_tensors)),
        allowed_dtypes=frozenset(limits_cfg.get("allowed_dtypes", SafetensorsLimits().allowed_dtypes)),
    )
    findings = scan_model_dir(model_dir, allowed_types=tuple(scan.get("model_file_types", (".safetensors", ".json", ".md"))),
                              limits=limits)
    deps = scan.get("dependencies", {})
    lock = _repo_path(deps.get("lock_file", "requirements.lock"), repo_root)
    source = str(deps.get("source", "offline"))
    service = vulnerability_service(source, offline_db=_repo_path(deps.get("offline_db", "data/osv/pypi-advisories.json"),
                                                                  repo_root))
    findings += audit_dependencies(lock, service, severity=str(deps.get("severity", "high")))
    if code:
        paths = [_repo_path(p, repo_root) for p in scan.get("code", {}).get("paths", ["secure_ml", "assets", "resources", "sensors"])]
        findings += scan_code(paths, root=repo_root)
    document = sbom.model_sbom(model_dir, lock, model_name=model_name, datasets=datasets)
    try:
        sbom.validate(document)
        sbom_valid = True
    except Exception as exc:  # noqa: BLE001 - any validation failure is reported as a finding
        findings.append(Finding("sbom", "high", "sbom.cdx.json", "cyclonedx-schema", str(exc)[:300]))
        sbom_valid = False
    from secure_ml.custody.integrity import sha256_bytes

    report = policy.report(findings, sbom_sha256=sha256_bytes(document.encode()), sbom_valid=sbom_valid,
                           vulnerability_source=source, lock_file=lock.name)
    return report, document
