"""The STREAM format in secure_ml.crypto: round trips and every way a ciphertext can be wrong.

Touches: encrypt_stream / decrypt_stream / rewrap / read_header with real AES-256-GCM
(cryptography) and real key providers (EnvKeyProvider from a dict, LocalKeyring on disk). Uses a
tiny chunk size so that chunk boundaries, reordering and splicing are cheap to reach.
Does not touch: the CLI (tests/test_cli.py checks exit codes, one-line errors and that nothing is
written), the store (tests/test_store.py) or key rotation across a store (tests/test_keys.py).
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import struct
from pathlib import Path

import pytest

from secure_ml.custody import crypto
from secure_ml.custody.keys import EnvKeyProvider, LocalKeyring, key_id_for
from secure_ml.errors import BadInput, Error, IntegrityError, KeyUnavailable

CHUNK = 64
MATERIAL = bytes(range(32))
OTHER = bytes(range(32, 64))


def env_keys(active: bytes = MATERIAL, *retired: bytes) -> EnvKeyProvider:
    environ = {"SECURE_ML_KEK": base64.b64encode(active).decode()}
    if retired:
        environ["SECURE_ML_KEK_RETIRED"] = ",".join(base64.b64encode(m).decode() for m in retired)
    return EnvKeyProvider(environ)


def encrypt(data: bytes, keys: crypto.KeySource | None = None, chunk_size: int = CHUNK) -> bytes:
    out = io.BytesIO()
    assert crypto.encrypt_stream(io.BytesIO(data), out, keys or env_keys(), chunk_size=chunk_size) == len(data)
    return out.getvalue()


def decrypt(blob: bytes, keys: crypto.KeySource | None = None) -> bytes:
    out = io.BytesIO()
    size = crypto.decrypt_stream(io.BytesIO(blob), out, keys or env_keys())
    assert size == len(out.getvalue())
    return out.getvalue()


def header_size(blob: bytes) -> int:
    return crypto.read_header(io.BytesIO(blob)).size


def chunks(blob: bytes) -> tuple[bytes, list[bytes]]:
    """Split an artifact into its header and its sealed chunks."""
    hsize = header_size(blob)
    chunk_size = crypto.read_header(io.BytesIO(blob)).chunk_size + 16
    body = blob[hsize:]
    return blob[:hsize], [body[i:i + chunk_size] for i in range(0, len(body), chunk_size)]


def one_line(exc: BaseException) -> str:
    assert isinstance(exc, Error)
    line = exc.explain()
    assert "\n" not in line and line
    return line


# -- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 2 * CHUNK, 2 * CHUNK + 1, 7 * CHUNK])
def test_round_trip_around_chunk_boundaries(size: int) -> None:
    data = os.urandom(size)
    blob = encrypt(data)
    # one sealed chunk per started chunk, and a (tag-only) chunk even for empty input
    expected_chunks = max(1, -(-size // CHUNK))
    assert len(blob) == header_size(blob) + size + 16 * expected_chunks
    assert decrypt(blob) == data


@pytest.mark.parametrize("size", [0, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 << 20])
def test_round_trip_default_chunk_size(size: int) -> None:
    data = os.urandom(size)
    blob = encrypt(data, chunk_size=crypto.DEFAULT_CHUNK_SIZE)
    assert decrypt(blob) == data


def test_same_plaintext_encrypts_differently_each_time() -> None:
    data = b"the same bytes" * 20
    first, second = encrypt(data), encrypt(data)
    assert first != second  # fresh data key and nonce prefix per artifact
    assert decrypt(first) == decrypt(second) == data


class _ReadOnlyRaw(io.RawIOBase):
    """A source with read() only and short reads (like a pipe): exercises the readinto fallback."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data, self._pos, self._step = data, 0, step

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = self._step if size < 0 else min(size, self._step)
        chunk = self._data[self._pos:self._pos + size]
        self._pos += len(chunk)
        return chunk


