"""Foreign model scanning, fail-closed (secure_ml.security.scan_foreign and the modules it uses).

Touches: a corpus of hostile files crafted from opcode bytes (tests/scan_corpus.py, never loaded)
and benign files from real torch.save, numpy.save/savez, pickle of numpy arrays, safetensors,
scikit-learn state, h5py; our scanner with and without modelscan, picklescan and fickling; the
`secure-ml scan --foreign` CLI. Does not touch: ModelAudit (not installed; see README), the network.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from secure_ml.cli import main as cli
from secure_ml.security import scan_archive, scan_pickle
from secure_ml.security.scan_findings import ScanPolicy
from secure_ml.security.scan_foreign import scan_foreign, scan_foreign_file
from tests import scan_corpus

pytestmark = pytest.mark.slow  # runs every third-party scanner over the corpus

MARKER = Path("/tmp/secure-ml-pwned")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, tuple[str, Path]], dict[str, Path]]:
    return scan_corpus.build_corpus(tmp_path_factory.mktemp("corpus"))


def blocks(path: Path, **kwargs: object) -> bool:
    return bool(ScanPolicy().report(scan_foreign_file(path, **kwargs))["blocking"])  # type: ignore[arg-type]


def test_corpus_is_large_and_varied(corpus: tuple[dict[str, tuple[str, Path]], dict[str, Path]]) -> None:
    hostile, benign = corpus
    assert len(hostile) >= 30 and len({t for t, _ in hostile.values()}) >= 10 and len(benign) >= 10


def test_every_hostile_file_is_blocked_by_our_checks_alone(corpus: tuple[dict[str, tuple[str, Path]], dict[str, Path]]) -> None:
    hostile, _ = corpus
    missed = [name for name, (_, path) in hostile.items() if not blocks(path, external=False)]
    assert missed == []
    assert not MARKER.exists()


def test_no_benign_file_is_blocked_with_every_scanner_on(corpus: tuple[dict[str, tuple[str, Path]], dict[str, Path]]) -> None:
    _, benign = corpus
    false_alarms = {name: [f.why for f in scan_foreign_file(path) if ScanPolicy().blocks(f)]
                    for name, path in benign.items()}
    assert {name: why for name, why in false_alarms.items() if why} == {}


@pytest.mark.parametrize("name, rule, words", [
    ("p0_os_system.pkl", "pickle-import", "os.system"),
    ("p4_memo_operands.pkl", "pickle-import", "os.system"),
    ("ext_registry.pkl", "pickle-import", "extension registry"),
    ("stacked.pkl", "pickle-import", "builtins.exec"),
    ("appended_after_npy.npy", "pickle-import", "builtins.exec"),
    ("nested_tgz.tar.gz", "pickle-import", "os.system"),
    ("keras_lambda.h5", "keras-code", "Lambda"),
    ("keras_custom.keras", "keras-code", "evil_pkg"),
    ("onnx_traversal.onnx", "onnx-external-data", "leaves the model's folder"),
    ("gguf_ssti.gguf", "gguf-chat-template", "__class__"),
    ("zip_bomb.zip", "archive-bomb", "expands more than"),
    ("gzip_deep.gz", "archive-bomb", "nested deeper"),
    ("encrypted_member.zip", "unreadable", "encrypted"),
    ("garbage.bin", "unreadable", "no reader recognises"),
    ("truncated.pkl", "unreadable", "truncated"),
])
def test_each_block_says_why(corpus: tuple[dict[str, tuple[str, Path]], dict[str, Path]], name: str, rule: str,
                             words: str) -> None:
    findings = scan_foreign_file(corpus[0][name][1], external=False)
    assert [f for f in findings if f.rule == rule and words in f.why and ScanPolicy().blocks(f)], findings


def test_names_do_not_matter(tmp_path: Path) -> None:
    """A pickle called .safetensors, .json or nothing at all is still a pickle."""
    for name in ("model.safetensors", "config.json", "README"):
        path = tmp_path / name
        path.write_bytes(scan_corpus.proto0_global())
        assert blocks(path, external=False), name


def test_pickle_walker_resolves_stack_global_only_from_known_strings() -> None:
    stream = scan_pickle.walk_pickle(scan_corpus.memo_stack_global("torch._utils", "_rebuild_tensor_v2"))
    assert stream.imports == ("torch._utils._rebuild_tensor_v2",) and scan_pickle.disallowed(stream) == []
    # Operands from a REDUCE result are not literal strings: nobody can say what is imported.
    computed = (b"\x80\x04\x8c\x08builtins\x8c\x03str\x93\x8c\x02os\x85R\x8c\x06system\x93.")
    assert "not literal strings" in " ".join(scan_pickle.disallowed(scan_pickle.walk_pickle(computed)))


def test_bomb_limits_are_configurable(tmp_path: Path) -> None:
    path = tmp_path / "two.gz"
    path.write_bytes(gzip.compress(gzip.compress(scan_corpus.benign_pickle())))
    assert not blocks(path, external=False)
    assert blocks(path, external=False, limits=scan_archive.UnpackLimits(max_depth=1))


def test_directory_scan_and_cli(corpus: tuple[dict[str, tuple[str, Path]], dict[str, Path]], tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SECURE_ML_HOME", str(tmp_path / "home"))
    hostile, benign = corpus
    assert cli([ "scan", "--foreign", str(hostile["p0_os_system.pkl"][1])]) == 1
    assert "os.system" in capsys.readouterr().out
    assert cli(["scan", "--foreign", "--json", str(benign["torch_state_dict.pt"])]) == 0
    assert json.loads(capsys.readouterr().out)["blocking"] is False
    findings = scan_foreign(hostile["tar_pickle.tar"][1].parent)
    assert {f.where.split(":")[0].split("@")[0] for f in findings if ScanPolicy().blocks(f)} >= {"tar_pickle.tar", "garbage.bin"}


def test_field_scanners_get_a_name_that_matches_the_content(corpus: tuple[dict[str, tuple[str, Path]], dict[str, Path]],
                                                             tmp_path: Path) -> None:
    """modelscan picks its scanner by extension: an HDF5 file called .bin still gets its H5 scanner."""
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(corpus[0]["keras_lambda.h5"][1].read_bytes())
    findings = scan_foreign_file(renamed)
    assert [f for f in findings if f.rule == "modelscan:unsafe-operator" and "Lambda" in f.why]
    # What a field scanner flags about an import on our allow-list is noted, not blocking.
    numpy_state = [f for f in scan_foreign_file(corpus[1]["numpy_state.pkl"]) if f.rule.startswith("fickling:")]
    assert numpy_state and all(f.severity == "low" and "allow-list" in f.why for f in numpy_state)


def test_magic_numbers_inside_tensor_data_are_not_archives(tmp_path: Path) -> None:
    """A storage that starts like gzip and holds a zip end-record signature is still numbers."""
    import numpy as np
    import torch

    raw = bytearray(np.random.default_rng(0).bytes(4096))
    raw[:2], raw[-100:-96] = b"\x1f\x8b", b"PK\x05\x06"
    path = tmp_path / "benign.pt"
    torch.save({"w": torch.tensor(list(raw), dtype=torch.uint8)}, path)
    assert scan_foreign_file(path) == []
    # The same bytes as a file of their own claim to be gzip and are not: that blocks.
    loose = tmp_path / "loose.bin"
    loose.write_bytes(bytes(raw))
    assert blocks(loose, external=False)
