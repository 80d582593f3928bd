"""A corpus of hostile and benign model files, written at test time (nothing hostile is committed).

    hostile, benign = build_corpus(tmp_path)     # {name: (technique, path)}, {name: path}
    python -m tests.scan_corpus --table          # ours against each scanner alone (README table)

Hostile pickles are crafted from opcode bytes and never loaded; each would run a command if it
were. Benign files are real saves: torch.save, numpy.save/savez, a pickled numpy array,
safetensors, scikit-learn state as npz plus JSON, a Keras-shaped zip and HDF5 of plain layers,
an ONNX protobuf with relative external data, a GGUF with a plain chat template.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import struct
import sys
import tarfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

COMMAND = "touch /tmp/secure-ml-pwned"


# -- crafted pickles ---------------------------------------------------------------------------
def _unicode(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def proto0_global(module: str = "os", name: str = "system", lead: bytes = b"N0") -> bytes:
    """Protocol 0: no PROTO opcode; ``lead`` is a harmless opcode first (NONE, POP)."""
    return lead + f"c{module}\n{name}\n(S'{COMMAND}'\ntR.".encode()


def proto2_global(module: str = "builtins", name: str = "exec") -> bytes:
    return b"\x80\x02" + f"c{module}\n{name}\n".encode() + b"X" + struct.pack("<I", len(COMMAND)) + \
        COMMAND.encode() + b"\x85R."


def proto4_stack_global(module: str = "subprocess", name: str = "getoutput") -> bytes:
    return b"\x80\x04\x95" + struct.pack("<Q", 0) + _unicode(module) + _unicode(name) + b"\x93" + \
        _unicode(COMMAND) + b"\x85R."


def memo_stack_global(module: str = "os", name: str = "system") -> bytes:
    """The operands come from the memo (BINPUT/BINGET), not from literals next to STACK_GLOBAL."""
    return (b"\x80\x04" + _unicode(module) + b"q\x00" + _unicode(name) + b"q\x01" + b"0" + b"0" +
            b"h\x00h\x01\x93" + _unicode(COMMAND) + b"\x85R.")


def inst_opcode(module: str = "os", name: str = "system") -> bytes:
    return f"(S'{COMMAND}'\ni{module}\n{name}\n.".encode()


def ext_opcode() -> bytes:
    return b"\x80\x02\x82\x01" + _unicode(COMMAND) + b"\x85R."


def dict_with(payload: bytes) -> bytes:
    """A benign-looking state dict whose one value is the payload (protocol 2)."""
    body = payload[2:-1] if payload.startswith(b"\x80") else payload[:-1]
    return b"\x80\x02}X\x07\x00\x00\x00weightsK\x01sX\x04\x00\x00\x00hook" + body + b"s."


def benign_pickle() -> bytes:
    import pickle

    return pickle.dumps({"epoch": 3, "lr": 0.01, "layers": [4, 8, 1]}, protocol=2)


# -- containers ---------------------------------------------------------------------------------
def torch_zip(pickle_bytes: bytes, *, extra: dict[str, bytes] | None = None, duplicate_benign: bool = False) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as archive:
        warnings.simplefilter("ignore")  # the duplicate member name is the point
        if duplicate_benign:
            archive.writestr("archive/data.pkl", benign_pickle())
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/version", "3\n")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def zip_of(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_of(members: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:  # type: ignore[call-overload]
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def object_npy(payload: bytes) -> bytes:
    return npy_header("|O", (1,)) + payload


def keras_zip(layers: list[dict[str, object]]) -> bytes:
    config = {"module": "keras", "class_name": "Sequential", "config": {"name": "seq", "layers": layers}}
    return zip_of({"config.json": json.dumps(config).encode(), "metadata.json": b'{"keras_version": "3.6.0"}',
                   "model.weights.h5": b""}, zipfile.ZIP_STORED)


def dense(name: str = "dense") -> dict[str, object]:
    return {"module": "keras.layers", "class_name": "Dense", "config": {"name": name, "units": 4},
            "registered_name": None}


def lambda_layer() -> dict[str, object]:
    return {"module": "keras.layers", "class_name": "Lambda",
            "config": {"name": "lambda", "function": {"class_name": "__lambda__", "config": {"code": "YWJj"}}}}


def h5_model(path: Path, layers: list[dict[str, object]]) -> None:
    import h5py

    with h5py.File(path, "w") as h5:
        h5.attrs["model_config"] = json.dumps({"class_name": "Sequential", "config": {"layers": layers}})
        h5.create_dataset("weights", data=[1.0, 2.0])


def _pb_varint(value: int) -> bytes:
    out = b""
    while True:
        byte, value = value & 0x7F, value >> 7
        out += bytes([byte | (0x80 if value else 0)])
        if not value:
            return out


def _pb(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return _pb_varint(number << 3) + _pb_varint(payload)
    return _pb_varint(number << 3 | 2) + _pb_varint(len(payload)) + payload


def onnx_model(location: str | None) -> bytes:
    tensor = _pb(1, 4) + _pb(2, 1) + _pb(8, b"w")
    if location is not None:
        tensor += _pb(13, _pb(1, b"location") + _pb(2, location.encode())) + _pb(14, 1)
    else:
        tensor += _pb(9, struct.pack("<4f", 1, 2, 3, 4))
    graph = _pb(1, _pb(1, b"x") + _pb(2, b"y") + _pb(4, b"Identity")) + _pb(2, b"g") + _pb(5, tensor)
    return _pb(1, 8) + _pb(7, graph) + _pb(8, _pb(2, 17))


def gguf(template: str) -> bytes:
    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw
    kv = string("general.architecture") + struct.pack("<I", 8) + string("llama")
    kv += string("tokenizer.chat_template") + struct.pack("<I", 8) + string(template)
    kv += string("llama.context_length") + struct.pack("<I", 4) + struct.pack("<I", 2048)
    return b"GGUF" + struct.pack("<I", 3) + struct.pack("<QQ", 0, 3) + kv


SSTI = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
BENIGN_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


# -- the corpus ---------------------------------------------------------------------------------
def _hostile() -> dict[str, tuple[str, Callable[[Path], None] | bytes]]:
    p0 = proto0_global()
    return {
        "p0_os_system.pkl": ("protocol-0 GLOBAL after a harmless opcode", p0),
        "p0_mark_first.pkl": ("protocol-0 GLOBAL after a harmless opcode", proto0_global("posix", "system", b"(t0")),
        "p0_builtins_eval.pickle": ("protocol-0 GLOBAL after a harmless opcode", proto0_global("builtins", "eval", b"I1\n0")),
        "p2_exec.pkl": ("protocol-2 GLOBAL + REDUCE", proto2_global()),
        "p2_runpy.bin": ("protocol-2 GLOBAL + REDUCE", proto2_global("runpy", "_run_code")),
        "p2_in_dict.pt": ("protocol-2 GLOBAL + REDUCE", dict_with(proto2_global("os", "popen"))),
        "p4_subprocess.pkl": ("protocol-4 STACK_GLOBAL", proto4_stack_global()),
        "p4_pydoc_pager.pkl": ("uncommon callable (deny-lists miss it)", proto4_stack_global("pydoc", "pipepager")),
        "p2_timeit.pkl": ("uncommon callable (deny-lists miss it)", proto2_global("timeit", "timeit")),
        "p2_numpy_load.pkl": ("uncommon callable (deny-lists miss it)", proto2_global("numpy", "load")),
        "p4_memo_operands.pkl": ("STACK_GLOBAL via memo", memo_stack_global()),
        "p4_memo_builtins.pkl": ("STACK_GLOBAL via memo", memo_stack_global("builtins", "exec")),
        "inst_os_system.pkl": ("INST opcode", inst_opcode()),
        "inst_subprocess.pkl": ("INST opcode", inst_opcode("subprocess", "call")),
        "ext_registry.pkl": ("extension-registry opcode", ext_opcode()),
        "torch_evil.pt": ("torch zip with hostile data.pkl", torch_zip(proto2_global("os", "system"))),
        "torch_dup_member.pt": ("torch zip with hostile data.pkl", torch_zip(proto2_global(), duplicate_benign=True)),
        "stacked.pkl": ("stacked pickles (hostile after benign)", benign_pickle() + proto2_global()),
        "stacked_p0.pkl": ("stacked pickles (hostile after benign)", benign_pickle() + p0),
        "appended_after_npy.npy": ("pickle at an offset", npy_header("<f4", (2,)) + b"\0" * 8 + proto2_global()),
        "offset_in_member.zip": ("pickle at an offset", zip_of({"notes.bin": bytes(range(200)) + proto4_stack_global()})),
        "tar_pickle.tar": ("pickle inside tar", tar_of({"model/weights.pkl": proto2_global()})),
        "tar_p0.tar": ("pickle inside tar", tar_of({"data.bin": p0})),
        "joblib_gzip.joblib": ("compressed pickle (gzip, bz2, xz)", gzip.compress(proto2_global("os", "system"))),
        "bz2_pickle.pkl.bz2": ("compressed pickle (gzip, bz2, xz)", bz2.compress(p0)),
        "xz_pickle.pkl.xz": ("compressed pickle (gzip, bz2, xz)", lzma.compress(proto4_stack_global())),
        "nested.zip": ("nested archives", zip_of({"inner.tar.gz": gzip.compress(tar_of({"x/y.pt": torch_zip(p0)}))})),
        "nested_tgz.tar.gz": ("nested archives", tar_of({"a.zip": zip_of({"b.pkl.xz": lzma.compress(p0)})}, "w:gz")),
        "object_array.npy": ("NumPy object array", object_npy(proto2_global())),
        "object_in_npz.npz": ("NumPy object array", zip_of({"arr_0.npy": object_npy(proto4_stack_global())})),
        "keras_lambda.keras": ("Keras Lambda / custom object", keras_zip([dense(), lambda_layer()])),
        "keras_custom.keras": ("Keras Lambda / custom object", keras_zip([dense(), {
            "module": "evil_pkg.layers", "class_name": "Backdoor", "config": {"name": "b"}, "registered_name": "Custom>Backdoor"}])),
        "keras_lambda.h5": ("Keras Lambda / custom object", lambda path: h5_model(path, [
            {"class_name": "Dense", "config": {"name": "d"}},
            {"class_name": "Lambda", "config": {"name": "l", "function": ["YWJj", None, None], "function_type": "lambda"}}])),
        "onnx_traversal.onnx": ("ONNX external data outside the folder", onnx_model("../../../../etc/passwd")),
        "onnx_absolute.onnx": ("ONNX external data outside the folder", onnx_model("/root/.ssh/id_rsa")),
        "gguf_ssti.gguf": ("GGUF chat template injection", gguf(SSTI)),
        "gguf_attr.gguf": ("GGUF chat template injection", gguf("{{ cycler|attr('__init__') }}")),
        "zip_bomb.zip": ("bombs and unreadable files", zip_of({"zeros.bin": b"\0" * (64 << 20)})),
        "gzip_deep.gz": ("bombs and unreadable files", _deep_gzip(12)),
        "truncated.pkl": ("bombs and unreadable files", proto2_global()[:-3]),
        "encrypted_member.zip": ("bombs and unreadable files", _encrypted_zip()),
        "garbage.bin": ("bombs and unreadable files", bytes(range(256)) * 64),
    }


def _deep_gzip(levels: int) -> bytes:
    data = proto2_global()
    for _ in range(levels):
        data = gzip.compress(data)
    return data


def _encrypted_zip() -> bytes:
    data = bytearray(zip_of({"data.pkl": proto2_global()}, zipfile.ZIP_STORED))
    # Set the "encrypted" flag in the local and central headers: no reader can see the member.
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(signature)
        data[at + offset] |= 1
    return bytes(data)


def _benign(root: Path) -> dict[str, Callable[[Path], None]]:
    def torch_state(path: Path) -> None:
        import torch

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        torch.save(model.state_dict(), path)

    def torch_legacy(path: Path) -> None:
        import torch

        torch.save({"w": torch.arange(6.0).reshape(2, 3), "step": 5}, path, _use_new_zipfile_serialization=False)

    def torch_params(path: Path) -> None:
        import torch

        torch.save({"p": torch.nn.Parameter(torch.ones(3)), "b": torch.zeros(2, dtype=torch.int64),
                    "h": torch.ones(2, dtype=torch.bfloat16), "meta": {"lr": 0.1, "sizes": [1, 2]}}, path)

    def npy(path: Path) -> None:
        import numpy as np

        with path.open("wb") as handle:
            np.save(handle, np.arange(12, dtype=np.float32).reshape(3, 4))

    def npz(path: Path) -> None:
        import numpy as np

        with path.open("wb") as handle:
            np.savez_compressed(handle, a=np.ones(5), b=np.arange(3))

    def numpy_pickle(path: Path) -> None:
        import pickle

        import numpy as np

        path.write_bytes(pickle.dumps({"mean": np.zeros(3), "scale": np.float64(2.0)}, protocol=4))

    def safetensors_file(path: Path) -> None:
        import torch
        from safetensors.torch import save_file

        save_file({"w": torch.ones(2, 2)}, path)

    def sklearn_npz(path: Path) -> None:
        import numpy as np
        from sklearn.linear_model import LogisticRegression

        x = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
        model = LogisticRegression().fit(x, [0, 1, 1, 0])
        with path.open("wb") as handle:
            np.savez(handle, coef_=model.coef_, intercept_=model.intercept_, classes_=model.classes_)
        path.with_suffix(".json").write_text(json.dumps(model.get_params()))

    return {
        "torch_state_dict.pt": torch_state,
        "torch_legacy.pt": torch_legacy,
        "torch_params.pth": torch_params,
        "array.npy": npy,
        "arrays.npz": npz,
        "numpy_state.pkl": numpy_pickle,
        "plain_state.pkl": lambda path: path.write_bytes(benign_pickle()),
        "weights.safetensors": safetensors_file,
        "sklearn_state.npz": sklearn_npz,
        "keras_dense.keras": lambda path: path.write_bytes(keras_zip([dense("a"), dense("b")])),
        "keras_dense.h5": lambda path: h5_model(path, [{"class_name": "Dense", "config": {"name": "d", "units": 2}}]),
        "onnx_external.onnx": lambda path: path.write_bytes(onnx_model("weights.bin")),
        "onnx_inline.onnx": lambda path: path.write_bytes(onnx_model(None)),
        "chat.gguf": lambda path: path.write_bytes(gguf(BENIGN_TEMPLATE)),
        "torch_state.tar.gz": lambda path: path.write_bytes(tar_of({"m.pt": (root / "torch_state_dict.pt").read_bytes()}, "w:gz")),
    }


def build_corpus(root: Path) -> tuple[dict[str, tuple[str, Path]], dict[str, Path]]:
    (root / "hostile").mkdir(parents=True, exist_ok=True)
    (root / "benign").mkdir(parents=True, exist_ok=True)
    hostile = {}
    for name, (technique, maker) in _hostile().items():
        path = root / "hostile" / name
        if callable(maker):
            maker(path)
        else:
            path.write_bytes(maker)
        hostile[name] = (technique, path)
    benign = {}
    for name, write in _benign(root / "benign").items():
        path = root / "benign" / name
        write(path)
        benign[name] = path
    benign["sklearn_state.json"] = root / "benign" / "sklearn_state.json"
    return hostile, benign


# -- each scanner alone -------------------------------------------------------------------------
def verdicts(path: Path) -> dict[str, bool]:
    """Blocked (True) or passed by ours and by each scanner alone (an error counts as blocked)."""
    import logging

    from secure_ml.security.scan_findings import ScanPolicy
    from secure_ml.security.scan_foreign import scan_foreign_file

    logging.disable(logging.CRITICAL)
    out = {"ours": ScanPolicy().report(scan_foreign_file(path, external=False))["blocking"]}
    from modelscan.modelscan import ModelScan
    from modelscan.settings import DEFAULT_SETTINGS

    report = ModelScan(settings=DEFAULT_SETTINGS).scan(path)
    out["modelscan"] = bool(report.get("issues")) or bool(report.get("errors"))
    from picklescan.scanner import scan_file_path

    try:
        result = scan_file_path(str(path))
        out["picklescan"] = bool(result.infected_files) or bool(result.scan_err)
    except Exception:  # noqa: BLE001
        out["picklescan"] = True
    import fickling

    try:
        out["fickling"] = not fickling.is_likely_safe(str(path))
    except Exception:  # noqa: BLE001
        out["fickling"] = True
    return out


def table(root: Path) -> str:
    hostile, benign = build_corpus(root)
    scanners = ("ours", "modelscan", "picklescan", "fickling")
    rows: dict[str, list[int]] = {}
    counts: dict[str, list[int]] = {}
    totals = {s: [0, 0] for s in scanners}
    for _name, (technique, path) in hostile.items():
        result = verdicts(path)
        row = rows.setdefault(technique, [0] * len(scanners))
        counts.setdefault(technique, [0])[0] += 1
        for i, scanner in enumerate(scanners):
            row[i] += result[scanner]
            totals[scanner][0] += result[scanner]
    false = {s: 0 for s in scanners}
    for path in benign.values():
        result = verdicts(path)
        for scanner in scanners:
            false[scanner] += result[scanner]
    lines = ["| technique (files) | " + " | ".join(scanners) + " |", "|---" * (len(scanners) + 1) + "|"]
    for technique, row in rows.items():
        n = counts[technique][0]
        lines.append(f"| {technique} ({n}) | " + " | ".join(f"{v}/{n}" for v in row) + " |")
    lines.append(f"| **hostile blocked ({len(hostile)})** | " +
                 " | ".join(f"**{totals[s][0]}/{len(hostile)}**" for s in scanners) + " |")
    lines.append(f"| **benign false alarms ({len(benign)})** | " +
                 " | ".join(f"**{false[s]}/{len(benign)}**" for s in scanners) + " |")
    return "\n".join(lines)


if __name__ == "__main__" and "--table" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(table(Path(tmp)))