class _ShortReads(io.RawIOBase):
    """A source whose readinto returns a few bytes at a time."""

    def __init__(self, data: bytes, step: int) -> None:
        self._src, self._step = io.BytesIO(data), step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        return self._src.readinto(memoryview(buffer)[: self._step])


@pytest.mark.parametrize("source", [_ReadOnlyRaw, _ShortReads])
def test_sources_with_short_reads_or_without_readinto(source: type) -> None:
    data = os.urandom(5 * CHUNK + 3)
    out = io.BytesIO()
    crypto.encrypt_stream(source(data, 7), out, env_keys(), chunk_size=CHUNK)
    assert decrypt(out.getvalue()) == data
    back = io.BytesIO()
    crypto.decrypt_stream(source(out.getvalue(), 5), back, env_keys())
    assert back.getvalue() == data


def test_a_non_blocking_source_with_nothing_ready_is_refused_not_sealed_short() -> None:
    class NotReady(io.RawIOBase):
        calls = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: memoryview) -> int | None:  # type: ignore[override]
            self.calls += 1
            if self.calls == 1:
                buffer[:3] = b"abc"
                return 3
            return None  # EAGAIN on a non-blocking pipe

    with pytest.raises(BadInput, match="non-blocking"):
        crypto.encrypt_stream(NotReady(), io.BytesIO(), env_keys(), chunk_size=CHUNK)


def test_chunk_size_is_validated() -> None:
    for bad in (0, -1, crypto.MAX_CHUNK_SIZE + 1):
        with pytest.raises(BadInput, match="chunk size"):
            crypto.encrypt_stream(io.BytesIO(b"x"), io.BytesIO(), env_keys(), chunk_size=bad)


# -- keys -----------------------------------------------------------------------------------------
def test_wrong_key_is_a_one_line_error_naming_the_key_id() -> None:
    blob = encrypt(b"secret payload")
    with pytest.raises(KeyUnavailable) as caught:
        decrypt(blob, env_keys(OTHER))
    line = one_line(caught.value)
    assert key_id_for(MATERIAL) in line and "wrong key" in line
    for secret in (MATERIAL, OTHER):
        assert base64.b64encode(secret).decode() not in line and secret.hex() not in line


def test_wrong_key_under_the_right_id_fails_authentication(tmp_path: Path) -> None:
    """A keyring that claims the right key id but holds other material (a swapped keyring)."""
    blob = encrypt(b"secret payload")
    path = tmp_path / "keyring.json"
    kid = key_id_for(MATERIAL)
    path.write_text(json.dumps({"version": 1, "active": kid, "rotation_pending": False,
                                "keys": {kid: {"material": base64.b64encode(OTHER).decode(), "created": ""}}}))
    path.chmod(0o600)
    with pytest.raises(IntegrityError, match="does not open this artifact") as caught:
        decrypt(blob, LocalKeyring(path))
    assert base64.b64encode(OTHER).decode() not in one_line(caught.value)


def test_a_retired_key_still_decrypts_and_new_artifacts_use_the_active_one() -> None:
    old_blob = encrypt(b"written under the old key")
    keys = env_keys(OTHER, MATERIAL)
    assert decrypt(old_blob, keys) == b"written under the old key"
    assert crypto.peek_key_id(io.BytesIO(encrypt(b"new", keys))) == key_id_for(OTHER)


# -- truncation -----------------------------------------------------------------------------------
def test_truncated_anywhere_in_the_header() -> None:
    blob = encrypt(b"x" * 100)
    for cut in range(1, header_size(blob)):
        with pytest.raises(Error) as caught:
            decrypt(blob[:cut])
        line = one_line(caught.value)
        assert "truncated" in line or "not a secure-ml encrypted artifact" in line, (cut, line)
    # Past the magic it is recognisably ours, so the error says truncated.
    for cut in range(len(crypto.MAGIC), header_size(blob)):
        with pytest.raises(IntegrityError, match="truncated"):
            decrypt(blob[:cut])


