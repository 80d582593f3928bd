"""Model-file scan, dependency audit, code scan and SBOM (secure_ml.scanning, secure_ml.sbom).

Touches: real torch/safetensors model files built here, real pickles and torch zips built here
(never loaded), modelscan, fickling, pip-audit's requirement parsing and auditor over the shipped
offline OSV file, bandit, cyclonedx-python-lib's schema validator.
Does not touch: the online OSV service (no network here), Dagster (see test_security_stage.py).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest

from secure_ml.cli import main as cli
from secure_ml.security import sbom, scanning

REPO = Path(__file__).resolve().parents[1]
OSV_DB = REPO / "data" / "osv" / "pypi-advisories.json"


def write_model(directory: Path, *, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    directory.mkdir(parents=True)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps({"tensors": {k: list(v.shape) for k, v in state.items()}}))
    (directory / "preprocessing.json").write_text(json.dumps({"features": ["a", "b"]}))
    (directory / "MODEL_CARD.md").write_text("# model card\n")
    return directory


class Payload:
    """Would create a file if ever unpickled; the tests assert it never is."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def rules(findings: list[scanning.Finding]) -> set[str]:
    return {f.rule for f in findings}


def test_clean_model_dir_has_no_findings(tmp_path: Path) -> None:
    assert scanning.scan_model_dir(write_model(tmp_path / "m")) == []


@pytest.mark.parametrize("name", ["weights.pkl", "preprocessing.json", "MODEL_CARD.md", "extra.safetensors", "noext"])
def test_pickle_smuggled_under_any_name_blocks(tmp_path: Path, name: str) -> None:
    model = write_model(tmp_path / "m")
    (model / name).write_bytes(pickle.dumps({"a": 1}, protocol=4))
    findings = scanning.scan_model_dir(model)
    smuggled = [f for f in findings if f.rule == "pickle-in-model-dir"]
    assert smuggled and smuggled[0].where == name and smuggled[0].severity == "critical"
    assert scanning.ScanPolicy().report(findings)["blocking"]


def test_protocol0_pickle_in_markdown_is_found(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m")
    marker = tmp_path / "PWNED"
    (model / "MODEL_CARD.md").write_bytes(pickle.dumps(Payload(marker), protocol=0))
    findings = scanning.scan_model_dir(model)
    assert "pickle-in-model-dir" in rules(findings)
    assert any(f.rule.startswith(("fickling", "modelscan")) and f.severity == "critical" for f in findings)
    assert not marker.exists()


def test_torch_zip_whose_pickle_runs_code_is_flagged_and_never_loaded(tmp_path: Path) -> None:
    import torch

    marker = tmp_path / "PWNED"
    model = write_model(tmp_path / "m")
    torch.save({"w": torch.zeros(2), "hook": Payload(marker)}, model / "extra_weights.json")
    findings = scanning.scan_model_dir(model)
    assert "pickle-in-model-dir" in rules(findings)
    calls = [f for f in findings if f.rule == "modelscan:unsafe-operator"]
    assert calls and "system" in calls[0].why and calls[0].severity == "critical"
    assert any(f.rule == "fickling:MLAllowlist" for f in findings)
    assert not marker.exists()
    # As a foreign checkpoint it is still blocked (modelscan + fickling), a benign one is not.
    foreign = tmp_path / "evil.pt"
    (model / "extra_weights.json").rename(foreign)
    assert scanning.ScanPolicy().report(scanning.scan_foreign(foreign))["blocking"]
    benign = tmp_path / "benign.pt"
    torch.save({"w": torch.zeros(2)}, benign)
    assert not scanning.ScanPolicy().report(scanning.scan_foreign(benign))["blocking"]
    assert not marker.exists()


def test_safetensors_that_is_also_a_zip_is_a_polyglot(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m")
    weights = model / "model.safetensors"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"a": 1}, protocol=2))
    weights.write_bytes(weights.read_bytes() + buffer.getvalue())
    findings = scanning.scan_model_dir(model)
    assert {"pickle-in-model-dir", "polyglot", "safetensors-header"} <= rules(findings)
    assert any("trailing bytes" in f.why for f in findings)
    assert scanning.ScanPolicy().report(findings)["blocking"]