def test_truncated_mid_chunk() -> None:
    blob = encrypt(os.urandom(5 * CHUNK))
    hsize = header_size(blob)
    sealed = CHUNK + 16
    for cut in [hsize + 1, hsize + 15, hsize + 16, hsize + sealed - 1, hsize + 2 * sealed + 7, len(blob) - 1]:
        with pytest.raises(IntegrityError) as caught:
            decrypt(blob[:cut])
        line = one_line(caught.value)
        assert "chunk" in line and ("truncated" in line or "failed authentication" in line), (cut, line)


def test_truncated_at_a_chunk_boundary_is_named_as_truncation() -> None:
    blob = encrypt(os.urandom(5 * CHUNK + 10))
    hsize = header_size(blob)
    sealed = CHUNK + 16
    # after chunk k (not the last) the stream ends cleanly at a boundary: STREAM's last flag catches it
    for k in range(1, 6):
        with pytest.raises(IntegrityError, match=rf"truncated: it ends after chunk {k - 1}, which is not the final"):
            decrypt(blob[: hsize + k * sealed])
    # no chunk at all after the header
    with pytest.raises(IntegrityError, match="truncated"):
        decrypt(blob[:hsize])


# -- bit flips, reordering, duplication, splicing -------------------------------------------------
def test_one_flipped_bit_anywhere_is_detected() -> None:
    """Every single-bit flip over a whole artifact (header, key slot, every chunk, every tag)."""
    data = os.urandom(3 * CHUNK + 5)
    blob = bytearray(encrypt(data))
    failures: dict[str, int] = {}
    for position in range(len(blob)):
        for bit in range(8):
            blob[position] ^= 1 << bit
            try:
                decrypt(bytes(blob))
            except Error as exc:  # only our own errors, each one line
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                one_line(exc)
            else:
                pytest.fail(f"flipping bit {bit} of byte {position} went undetected")
            finally:
                blob[position] ^= 1 << bit
    assert sum(failures.values()) == 8 * len(blob)
    assert decrypt(bytes(blob)) == data  # restored: the loop really flipped and unflipped


def test_random_bit_flips_at_the_default_chunk_size() -> None:
    data = os.urandom((2 << 20) + 123)
    blob = bytearray(encrypt(data, chunk_size=crypto.DEFAULT_CHUNK_SIZE))
    rng = random.Random(2)
    for position in [0, 10, 40, 70, *rng.sample(range(len(blob)), 12), len(blob) - 1]:
        bit = 1 << rng.randrange(8)
        blob[position] ^= bit
        with pytest.raises(Error):
            decrypt(bytes(blob))
        blob[position] ^= bit
    assert decrypt(bytes(blob)) == data


def test_chunks_reordered() -> None:
    head, parts = chunks(encrypt(os.urandom(4 * CHUNK + 9)))
    swapped = [parts[1], parts[0], *parts[2:]]
    with pytest.raises(IntegrityError, match="chunk 0 failed authentication"):
        decrypt(head + b"".join(swapped))
    last_moved = [*parts[:2], parts[-1], *parts[2:-1]]
    with pytest.raises(IntegrityError, match="chunk 2"):
        decrypt(head + b"".join(last_moved))


def test_chunks_duplicated_or_dropped() -> None:
    head, parts = chunks(encrypt(os.urandom(4 * CHUNK + 9)))
    with pytest.raises(IntegrityError, match="chunk 2"):
        decrypt(head + b"".join([parts[0], parts[1], parts[1], *parts[2:]]))
    with pytest.raises(IntegrityError, match="chunk 1"):
        decrypt(head + b"".join([parts[0], *parts[2:]]))
    with pytest.raises(IntegrityError):  # the final chunk twice
        decrypt(head + b"".join([*parts, parts[-1]]))


def test_chunks_spliced_from_another_artifact_under_the_same_key() -> None:
    data = os.urandom(4 * CHUNK)
    head_a, parts_a = chunks(encrypt(data))
    head_b, parts_b = chunks(encrypt(data))  # same key, same plaintext, same position
    with pytest.raises(IntegrityError, match="chunk 2 failed authentication"):
        decrypt(head_a + b"".join([*parts_a[:2], parts_b[2], *parts_a[3:]]))
    # another artifact's header (key slot and nonce prefix) on these chunks
    with pytest.raises(IntegrityError, match="chunk 0"):
        decrypt(head_b + b"".join(parts_a))