def test_zip_hidden_inside_tensor_data_is_still_a_polyglot(tmp_path: Path) -> None:
    """A zip stored as a U8 tensor: the header is valid, but the file is two formats at once."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("payload.txt", b"hello")
    blob = buffer.getvalue()
    header = json.dumps({"blob": {"dtype": "U8", "shape": [len(blob)], "data_offsets": [0, len(blob)]}}).encode()
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + blob)
    findings = scanning.scan_model_dir(model)
    assert [f for f in findings if f.rule == "polyglot" and f.severity == "critical"]


@pytest.mark.parametrize("mutate, expect", [
    (lambda h: {**h, "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "overlaps"),
    (lambda h: {k: {**v, "dtype": "OBJ"} for k, v in h.items()}, "not allowed"),
    (lambda h: {k: {**v, "shape": [999]} for k, v in h.items()}, "needs"),
])
def test_safetensors_header_validation(tmp_path: Path, mutate, expect: str) -> None:  # type: ignore[no-untyped-def]
    model = write_model(tmp_path / "m")
    weights = model / "model.safetensors"
    raw = weights.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    header.pop("__metadata__", None)
    new = json.dumps(mutate(header)).encode()
    weights.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + length:])
    findings = scanning.scan_model_dir(model)
    assert any(expect in f.why for f in findings), [f.why for f in findings]


def test_safetensors_header_bounds_and_config_shapes(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m")
    weights = model / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])
    assert any("limit" in f.why for f in scanning.scan_model_dir(model))
    weights.write_bytes(raw)
    config = json.loads((model / "config.json").read_text())
    first = next(iter(config["tensors"]))
    config["tensors"][first] = [7, 7]
    (model / "config.json").write_text(json.dumps(config))
    assert any("config.json says [7, 7]" in f.why for f in scanning.scan_model_dir(model))
    weights.write_bytes(raw[:20])
    assert any(f.rule == "safetensors-header" for f in scanning.scan_model_dir(model))


def test_dependency_audit_finds_advisory_in_test_lock(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text("pyyaml==5.3.1 \\\n    --hash=sha256:" + "0" * 64 + "\n"
                    "torch==2.13.0+cpu \\\n    --hash=sha256:" + "1" * 64 + "\n")
    service = scanning.vulnerability_service("offline", offline_db=OSV_DB)
    findings = scanning.audit_dependencies(lock, service)
    assert len(findings) == 1
    finding = findings[0]
    assert finding.details["package"] == "pyyaml" and finding.details["version"] == "5.3.1"
    assert finding.details["advisory"] == "PYSEC-2021-142" and finding.details["fixed_versions"] == ["5.4"]
    assert scanning.ScanPolicy().blocks(finding)


def test_shipped_lock_has_no_blocking_advisory_in_shipped_db() -> None:
    service = scanning.vulnerability_service("offline", offline_db=OSV_DB)
    assert scanning.audit_dependencies(REPO / "requirements.lock", service) == []


def test_bad_vulnerability_sources_are_clear_errors(tmp_path: Path) -> None:
    from secure_ml.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="not found"):
        scanning.vulnerability_service("offline", offline_db=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigurationError, match="not JSON"):
        scanning.vulnerability_service("offline", offline_db=tmp_path / "bad.json")
    with pytest.raises(ConfigurationError, match="'offline' or 'osv'"):
        scanning.vulnerability_service("nvd")


def test_bandit_flags_medium_findings_and_they_block(tmp_path: Path) -> None:
    code = tmp_path / "pkg"
    code.mkdir()
    (code / "bad.py").write_text("import subprocess\n\ndef run(cmd):\n    return subprocess.call(cmd, shell=True)\n")
    findings = scanning.scan_code([code], root=tmp_path)
    shell = [f for f in findings if f.rule == "bandit:B602"]
    assert shell and shell[0].where == "pkg/bad.py:4" and shell[0].severity == "high"
    assert scanning.ScanPolicy().blocks(shell[0])


def test_own_code_is_bandit_clean() -> None:
    own = [*sorted((REPO / "secure_ml" / "security").glob("scan*.py")),
           *[REPO / p for p in ("secure_ml/security/signing.py", "secure_ml/security/attestation.py",
                                "secure_ml/security/sbom.py", "assets/security.py", "resources/security.py",
                                "secure_ml/cli/cmd_model.py")]]
    assert [f for f in scanning.scan_code(own, root=REPO) if scanning.ScanPolicy().blocks(f)] == []


def test_sbom_lists_files_datasets_packages_and_validates(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m")
    document = sbom.model_sbom(model, REPO / "requirements.lock",
                               datasets=[sbom.DatasetRef("validated_dataset", "a" * 64, "dvc:1234")])
    parsed = sbom.validate(document)
    by_type: dict[str, list[dict]] = {}
    for component in parsed["components"]:
        by_type.setdefault(component["type"], []).append(component)
    assert {c["name"] for c in by_type["file"]} == {"model.safetensors", "config.json", "preprocessing.json", "MODEL_CARD.md"}
    assert all(c["hashes"][0]["alg"] == "SHA-256" for c in by_type["file"])
    assert by_type["data"][0]["hashes"][0]["content"] == "a" * 64
    assert any(c["purl"].startswith("pkg:pypi/torch@") for c in by_type["library"])
    from secure_ml.errors import VerificationError

    with pytest.raises(VerificationError, match="CycloneDX"):
        sbom.validate(document.replace('"type": "file"', '"type": "not-a-type"'))


def test_release_scan_report_and_summary(tmp_path: Path) -> None:
    import yaml

    config = yaml.safe_load((REPO / "secure_ml" / "config" / "security.yaml").read_text())
    model = write_model(tmp_path / "m")
    (model / "notes.pkl").write_bytes(pickle.dumps([1, 2], protocol=4))
    report, document = scanning.release_scan(model, config, code=False)
    assert report["blocking"] and report["counts"]["critical"] >= 1 and report["sbom_valid"]
    summary = scanning.summary_markdown(report)
    assert "BLOCKED" in summary and "`notes.pkl`" in summary and "| critical |" in summary


def test_cli_scan_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = write_model(tmp_path / "m")
    assert cli(["scan", str(model)]) == 0
    (model / "x.bin").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    assert cli(["scan", str(model)]) == 1
    out = capsys.readouterr().out
    assert "x.bin" in out and "critical" in out
    assert cli(["scan", str(tmp_path / "nothing")]) == 2


def test_large_protocol0_pickle_is_found_past_the_first_kilobytes(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m")
    (model / "notes.md").write_bytes(pickle.dumps([f"note {i} " * 10 for i in range(200)], protocol=0))
    assert (model / "notes.md").stat().st_size > 4096
    assert "pickle-in-model-dir" in rules(scanning.scan_model_dir(model))


def test_training_stage_model_shapes_are_checked_against_its_config(tmp_path: Path) -> None:
    """The training stage's tabular-mlp (secure_ml.training.build_model) against its config.json."""
    from safetensors.torch import save_file

    from secure_ml.training.model import build_model

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    module = build_model(10, [8, 4], 0.1)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, model_dir / "model.safetensors")
    config = {"architecture": "tabular-mlp", "inputs": 10, "hidden": [8, 4], "outputs": 1}
    (model_dir / "config.json").write_text(json.dumps(config))
    assert scanning.scan_model_dir(model_dir) == []
    (model_dir / "config.json").write_text(json.dumps({**config, "hidden": [8, 5]}))
    mismatches = [f.why for f in scanning.scan_model_dir(model_dir) if f.rule == "safetensors-shape"]
    assert any("layers.3.weight" in why and "[5, 8]" in why for why in mismatches)


def test_scanning_is_small_modules_of_one_concern() -> None:
    """Issue 12: no scanning module over 500 lines; the release scan's public names stay importable."""
    modules = sorted((REPO / "secure_ml" / "security").glob("scan*.py"))
    assert len(modules) >= 8
    assert {m.name: len(m.read_text().splitlines()) for m in modules if len(m.read_text().splitlines()) > 500} == {}
    for name in scanning.__all__:
        assert getattr(scanning, name) is not None