# -- not ours at all ------------------------------------------------------------------------------
def test_unknown_format_version() -> None:
    blob = bytearray(encrypt(b"payload"))
    blob[len(crypto.MAGIC)] = 2
    with pytest.raises(BadInput, match="unsupported artifact format version 2"):
        decrypt(bytes(blob))
    blob[len(crypto.MAGIC)] = crypto.FORMAT_VERSION
    blob[len(crypto.MAGIC) + 1] = 9
    with pytest.raises(BadInput, match="unsupported artifact algorithm 9"):
        decrypt(bytes(blob))


def test_impossible_chunk_size_in_the_header() -> None:
    blob = bytearray(encrypt(b"payload"))
    offset = len(crypto.MAGIC) + 2
    for value in (0, crypto.MAX_CHUNK_SIZE + 1, 0xFFFFFFFF):
        blob[offset:offset + 4] = struct.pack(">I", value)
        with pytest.raises(IntegrityError, match="impossible chunk size"):
            decrypt(bytes(blob))


@pytest.mark.parametrize("plaintext", [b"name,age\nalice,30\n", b"SMLEN", b"\x00" * 200, b"S"])
def test_plaintext_given_to_decrypt(plaintext: bytes) -> None:
    with pytest.raises(BadInput, match="not a secure-ml encrypted artifact") as caught:
        decrypt(plaintext)
    assert "plaintext" in one_line(caught.value)


def test_empty_input_to_decrypt() -> None:
    with pytest.raises(BadInput, match="empty input"):
        decrypt(b"")


def test_empty_plaintext_round_trip_and_its_truncation() -> None:
    blob = encrypt(b"")
    assert decrypt(blob) == b""
    with pytest.raises(IntegrityError, match="truncated"):
        decrypt(blob[:-1])


# -- rewrap ---------------------------------------------------------------------------------------
def test_rewrap_changes_only_the_key_slot() -> None:
    data = os.urandom(6 * CHUNK + 1)
    blob = encrypt(data)
    out = io.BytesIO()
    old_id, new_id = crypto.rewrap(io.BytesIO(blob), out, env_keys(OTHER, MATERIAL))
    assert (old_id, new_id) == (key_id_for(MATERIAL), key_id_for(OTHER))
    rewrapped = out.getvalue()
    hsize = header_size(blob)
    assert header_size(rewrapped) == hsize  # both key ids have the same length
    fixed = crypto._FIXED.size
    assert rewrapped[:fixed] == blob[:fixed]              # fixed header untouched
    assert rewrapped[hsize:] == blob[hsize:]              # every chunk byte-identical
    assert rewrapped[fixed:hsize] != blob[fixed:hsize]    # only the key slot changed
    assert decrypt(rewrapped, env_keys(OTHER)) == data    # the old key is no longer needed
    with pytest.raises(KeyUnavailable):
        decrypt(rewrapped, env_keys(MATERIAL))


def test_rewrap_refuses_what_it_cannot_open() -> None:
    with pytest.raises(KeyUnavailable):
        crypto.rewrap(io.BytesIO(encrypt(b"x")), io.BytesIO(), env_keys(OTHER))
    with pytest.raises(BadInput):
        crypto.rewrap(io.BytesIO(b"plain text"), io.BytesIO(), env_keys())


def test_require_key_never_leaks_a_provider_failure() -> None:
    class Broken:
        def active_key(self) -> tuple[str, bytes]:
            raise AssertionError

        def key(self, key_id: str) -> bytes:
            raise RuntimeError(f"leaked {base64.b64encode(MATERIAL).decode()}")

    with pytest.raises(KeyUnavailable) as caught:
        crypto.require_key(Broken(), "kek-x")
    assert base64.b64encode(MATERIAL).decode() not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


# -- real files: the O_DIRECT read stage and the in-place write stage (secure_ml.integrity) --------
def _seal_file(tmp_path: Path, data: bytes, chunk_size: int = crypto.DEFAULT_CHUNK_SIZE) -> Path:
    from secure_ml.custody.integrity import atomic_write

    plain, sealed = tmp_path / "plain.bin", tmp_path / "sealed.smle"
    plain.write_bytes(data)
    with open(plain, "rb") as src, atomic_write(sealed) as dst:
        assert crypto.encrypt_stream(src, dst, env_keys(), chunk_size=chunk_size) == len(data)
        assert src.tell() == len(data)  # the caller's file is left where the stream ended
    return sealed


def _open_file(sealed: Path, back: Path) -> bytes:
    from secure_ml.custody.integrity import atomic_write

    with open(sealed, "rb") as src, atomic_write(back) as dst:
        size = crypto.decrypt_stream(src, dst, env_keys())
        assert src.tell() == sealed.stat().st_size
    assert back.stat().st_size == size
    return back.read_bytes()


@pytest.mark.parametrize("size,chunk_size", [(0, crypto.DEFAULT_CHUNK_SIZE), (1, crypto.DEFAULT_CHUNK_SIZE),
                                             (19 * (1 << 20) + 4093, crypto.DEFAULT_CHUNK_SIZE),
                                             (3 * (1 << 20) + 7, 1000), (2 * (1 << 20), 4096)])
def test_file_to_file_round_trip_across_stage_boundaries(tmp_path: Path, size: int, chunk_size: int) -> None:
    """Files bigger than the 8 MiB stages, odd chunk sizes, an unaligned header: byte-exact,
    and identical to what the plain (BytesIO) path produces when decrypted."""
    data = os.urandom(size)
    sealed = _seal_file(tmp_path, data, chunk_size)
    assert decrypt(sealed.read_bytes()) == data
    assert _open_file(sealed, tmp_path / "back.bin") == data


@pytest.mark.parametrize("damage", ["flip-late-chunk", "truncate-boundary", "truncate-mid-chunk", "truncate-header",
                                    "append"])
def test_damaged_files_fail_and_leave_no_output(tmp_path: Path, damage: str) -> None:
    """Through the direct-I/O read stage: damage past the first stage is caught, nothing is
    left at the output path (decrypt_into writes in place only what it then commits)."""
    data = os.urandom(12 * (1 << 20) + 5)
    sealed = _seal_file(tmp_path, data)
    blob = bytearray(sealed.read_bytes())
    header = crypto.read_header(io.BytesIO(bytes(blob))).size
    sealed_chunk = crypto.DEFAULT_CHUNK_SIZE + 16
    if damage == "flip-late-chunk":
        blob[header + 10 * sealed_chunk + 12345] ^= 0x01
    elif damage == "truncate-boundary":
        del blob[header + 9 * sealed_chunk:]
    elif damage == "truncate-mid-chunk":
        del blob[header + 9 * sealed_chunk + 777:]
    elif damage == "truncate-header":
        del blob[header - 3:]
    else:
        blob += b"\0" * 100
    sealed.write_bytes(bytes(blob))
    back = tmp_path / "back.bin"
    with pytest.raises(IntegrityError):
        _open_file(sealed, back)
    assert not back.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.bin", "sealed.smle"]


# -- the zero-copy read path: chunks are views of the direct reader's stage -----------------------
SMALL_STAGE = 6 * 4096  # with tiny chunks, files cross the read stage many times


@pytest.fixture(autouse=True)
def direct_reads_for_small_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """The direct path for every size here (in use it starts at DIRECT_READ_MIN)."""
    from secure_ml.custody import integrity

    monkeypatch.setattr(integrity, "DIRECT_READ_MIN", 0)


@pytest.fixture
def small_stage(monkeypatch: pytest.MonkeyPatch) -> int:
    from secure_ml.custody import integrity

    monkeypatch.setattr(integrity, "READ_STAGE_SIZE", SMALL_STAGE)
    return SMALL_STAGE


@pytest.fixture
def fixed_randomness(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same data key, nonce prefix and wrap nonce every time, so ciphertexts can be compared."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    class FixedKeyAESGCM:
        generate_key = staticmethod(lambda bit_length: b"\x07" * (bit_length // 8))

        def __new__(cls, key: bytes) -> AESGCM:  # type: ignore[misc]
            return AESGCM(key)

    monkeypatch.setattr(crypto, "AESGCM", FixedKeyAESGCM)
    monkeypatch.setattr(crypto.os, "urandom", lambda n: b"\x05" * n)


def _direct_used(path: Path) -> bool:
    from secure_ml.custody.integrity import direct_reader, finish_direct_read

    with open(path, "rb") as src:
        reader = direct_reader(src)
        if reader is None:
            return False
        finish_direct_read(src, reader)
        return True


def _encrypt_file_to_bytes(path: Path, chunk_size: int) -> bytes:
    out = io.BytesIO()
    with open(path, "rb") as src:
        crypto.encrypt_stream(src, out, env_keys(), chunk_size=chunk_size)
    return out.getvalue()


def _decrypt_file_to_bytes(path: Path) -> bytes:
    out = io.BytesIO()
    with open(path, "rb") as src:
        assert crypto.decrypt_stream(src, out, env_keys()) == len(out.getvalue())
        assert src.tell() == path.stat().st_size
    return out.getvalue()


@pytest.mark.parametrize("chunk_size", [1000, 4096 - 16, 4096, 4097, 2 * SMALL_STAGE])
@pytest.mark.parametrize("chunks,extra", [(0, 0), (1, 0), (1, -1), (1, 1), (4, 0), (6, 0), (7, 0), (7, 1), (7, -1),
                                          (12, 0), (30, 5)])
def test_direct_path_seals_exactly_what_the_plain_path_seals(tmp_path: Path, small_stage: int, fixed_randomness: None,
                                                            chunk_size: int, chunks: int, extra: int) -> None:
    """Same key and nonces: file -> file (zero-copy read and write stages), file -> BytesIO and
    BytesIO -> BytesIO give the same bytes, for sizes on, just under and just over chunk
    boundaries, an empty file, files many stages long, and chunks bigger than the stage (these
    go through the two-buffer fallback over the direct reader). Each decrypts the other's output."""
    data = random.Random(chunks * 1000 + extra).randbytes(max(0, chunks * chunk_size + extra))
    plain_path = tmp_path / "plain.bin"
    plain_path.write_bytes(data)
    assert _direct_used(plain_path) or pytest.skip("this file system refuses O_DIRECT")
    reference = encrypt(data, chunk_size=chunk_size)
    sealed = _seal_file(tmp_path, data, chunk_size)
    assert sealed.read_bytes() == reference
    assert _encrypt_file_to_bytes(plain_path, chunk_size) == reference
    assert decrypt(sealed.read_bytes()) == data
    assert _open_file(sealed, tmp_path / "back.bin") == data
    assert _decrypt_file_to_bytes(sealed) == data


def _damages(blob: bytes) -> list[tuple[str, bytes]]:
    header = header_size(blob)
    sealed_chunk = crypto.read_header(io.BytesIO(blob)).chunk_size + 16
    cases: list[tuple[str, bytes]] = []
    for position in [*range(header, len(blob), 997), header + 5 * sealed_chunk - 1, len(blob) - 1, 3]:
        flipped = bytearray(blob)
        flipped[position] ^= 0x10
        cases.append((f"flip@{position}", bytes(flipped)))
    for boundary in range(header, len(blob), sealed_chunk):
        for end in (boundary, boundary + 7, boundary + 500):  # at a boundary, a tag-sized stub, mid chunk
            if end < len(blob):
                cases.append((f"cut@{end}", blob[:end]))
    cases.append(("append", blob + b"\0"))
    return cases


def test_direct_path_rejects_every_damage_with_the_plain_paths_explanation(tmp_path: Path, small_stage: int) -> None:
    """Bit flips and truncations anywhere (chunks straddling the stage end included): the direct
    path refuses each exactly as the BytesIO path does, and leaves no output."""
    data = os.urandom(20 * 1000 + 3)
    blob = encrypt(data, chunk_size=1000)
    sealed, back = tmp_path / "sealed.smle", tmp_path / "back.bin"
    checked = 0
    for name, damaged in _damages(blob):
        with pytest.raises(Error) as plain_error:
            decrypt(damaged)
        sealed.write_bytes(damaged)
        assert _direct_used(sealed) or pytest.skip("this file system refuses O_DIRECT")
        with pytest.raises(Error) as direct_error:
            _open_file(sealed, back)
        assert type(direct_error.value) is type(plain_error.value), name
        assert str(direct_error.value) == str(plain_error.value), name
        assert not back.exists(), name
        checked += 1
    assert checked > 60


@pytest.mark.parametrize("stage", ["small", "real"])
@pytest.mark.parametrize("cut", ["boundary", "mid-chunk"])
def test_ciphertext_shrinking_during_decrypt_is_rejected_as_truncated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     stage: str, cut: str) -> None:
    """The artifact is truncated after decryption began (past what the stage already holds): the
    reader reads short, and the short end is refused as a truncation; nothing is left behind."""
    from secure_ml.custody import integrity

    if stage == "small":
        monkeypatch.setattr(integrity, "READ_STAGE_SIZE", SMALL_STAGE)
    chunk_size = 1000 if stage == "small" else crypto.DEFAULT_CHUNK_SIZE
    stage_size = integrity.READ_STAGE_SIZE
    chunk_count = 3 * stage_size // chunk_size
    sealed = _seal_file(tmp_path, os.urandom(chunk_count * chunk_size + 11), chunk_size)
    assert _direct_used(sealed) or pytest.skip("this file system refuses O_DIRECT")
    header = header_size(sealed.read_bytes())
    keep = chunk_count // 2 * (chunk_size + 16) + (0 if cut == "boundary" else 333)
    assert keep > stage_size
    original_chunk = integrity._DirectReader.chunk
    calls = []

    def chunk_then_truncate(self: integrity._DirectReader, size: int) -> tuple[memoryview, bool]:
        calls.append(size)
        if len(calls) == 2:
            os.truncate(sealed, header + keep)
        return original_chunk(self, size)

    monkeypatch.setattr(integrity._DirectReader, "chunk", chunk_then_truncate)
    back = tmp_path / "back.bin"
    with pytest.raises(IntegrityError, match="truncated"):
        _open_file(sealed, back)
    assert len(calls) > 2 and not back.exists()


def test_plaintext_shrinking_during_encrypt_seals_what_was_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                small_stage: int) -> None:
    """A source truncated mid-encryption reads short: the artifact is a valid one of the prefix
    read (never bytes from beyond the new end, never a crash)."""
    from secure_ml.custody import integrity
    from secure_ml.custody.integrity import atomic_write

    data = os.urandom(10 * SMALL_STAGE)
    plain, sealed = tmp_path / "plain.bin", tmp_path / "sealed.smle"
    plain.write_bytes(data)
    assert _direct_used(plain) or pytest.skip("this file system refuses O_DIRECT")
    original_chunk = integrity._DirectReader.chunk
    calls = []

    def chunk_then_truncate(self: integrity._DirectReader, size: int) -> tuple[memoryview, bool]:
        calls.append(size)
        if len(calls) == 2:
            os.truncate(plain, 3 * SMALL_STAGE + 5)
        return original_chunk(self, size)

    monkeypatch.setattr(integrity._DirectReader, "chunk", chunk_then_truncate)
    with open(plain, "rb") as src, atomic_write(sealed) as dst:
        size = crypto.encrypt_stream(src, dst, env_keys(), chunk_size=1000)
    assert SMALL_STAGE - 4096 <= size <= 3 * SMALL_STAGE + 5
    assert decrypt(sealed.read_bytes()) == data[:size]
